"""Group attention of the fast path: each slot's few queries against [the backbone's K/V, read in place ‖ the slot's
own token and memory K/V], as one PyTorch expression (every device) or one fused Triton kernel (CUDA, by default);
the per-task path's fused attention with its backward (:func:`task_attention_triton`); and the fused row kernel
of the stacked path (residual add with layer scale, then layer norm).

The Triton kernel runs one program per (image, head) for a group, or for a pack of groups on the stacked path
(:mod:`continual_mem.stacked`): every query row reads each block of the backbone's keys and values once (in place,
from timm's qkv output, no copy), with an online softmax over them and then over its slot's own token and memory
keys (block-diagonal masks; read in place too, memory never expanded to the batch), accumulating in float32. Rows
are independent (a row's result never depends on another row's queries or keys, masked keys weigh exactly zero),
and every program's tiles depend on the group's capacity and the pack size, never on which slots are filled or how
many groups exist, so the exactness rule of :func:`~continual_mem.layers.group_block` holds for it too. It is the
default on CUDA wherever Triton imports (``CONTINUAL_MEM_ATTENTION=torch`` turns it off); the PyTorch expression
serves the CPU and GPUs without Triton. Their numerics differ (compared with ``allclose``, like the oracle); each is
bit-stable as tasks are added. It is checked in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``) and
compiled on an H100 (``pytest -m gpu``). The kernel is bound by latency, not bytes or arithmetic: packing four
groups into one 16-row tile and one or two warps per program halved its time on an H100
(``benchmarks/attention_configs.py``).
"""
from __future__ import annotations

import os

import torch

ENV = "CONTINUAL_MEM_ATTENTION"


def use_triton(device: torch.device, requested: str | None = None) -> bool:
    """Policy (``CONTINUAL_MEM_ATTENTION``): ``auto`` (default) takes the Triton kernel on CUDA when Triton imports
    and PyTorch elsewhere; ``torch`` never takes it; ``triton`` takes it on CUDA or under Triton's interpreter
    (``TRITON_INTERPRET=1``, for CPU tests)."""
    requested = (requested if requested is not None else os.environ.get(ENV, "auto")).lower()
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"{ENV} must be auto, torch or triton, got {requested!r}")
    if requested == "torch":
        return False
    interpret = requested == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        return False
    try:  # a dictionary lookup once imported (no functools.cache: torch.compile traces this function)
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


MAX_QUERIES, MAX_PRIVATE = 16, 256  # query rows and private keys one program of the per-task kernel holds


def fused_task_attention(device: torch.device, queries: int = 1, private: int = 0) -> bool:
    """Policy for the per-task path (a task outside a group, or any task while it trains): the fused Triton
    attention, forward and backward, wherever :func:`use_triton` holds, except inside ``torch.compile`` (a compiled
    per-task path traces the PyTorch expression) and for more than ``MAX_QUERIES`` query rows or ``MAX_PRIVATE``
    private keys (they take the PyTorch expression too)."""
    return task_kernel_fits(queries, private) and use_triton(device) and not torch.compiler.is_compiling()


def task_kernel_fits(queries: int, private: int) -> bool:
    """Whether one program of the per-task kernel holds a task's query rows and private keys."""
    return queries <= MAX_QUERIES and private <= MAX_PRIVATE


def group_attention_torch(q: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor, own_k: torch.Tensor,
                          own_v: torch.Tensor) -> torch.Tensor:
    """``q``: ``(B, H, S, n, hd)`` scaled queries; ``shared_*``: ``(B, H, N, hd)``; ``own_*``: ``(B, H, S, P, hd)``.
    Returns ``(B, H, S * n, hd)``."""
    B, H, S, n, hd = q.shape
    N = shared_k.shape[2]
    shared = (q.reshape(B, H, S * n, hd) @ shared_k.transpose(-2, -1)).view(B, H, S, n, N)
    private = q @ own_k.transpose(-2, -1)  # (B, H, S, n, P)
    p = torch.cat([shared, private], dim=-1).softmax(dim=-1).to(shared_v.dtype)
    return p[..., :N].reshape(B, H, S * n, N) @ shared_v + (p[..., N:] @ own_v).reshape(B, H, S * n, hd)


