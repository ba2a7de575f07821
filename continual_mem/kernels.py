"""Group attention of the fast path: each slot's few queries against [the backbone's K/V, read in place ‖ the slot's
own token and memory K/V], as one PyTorch expression (every device) or one fused Triton kernel (CUDA, by default).

The Triton kernel runs one program per (image, head) for a whole group: every slot's query rows read each block of
the backbone's keys and values once (in place, from timm's qkv output, no copy), with an online softmax over them
and then over each slot's own token and memory keys (block-diagonal masks; read in place too, memory never
expanded to the batch), accumulating in float32. Rows are independent (a row's result never depends on another
row's queries or keys), and the launch grid and every program's work depend on the group's capacity, never on which
slots are filled or how many groups exist, so the exactness rule of :func:`~continual_mem.layers.group_block` holds
for it too. It is the default on CUDA wherever Triton imports (``CONTINUAL_MEM_ATTENTION=torch`` turns it off); the
PyTorch expression serves the CPU and GPUs without Triton. Their numerics differ (compared with ``allclose``, like
the oracle); each is bit-stable as tasks are added. It is checked in Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``) and compiled on an H100 (``pytest -m gpu``). An earlier version, one program per slot, read
the backbone's K/V once per slot and gained nothing; this one is timed in the README ("Fused group attention").
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
    memory keys and values ``(1, H, S * m, hd)``, or None. Inputs are read in place with their strides (last
    dimension contiguous), so no concatenation, scaling or K/V copy runs before the kernel; the output is laid
    out ``(B, S * n, H, hd)`` so the block's head merge after it is a view. Returns ``(B, H, S * n, hd)``."""
    import triton

    B, H, rows, hd = q.shape
    N = shared_k.shape[2]
    q, sk, sv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, shared_k, shared_v))
    tok_k, tok_v = _same_layout(tok_k, tok_v)
    mem = 0 if mem_k is None else mem_k.shape[2]
    mem_k, mem_v = _same_layout(mem_k, mem_v) if mem else (tok_k, tok_v)  # unread without memory
    out = torch.empty(B, rows, H, hd, device=q.device, dtype=shared_v.dtype)
    _kernel()[(B * H,)](
        q, tok_k, tok_v, sk, sv, mem_k, mem_v, out, scale, H, N, rows, mem,
        *q.stride()[:3], *tok_k.stride()[:3], *sk.stride()[:3], *sv.stride()[:3], *mem_k.stride()[1:3],
        out.stride(0), out.stride(2), out.stride(1),
        N_Q=rows // slots, M_PER=max(1, mem // slots), HD=hd, BLOCK_M=max(16, triton.next_power_of_2(rows)),
        BLOCK_D=max(16, triton.next_power_of_2(hd)), BLOCK_N=64,
        BLOCK_MEM=max(16, triton.next_power_of_2(mem)) if mem else 0, IEEE=q.dtype == torch.float32)
    return out.permute(0, 2, 1, 3)


def _same_layout(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values the kernel can address with one set of strides (views of one qkv output already are)."""
    if k.stride(-1) == 1 and k.stride() == v.stride():
        return k, v
    return k.contiguous(), v.contiguous()


def _kernel():
    """The Triton kernel (its module is imported on first use: importing this one never needs Triton)."""
    from ._triton_kernels import group_attn

    return group_attn
