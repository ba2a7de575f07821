"""The Triton source of :mod:`continual_mem.kernels` (imported only when the kernel is used: Triton resolves a
kernel's helpers from its module's globals)."""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs: full precision (the default would round them to TF32); bf16/fp16 inputs: the tensor cores
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _online(acc, m_i, l_i, s, vv, IEEE: tl.constexpr):
    """Fold a block of scores ``s`` ``(M, K)`` and values ``vv`` ``(K, D)`` into every row's running max, sum and
    output (rows are independent: a row's result never depends on another row's scores)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, IEEE)
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def group_attn(q_ptr, sk_ptr, sv_ptr, ok_ptr, ov_ptr, out_ptr, H, N, ROWS, PRIV,
               q_sb, q_sh, q_sr, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sr,
               N_Q: tl.constexpr, P: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, IEEE: tl.constexpr):
    """One program per (image, head) for a whole group: its ``ROWS = slots * N_Q`` query rows read each block of
    the backbone's keys and values once (in place, any row stride), then each row attends to its own slot's
    ``P`` private keys (block-diagonal mask over the group's ``PRIV = slots * P``)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < ROWS
    dmask = d < HD
    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_sr + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kmask = keys < N
        tile = kmask[:, None] & dmask[None, :]
        kk = tl.load(sk_ptr + b * k_sb + h * k_sh + keys[:, None] * k_sn + d[None, :], mask=tile, other=0.0)
        s = tl.where(kmask[None, :], _dot(q, tl.trans(kk), IEEE), -float("inf"))
        vv = tl.load(sv_ptr + b * v_sb + h * v_sh + keys[:, None] * v_sn + d[None, :], mask=tile, other=0.0)
        acc, m_i, l_i = _online(acc, m_i, l_i, s, vv, IEEE)
    cols = tl.arange(0, BLOCK_P)
    cmask = cols < PRIV
    tile = cmask[:, None] & dmask[None, :]
    own = pid * PRIV * HD + cols[:, None] * HD + d[None, :]  # own_k/own_v: contiguous (B, H, slots, P, hd)
    kk = tl.load(ok_ptr + own, mask=tile, other=0.0)
    mine = ((rows[:, None] // N_Q) == (cols[None, :] // P)) & cmask[None, :]
    s = tl.where(mine, _dot(q, tl.trans(kk), IEEE), -float("inf"))
    vv = tl.load(ov_ptr + own, mask=tile, other=0.0)
    acc, m_i, l_i = _online(acc, m_i, l_i, s, vv, IEEE)
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * o_sb + h * o_sh + rows[:, None] * o_sr + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