def group_attention_triton(q: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor, tok_k: torch.Tensor,
                           tok_v: torch.Tensor, mem_k: torch.Tensor | None, mem_v: torch.Tensor | None, *,
                           slots: int, scale: float) -> torch.Tensor:
    """The fused kernel: one program per (image, head) for the whole group.

    ``q``, ``tok_k``, ``tok_v``: the group's unscaled queries and its tokens' keys and values, ``(B, H, S * n, hd)``
    (views of the block's qkv output); ``shared_*``: the backbone's ``(B, H, N, hd)``; ``mem_*``: every slot's
    memory keys and values ``(1, H, S * m, hd)``, or one set per image ``(B, H, S * m, hd)`` (a routed group), or
    None. Inputs are read in place with their strides (last
    dimension contiguous), so no concatenation, scaling or K/V copy runs before the kernel; the output is laid
    out ``(B, S * n, H, hd)`` so the block's head merge after it is a view. Returns ``(B, H, S * n, hd)``."""
    B, H, rows, hd = q.shape
    N = shared_k.shape[2]
    q, sk, sv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, shared_k, shared_v))
    tok_k, tok_v = _same_layout(tok_k, tok_v)
    mem = 0 if mem_k is None else mem_k.shape[2]
    mem_k, mem_v = _same_layout(mem_k, mem_v) if mem else (tok_k, tok_v)  # unread without memory
    out = torch.empty(B, rows, H, hd, device=q.device, dtype=shared_v.dtype)
    _launch(q.unsqueeze(0), tok_k.unsqueeze(0), tok_v.unsqueeze(0), sk, sv, mem_k, mem_v,
            out.permute(0, 2, 1, 3).unsqueeze(0), mem=mem, slots=slots, scale=scale, pack=1,
            launch=attention_launch(rows, N, mem))
    return out.permute(0, 2, 1, 3)


def attention_launch(rows: int, keys: int, private: int = 0) -> dict:
    """Launch configuration of the group-attention kernel for ``rows`` query rows and ``private`` private (token
    and memory) keys per program, and ``keys`` backbone keys (policy; shapes only, so it never changes with the
    number of groups). Tiny tiles want one or two warps: the kernel is bound by latency, not arithmetic
    (``benchmarks/attention_configs.py``, H100); large private tiles get four, to keep them in registers."""
    if rows >= 16:  # a pack of groups (the stacked path)
        launch = {"BLOCK_N": 64, "num_warps": 2, "num_stages": 3 if keys > 64 else 2}
    else:
        launch = {"BLOCK_N": 32, "num_warps": 1, "num_stages": 3}
    if private > 128:
        launch["num_warps"] = 4
    return launch


