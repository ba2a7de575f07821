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
def _private(acc, m_i, l_i, q, rows, k_ptr, v_ptr, base, s_r, COUNT, PER, N_Q: tl.constexpr, BLOCK: tl.constexpr,
             d, dmask, IEEE: tl.constexpr):
    """Fold ``COUNT`` private keys (``PER`` per slot, row stride ``s_r`` from ``base``) in; a row sees only its own
    slot's (a block-diagonal mask)."""
    cols = tl.arange(0, BLOCK)
    cmask = cols < COUNT
    tile = cmask[:, None] & dmask[None, :]
    offs = base + cols[:, None] * s_r + d[None, :]
    kk = tl.load(k_ptr + offs, mask=tile, other=0.0)
    mine = ((rows[:, None] // N_Q) == (cols[None, :] // PER)) & cmask[None, :]
    s = tl.where(mine, _dot(q, tl.trans(kk), IEEE), -float("inf"))
    vv = tl.load(v_ptr + offs, mask=tile, other=0.0)
    return _online(acc, m_i, l_i, s, vv, IEEE)


@triton.jit
def group_attn(q_ptr, k_ptr, v_ptr, sk_ptr, sv_ptr, mk_ptr, mv_ptr, out_ptr, scale, H, N, ROWS, MEM,
               q_sb, q_sh, q_sr, k_sb, k_sh, k_sr, sk_sb, sk_sh, sk_sn, sv_sb, sv_sh, sv_sn, m_sh, m_sr,
               o_sb, o_sh, o_sr,
               N_Q: tl.constexpr, M_PER: tl.constexpr, HD: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MEM: tl.constexpr, IEEE: tl.constexpr):
    """One program per (image, head) for a whole group: its ``ROWS = slots * N_Q`` query rows (scaled here) read
    each block of the backbone's keys and values once (in place, any row stride), then each row attends to its own
    slot's token keys (the group's qkv, in place) and memory keys (``M_PER`` per slot, image-independent; none when
    ``MEM`` is 0)."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < ROWS
    dmask = d < HD
    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_sr + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kmask = keys < N
        tile = kmask[:, None] & dmask[None, :]
        kk = tl.load(sk_ptr + b * sk_sb + h * sk_sh + keys[:, None] * sk_sn + d[None, :], mask=tile, other=0.0)
        s = tl.where(kmask[None, :], _dot(q, tl.trans(kk), IEEE), -float("inf"))
        vv = tl.load(sv_ptr + b * sv_sb + h * sv_sh + keys[:, None] * sv_sn + d[None, :], mask=tile, other=0.0)
        acc, m_i, l_i = _online(acc, m_i, l_i, s, vv, IEEE)
    acc, m_i, l_i = _private(acc, m_i, l_i, q, rows, k_ptr, v_ptr, b * k_sb + h * k_sh, k_sr, ROWS, N_Q, N_Q,
                             BLOCK_M, d, dmask, IEEE)
    if BLOCK_MEM > 0:
        acc, m_i, l_i = _private(acc, m_i, l_i, q, rows, mk_ptr, mv_ptr, h * m_sh, m_sr, MEM, M_PER, N_Q,
                                 BLOCK_MEM, d, dmask, IEEE)
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * o_sb + h * o_sh + rows[:, None] * o_sr + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
