"""The Triton source of :mod:`continual_mem.kernels` (imported only when the kernel is used: Triton resolves a
kernel's helpers from its module's globals)."""
import triton
import triton.language as tl


@triton.jit
def online(acc, m_i, l_i, s, vv):
    """Fold one block of scores ``s`` and values ``vv`` into the running max, sum and output."""
    m_new = tl.maximum(m_i, tl.max(s, axis=0))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new)
    return acc * alpha + tl.sum(p[:, None] * vv, axis=0), m_new, l_i * alpha + tl.sum(p, axis=0)


@triton.jit
def fold(acc, m_i, l_i, qv, k_ptr, v_ptr, offs, kmask, dmask):
    """Scores of ``qv`` against the keys at ``offs`` (rows ``kmask``), folded with their values by :func:`online`."""
    kk = tl.load(k_ptr + offs, mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    s = tl.where(kmask, tl.sum(kk * qv[None, :], axis=1), -float("inf"))
    vv = tl.load(v_ptr + offs, mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    return online(acc, m_i, l_i, s, vv)


@triton.jit
def group_attn(q_ptr, sk_ptr, sv_ptr, ok_ptr, ov_ptr, out_ptr, S, N, P,
               N_Q: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_P: tl.constexpr):
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    shared_base = bh * N * HD
    own_base = (bh * S + slot) * P * HD
    for r in range(N_Q):
        row = (bh * S + slot) * N_Q + r
        qv = tl.load(q_ptr + row * HD + d, mask=dmask, other=0.0).to(tl.float32)
        m_i = tl.full([], -float("inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = fold(acc, m_i, l_i, qv, sk_ptr, sv_ptr, shared_base + keys[:, None] * HD + d[None, :],
                                 keys < N, dmask)
        keys = tl.arange(0, BLOCK_P)
        acc, m_i, l_i = fold(acc, m_i, l_i, qv, ok_ptr, ov_ptr, own_base + keys[:, None] * HD + d[None, :],
                             keys < P, dmask)
        tl.store(out_ptr + row * HD + d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=dmask)