def pack_size(rows: int, private: int = 0) -> int:
    """Groups per program of the stacked launch (policy, by a group's query rows and private memory keys only):
    enough to fill the 16-row minimum of a tensor-core tile, so the backbone's K/V are read once for all of them,
    and no more than 128 memory keys per program."""
    pack = max(1, 16 // rows)
    while pack > 1 and pack * private > 128:
        pack //= 2
    return pack


def stacked_attention_triton(qkv: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor,
                             mem_k: torch.Tensor | None, mem_v: torch.Tensor | None, out: torch.Tensor, *,
                             slots: int, scale: float, pack: int | None = None, launch: dict | None = None) -> None:
    """The fused kernel over several groups in one launch (:mod:`continual_mem.stacked`): one program per (image,
    head, pack of groups); each program's tiles are fixed by ``pack`` (default :func:`pack_size`), so a group's
    bits never depend on how many groups there are.

    ``qkv``: the groups' qkv outputs ``(G, B, L, 3, H, hd)`` (groups any stride apart; ``L = slots * n``);
    ``shared_*``: the backbone's ``(B, H, N, hd)``; ``mem_*``: every group's memory keys and values, group after
    group, ``(1, H, G * slots * m, hd)``, or None; ``out``: ``(G, B, L, H, hd)``, written."""
    G, B, L, _, H, hd = qkv.shape
    if qkv.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("qkv and out need a contiguous last dimension")
    sk, sv = (t if t.stride(-1) == 1 else t.contiguous() for t in (shared_k, shared_v))
    q, k, v = qkv.unbind(3)  # (G, B, L, H, hd) each, one set of strides
    mem = 0 if mem_k is None else mem_k.shape[2] // G
    pack = pack or pack_size(L, mem)
    launch = launch or attention_launch(pack * L, sk.shape[2], pack * mem)
    _launch(*(t.permute(0, 1, 3, 2, 4) for t in (q, k, v)), sk, sv, mem_k, mem_v, out.permute(0, 1, 3, 2, 4),
            mem=mem, slots=slots, scale=scale, pack=pack, launch=launch)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor,
            mem_k: torch.Tensor | None, mem_v: torch.Tensor | None, out: torch.Tensor, *, mem: int, slots: int,
            scale: float, pack: int, launch: dict) -> None:
    """``q``, ``k``, ``v`` (``k``'s strides), ``out``: ``(G, B, H, L, hd)`` views; ``mem``: memory rows per
    group."""
    import triton

    from ._triton_kernels import group_attn

    G, B, H, L, hd = q.shape
    if not mem:
        mem_k, mem_v = sk, sv  # never read
    group_attn[(B * H * -(-G // pack),)](
        q, k, v, sk, sv, mem_k, mem_v, out, scale, H, sk.shape[2], G, mem,
        *q.stride()[:4], *k.stride()[:4], *sk.stride()[:3], *sv.stride()[:3],
        mem_k.stride(0) if mem_k.shape[0] > 1 else 0, *mem_k.stride()[1:3],
        *out.stride()[:4],
        L=L, PACK=pack, N_Q=L // slots, M_PER=max(1, mem // slots), HD=hd,
        BLOCK_M=max(16, triton.next_power_of_2(pack * L)), BLOCK_D=max(16, triton.next_power_of_2(hd)),
        BLOCK_MEM=max(16, triton.next_power_of_2(pack * mem)) if mem else 0, IEEE=q.dtype == torch.float32, **launch)


def add_layer_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, gamma: torch.Tensor | None,
                          norm: torch.nn.LayerNorm | None, h: torch.Tensor) -> None:
    """Row-wise, every group in one launch: ``x += gamma * delta`` in place (when ``delta`` is given), then
    ``h = norm(x)`` (when ``norm`` is given). ``x``, ``delta``, ``h``: ``(G, R, D)``, rows contiguous, ``x`` and
    ``delta`` laid out alike."""
    import triton

    from ._triton_kernels import add_layer_norm

    G, R, D = x.shape
    if x.stride(1) != D or x.stride(2) != 1 or h.stride()[1:] != (D, 1):
        raise ValueError("x and h need contiguous rows")
    if delta is not None and delta.stride() != x.stride():
        raise ValueError("delta must be laid out like x")
    block = triton.next_power_of_2(D)
    w, b, eps = (norm.weight, norm.bias, norm.eps) if norm is not None else (x, x, 0.0)
    add_layer_norm[(R, G)](
        x, delta if delta is not None else x, gamma if gamma is not None else x, w, b, h, D, x.stride(0),
        h.stride(0), eps, HAS_DELTA=delta is not None, HAS_GAMMA=gamma is not None, HAS_NORM=norm is not None,
        BLOCK_D=block, num_warps=4 if block <= 1024 else 8)


def task_attention_triton(q: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor, own_k: torch.Tensor,
                          own_v: torch.Tensor, scale: float) -> torch.Tensor:
    """One task's queries ``(B, H, n, hd)`` (unscaled) against [the backbone's ``(B, H, N, hd)`` keys and values,
    read in place ‖ the task's private ones ``(B, H, P, hd)``], every query seeing every key; differentiable in
    ``q``, ``own_k`` and ``own_v`` (fused Triton forward and backward; the backbone's K/V are frozen and get no
    gradient). The per-task path's attention on CUDA, training included, within the sizes
    :func:`fused_task_attention` allows. Returns ``(B, H, n, hd)``."""
    return _TaskAttention.apply(q, shared_k, shared_v, own_k, own_v, scale)


class _TaskAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, sk, sv, pk, pv, scale):  # noqa: ANN001 (autograd signature)
        from ._triton_kernels import task_attn_fwd

        B, H, n, hd = q.shape
        sk, sv, q = (t if t.stride(-1) == 1 else t.contiguous() for t in (sk, sv, q))
        pk, pv = (t.to(q.dtype).contiguous() for t in (pk, pv))
        launch = _task_launch(n, pk.shape[2], hd, q.dtype)
        out = torch.empty(B, H, n, hd, device=q.device, dtype=sv.dtype)
        lse = torch.empty(B * H * launch["BLOCK_M"], device=q.device, dtype=torch.float32)
        task_attn_fwd[(B * H,)](
            q, sk, sv, pk, pv, out, lse, scale, H, sk.shape[2], n, pk.shape[2], *q.stride()[:3], *sk.stride()[:3],
            *sv.stride()[:3], *pk.stride()[:3], *out.stride()[:3], HD=hd, **launch)
        ctx.save_for_backward(q, sk, sv, pk, pv, out, lse)
        ctx.scale, ctx.launch = scale, launch
        return out

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001
        from ._triton_kernels import task_attn_bwd

        q, sk, sv, pk, pv, out, lse = ctx.saved_tensors
        B, H, n, hd = q.shape
        P = pk.shape[2]
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq = torch.empty(B, H, n, hd, device=q.device, dtype=q.dtype)
        dpk = torch.empty(B, H, P, hd, device=q.device, dtype=pk.dtype)
        dpv = torch.empty_like(dpk)
        task_attn_bwd[(B * H,)](
            q, sk, sv, pk, pv, out, dout, lse, dq, dpk, dpv, ctx.scale, H, sk.shape[2], n, P, *q.stride()[:3],
            *sk.stride()[:3], *sv.stride()[:3], *pk.stride()[:3], *out.stride()[:3], *dout.stride()[:3], HD=hd,
            **ctx.launch)
        return dq, None, None, dpk, dpv, None


