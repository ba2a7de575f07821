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
def _load_tile(ptr, offs, mask, d, dmask):
    """Rows at offsets ``offs`` (masked rows read as zeros), columns ``d``."""
    return tl.load(ptr + offs[:, None] + d[None, :], mask=mask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _load_rows(k_ptr, v_ptr, offs, mask, d, dmask):
    """Keys and values at row offsets ``offs`` (one set of strides)."""
    return _load_tile(k_ptr, offs, mask, d, dmask), _load_tile(v_ptr, offs, mask, d, dmask)


@triton.jit
def _private(acc, m_i, l_i, q, rows, kk, vv, COUNT, PER, N_Q: tl.constexpr, BLOCK: tl.constexpr,
             IEEE: tl.constexpr):
    """Fold ``COUNT`` private keys (``PER`` per slot, loaded by :func:`_load_rows`) in; a row sees only its own
    slot's (a block-diagonal mask: every other key's weight is exactly zero). A weight of zero times a non-finite
    value is NaN, so such values are zeroed before the product and the rows that own them set to NaN after it:
    one task's overflow never reaches another's rows, and finite values keep their bits."""
    cols = tl.arange(0, BLOCK)
    mine = ((rows[:, None] // N_Q) == (cols[None, :] // PER)) & (cols < COUNT)[None, :]
    s = tl.where(mine, _dot(q, tl.trans(kk), IEEE), -float("inf"))
    finite = tl.abs(vv.to(tl.float32)) < float("inf")  # False for NaN too
    bad = tl.max(tl.where(finite, 0, 1), axis=1)  # per key: a non-finite value in its row
    own_bad = tl.max(tl.where(mine, bad[None, :], 0), axis=1)  # per query row: one of its own keys has one
    acc, m_i, l_i = _online(acc, m_i, l_i, s, tl.where(finite, vv, 0.0).to(vv.dtype), IEEE)
    return tl.where(own_bad[:, None] > 0, float("nan"), acc), m_i, l_i


@triton.jit
def _backbone_block(sk_ptr, sv_ptr, sk_sn, sv_sn, start, N, d, dmask, BLOCK_N: tl.constexpr):
    """Keys and values ``[start, start + BLOCK_N)`` of the backbone (pointers at this image and head), and their
    mask."""
    keys = start + tl.arange(0, BLOCK_N)
    kmask = keys < N
    tile = kmask[:, None] & dmask[None, :]
    kk = tl.load(sk_ptr + keys[:, None] * sk_sn + d[None, :], mask=tile, other=0.0)
    vv = tl.load(sv_ptr + keys[:, None] * sv_sn + d[None, :], mask=tile, other=0.0)
    return kk, vv, kmask


@triton.jit
def _attend_backbone(q, sk_ptr, sv_ptr, sk_sn, sv_sn, N, d, dmask, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online softmax of the (scaled) queries over every backbone key, block by block: ``acc, m_i, l_i``."""
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        kk, vv, kmask = _backbone_block(sk_ptr, sv_ptr, sk_sn, sv_sn, start, N, d, dmask, BLOCK_N)
        s = tl.where(kmask[None, :], _dot(q, tl.trans(kk), IEEE), -float("inf"))
        acc, m_i, l_i = _online(acc, m_i, l_i, s, vv, IEEE)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["GROUPS", "q_sg", "k_sg", "o_sg"])
def group_attn(q_ptr, k_ptr, v_ptr, sk_ptr, sv_ptr, mk_ptr, mv_ptr, out_ptr, scale, H, N, GROUPS, MEM,
               q_sg, q_sb, q_sh, q_sr, k_sg, k_sb, k_sh, k_sr, sk_sb, sk_sh, sk_sn, sv_sb, sv_sh, sv_sn, m_sb, m_sh, m_sr,
               o_sg, o_sb, o_sh, o_sr,
               L: tl.constexpr, PACK: tl.constexpr, N_Q: tl.constexpr, M_PER: tl.constexpr, HD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MEM: tl.constexpr,
               IEEE: tl.constexpr):
    """One program per (image, head, pack of ``PACK`` groups); a group is ``L = slots * N_Q`` query rows, groups lie
    ``q_sg``/``k_sg``/``o_sg`` apart, and each has ``MEM`` memory rows (``M_PER`` per slot, image-independent, group
    after group, ``m_sb`` apart per image: 0 when every image shares them, as a group's do; none when ``MEM`` is
    0). The pack's rows (scaled here) read each block of the backbone's keys and
    values once (in place, any row stride), then each row attends to its own slot's token keys (the groups' qkv, in
    place) and memory keys. A pack's tile sizes are fixed by ``PACK``; a group missing from the last pack is masked
    out, and masked keys weigh exactly zero, so a group's bits never depend on ``GROUPS`` (which only sizes the
    grid and is never specialised on)."""
    pid = tl.program_id(0)
    packs = tl.cdiv(GROUPS, PACK)
    pack = pid % packs
    b = pid // packs // H
    h = pid // packs % H
    present = tl.minimum(PACK, GROUPS - pack * PACK)  # groups in this pack
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < present * L
    dmask = d < HD
    group = pack * PACK + rows // L
    q = _load_tile(q_ptr, b * q_sb + h * q_sh + group * q_sg + rows % L * q_sr, rmask, d, dmask)
    # every private key and value is loaded up front: their latency overlaps the backbone's loop
    tk, tv = _load_rows(k_ptr, v_ptr, b * k_sb + h * k_sh + group * k_sg + rows % L * k_sr, rmask, d, dmask)
    if BLOCK_MEM > 0:
        mcols = tl.arange(0, BLOCK_MEM)
        mk, mv = _load_rows(mk_ptr, mv_ptr, b * m_sb + h * m_sh + (pack * PACK * MEM + mcols) * m_sr,
                            mcols < present * MEM,
                            d, dmask)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    acc, m_i, l_i = _attend_backbone(q, sk_ptr + b * sk_sb + h * sk_sh, sv_ptr + b * sv_sb + h * sv_sh, sk_sn, sv_sn,
                                     N, d, dmask, BLOCK_M, BLOCK_D, BLOCK_N, IEEE)
    acc, m_i, l_i = _private(acc, m_i, l_i, q, rows, tk, tv, present * L, N_Q, N_Q, BLOCK_M, IEEE)
    if BLOCK_MEM > 0:
        acc, m_i, l_i = _private(acc, m_i, l_i, q, rows, mk, mv, present * MEM, M_PER, N_Q, BLOCK_MEM, IEEE)
    out = acc / l_i[:, None]
    o_at = b * o_sb + h * o_sh + group * o_sg + rows % L * o_sr
    tl.store(out_ptr + o_at[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def add_layer_norm(x_ptr, delta_ptr, gamma_ptr, w_ptr, b_ptr, h_ptr, D, x_sg, h_sg, eps,
                   HAS_DELTA: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per row (``program_id(1)``: the group, ``x_sg``/``h_sg`` apart; ``delta`` is laid out like
    ``x``): ``x += gamma * delta`` in place (one rounding, from float32), then ``h = LayerNorm(x)``. A row's result
    depends on that row alone, so any number of rows and groups may share a launch."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    at = g * x_sg + row * D + cols
    x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            delta = delta * tl.load(gamma_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        stream = (x + delta).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + at, stream, mask=mask)
        x = stream.to(tl.float32)  # the norm reads the stream as stored
    if HAS_NORM:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + g * h_sg + row * D + cols, (xc * rstd * w + bias).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def task_attn_fwd(q_ptr, sk_ptr, sv_ptr, pk_ptr, pv_ptr, out_ptr, lse_ptr, scale, H, N, NQ, P,
                  q_sb, q_sh, q_sr, sk_sb, sk_sh, sk_sn, sv_sb, sv_sh, sv_sn, p_sb, p_sh, p_sr, o_sb, o_sh, o_sr,
                  HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_P: tl.constexpr, IEEE: tl.constexpr):
    """One task's ``NQ`` query rows of one (image, head) against [the backbone's ``N`` keys, in place ‖ the task's
    ``P`` private keys] (every row sees every key); writes the output and each row's log-sum-exp for the
    backward."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < NQ
    dmask = d < HD
    q = _load_tile(q_ptr, b * q_sb + h * q_sh + rows * q_sr, rmask, d, dmask)
    pcols = tl.arange(0, BLOCK_P)
    pk, pv = _load_rows(pk_ptr, pv_ptr, b * p_sb + h * p_sh + pcols * p_sr, pcols < P, d, dmask)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    acc, m_i, l_i = _attend_backbone(q, sk_ptr + b * sk_sb + h * sk_sh, sv_ptr + b * sv_sb + h * sv_sh, sk_sn, sv_sn,
                                     N, d, dmask, BLOCK_M, BLOCK_D, BLOCK_N, IEEE)
    s = tl.where((pcols < P)[None, :], _dot(q, tl.trans(pk), IEEE), -float("inf"))
    acc, m_i, l_i = _online(acc, m_i, l_i, s, pv, IEEE)
    tl.store(out_ptr + b * o_sb + h * o_sh + rows[:, None] * o_sr + d[None, :],
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    tl.store(lse_ptr + pid * BLOCK_M + rows, m_i + tl.log(l_i))


@triton.jit
def _grad_block(q, do, lse, delta, kk, vv, valid, IEEE: tl.constexpr):
    """Probabilities and score gradients of one key block: ``p``, ``ds`` (rows x keys, float32)."""
    s = _dot(q, tl.trans(kk), IEEE)
    p = tl.where(valid[None, :], tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(vv), IEEE)
    return p, p * (dp - delta[:, None])


@triton.jit
def task_attn_bwd(q_ptr, sk_ptr, sv_ptr, pk_ptr, pv_ptr, out_ptr, do_ptr, lse_ptr, dq_ptr, dpk_ptr, dpv_ptr,
                  scale, H, N, NQ, P,
                  q_sb, q_sh, q_sr, sk_sb, sk_sh, sk_sn, sv_sb, sv_sh, sv_sn, p_sb, p_sh, p_sr, o_sb, o_sh, o_sr,
                  do_sb, do_sh, do_sr,
                  HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_P: tl.constexpr, IEEE: tl.constexpr):
    """Gradients of :func:`task_attn_fwd` for the queries and the private keys and values (the backbone's keys
    and values are frozen: no gradient), one program per (image, head), the backbone's K/V read once, in place.
    ``dq``, ``dpk``, ``dpv`` are contiguous ``(B, H, rows, hd)``."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < NQ
    dmask = d < HD
    q = _load_tile(q_ptr, b * q_sb + h * q_sh + rows * q_sr, rmask, d, dmask)
    o = _load_tile(out_ptr, b * o_sb + h * o_sh + rows * o_sr, rmask, d, dmask)
    do = _load_tile(do_ptr, b * do_sb + h * do_sh + rows * do_sr, rmask, d, dmask)
    lse = tl.load(lse_ptr + pid * BLOCK_M + rows)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    pcols = tl.arange(0, BLOCK_P)
    pmask = pcols < P
    pk, pv = _load_rows(pk_ptr, pv_ptr, b * p_sb + h * p_sh + pcols * p_sr, pmask, d, dmask)
    q = (q.to(tl.float32) * scale).to(q_ptr.dtype.element_ty)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        kk, vv, kmask = _backbone_block(sk_ptr + b * sk_sb + h * sk_sh, sv_ptr + b * sv_sb + h * sv_sh, sk_sn, sv_sn,
                                        start, N, d, dmask, BLOCK_N)
        p, ds = _grad_block(q, do, lse, delta, kk, vv, kmask, IEEE)
        dq += _dot(ds.to(kk.dtype), kk, IEEE)
    p, ds = _grad_block(q, do, lse, delta, pk, pv, pmask, IEEE)
    ds = tl.where(rmask[:, None], ds, 0.0)  # padded rows: no gradient
    p = tl.where(rmask[:, None], p, 0.0)
    dq += _dot(ds.to(pk.dtype), pk, IEEE)
    dpk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE)  # q is already scaled: d(scale * q k^T)/dk
    dpv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
    tl.store(dq_ptr + (pid * NQ + rows[:, None]) * HD + d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tile_p = pmask[:, None] & dmask[None, :]
    tl.store(dpk_ptr + (pid * P + pcols[:, None]) * HD + d[None, :], dpk.to(dpk_ptr.dtype.element_ty), mask=tile_p)
    tl.store(dpv_ptr + (pid * P + pcols[:, None]) * HD + d[None, :], dpv.to(dpv_ptr.dtype.element_ty), mask=tile_p)


@triton.jit
def row_gemm(x_ptr, w_ptr, b_ptr, idx_ptr, y_ptr, M, N, K, x_sb, x_sm, w_ss, w_sn, b_ss, y_sb, y_sm,
             HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """``y[b] = x[b] @ w[idx[b]].T (+ bias[idx[b]])``: every row of the batch with the weights of its own slot,
    read in place from the store (no gathered copy). One program per (row tile, column tile, image); the reduction
    runs over ``K`` in a fixed order, so an image's result never depends on the others or on the batch size."""
    pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(idx_ptr + b)  # int64: a store's slots are far apart
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + b * x_sb + rm[:, None] * x_sm
    w_cols = w_ptr + slot * w_ss + rn[None, :] * w_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(x_rows + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_cols + kk[:, None], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += _dot(a, w.to(a.dtype), IEEE)  # float32 weights under autocast: multiplied in the inputs' dtype
    if HAS_BIAS:
        acc += tl.load(b_ptr + slot * b_ss + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + b * y_sb + rm[:, None] * y_sm + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