def _task_launch(n: int, private: int, hd: int, dtype: torch.dtype) -> dict:
    """Tiles and launch configuration of the per-task kernels (forward and backward alike)."""
    import triton

    return {"BLOCK_M": max(16, triton.next_power_of_2(n)), "BLOCK_P": max(16, triton.next_power_of_2(private)),
            "BLOCK_D": max(16, triton.next_power_of_2(hd)), "BLOCK_N": 32, "IEEE": dtype == torch.float32,
            "num_warps": 1 if private <= 64 else 4, "num_stages": 3}


def _same_layout(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values the kernel can address with one set of strides (views of one qkv output already are)."""
    if k.stride(-1) == 1 and k.stride() == v.stride():
        return k, v
    return k.contiguous(), v.contiguous()



def row_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      idx: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, M, K)``, row ``b`` through the linear layer ``weight[idx[b]]`` ``(N, K)`` (plus
    ``bias[idx[b]]``), ``weight`` ``(S, N, K)`` and ``bias`` ``(S, N)`` read in place (a slot store's views,
    :mod:`continual_mem.paging`). Returns ``(B, M, N)`` in ``x``'s dtype (autocast's, under autocast); tiles by
    :func:`row_gemm_launch`."""
    from ._triton_kernels import row_gemm

    B, M, K = x.shape
    N = weight.shape[1]
    if torch.is_autocast_enabled(x.device.type):  # as autocast runs a linear layer: in its dtype
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if x.stride(2) != 1:
        x = x.contiguous()
    if weight.stride(2) != 1 or (bias is not None and bias.stride(1) != 1):
        raise ValueError("weight and bias need contiguous rows")
    y = torch.empty(B, M, N, device=x.device, dtype=x.dtype)
    launch = row_gemm_launch(M, x.dtype)
    grid = (-(-M // launch["BLOCK_M"]), -(-N // launch["BLOCK_N"]), B)
    row_gemm[grid](x, weight, bias if bias is not None else weight, idx, y, M, N, K, x.stride(0), x.stride(1),
                   weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0, y.stride(0),
                   y.stride(1), HAS_BIAS=bias is not None, **launch)
    return y


def row_gemm_launch(rows: int, dtype: torch.dtype) -> dict:
    """Tiles of :func:`row_linear_triton` (policy, pure): they depend on an image's row count and the dtype only,
    never on the batch."""
    return {"BLOCK_M": 64 if rows <= 64 else 128, "BLOCK_N": 128, "BLOCK_K": 64, "IEEE": dtype == torch.float32,
            "num_warps": 8, "num_stages": 3}
