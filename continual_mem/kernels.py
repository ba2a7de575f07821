"""Group attention of the fast path: each slot's few queries against [the backbone's K/V, read in place ‖ the slot's
own token and memory K/V], as one PyTorch expression (every device) or one fused Triton kernel (opt-in, CUDA).

The Triton kernel runs one program per (image, head) for a whole group: every slot's query rows read each block of
the backbone's keys and values once (in place, from timm's qkv output, no copy), with an online softmax over them
and then over each slot's own private keys (a block-diagonal mask), accumulating in float32. Rows are independent
(a row's result never depends on another row's queries or keys), and the launch grid and every program's work
depend on the group's capacity, never on which slots are filled or how many groups exist, so the exactness rule of
:func:`~continual_mem.layers.group_block` holds for it too. The first version (one program per slot, each reading
the whole K/V) read it ``slots`` times per group and gained nothing over PyTorch on an H100. It is selected only where asked
(``CONTINUAL_MEM_ATTENTION=triton``) and the input is on a CUDA device; its numerics differ from the PyTorch
expression (compared with ``allclose``, like the oracle). It is checked in Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``) and compiled on an H100 (``pytest -m gpu``); timed there, it gains nothing over the
PyTorch expression (README, "Fused group attention").
"""
from __future__ import annotations

import os

import torch

ENV = "CONTINUAL_MEM_ATTENTION"


def use_triton(device: torch.device, requested: str | None = None) -> bool:
    """Policy: the Triton kernel only when asked for (``triton``) and the tensors live on CUDA, or when Triton's
    interpreter is on (``TRITON_INTERPRET=1``, for CPU tests); PyTorch otherwise."""
    requested = (requested if requested is not None else os.environ.get(ENV, "torch")).lower()
    if requested not in ("torch", "triton"):
        raise ValueError(f"{ENV} must be torch or triton, got {requested!r}")
    if requested != "triton":
        return False
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        return False
    try:
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


def group_attention(q, shared_k, shared_v, own_k, own_v) -> torch.Tensor:
    """:func:`group_attention_torch` or the Triton kernel, by :func:`use_triton`."""
    if use_triton(q.device):
        return group_attention_triton(q, shared_k, shared_v, own_k, own_v)
    return group_attention_torch(q, shared_k, shared_v, own_k, own_v)


def group_attention_triton(q, shared_k, shared_v, own_k, own_v) -> torch.Tensor:
    """The fused kernel: one program per (image, head) for the whole group. The backbone's K/V are read in place
    (any row stride: a view of timm's qkv output needs no copy); the output is laid out ``(B, S * n, H, hd)`` so
    the block's head merge that follows is a view."""
    import triton

    B, H, S, n, hd = q.shape
    N, P = shared_k.shape[2], own_k.shape[3]
    q_ = q.reshape(B, H, S * n, hd)
    q_, sk, sv = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_, shared_k, shared_v))
    ok, ov = own_k.contiguous(), own_v.contiguous()
    out = torch.empty(B, S * n, H, hd, device=q.device, dtype=shared_v.dtype)
    rows, priv = S * n, S * P
    _kernel()[(B * H,)](
        q_, sk, sv, ok, ov, out, H, N, rows, priv,
        q_.stride(0), q_.stride(1), q_.stride(2), sk.stride(0), sk.stride(1), sk.stride(2),
        sv.stride(0), sv.stride(1), sv.stride(2), out.stride(0), out.stride(2), out.stride(1),
        N_Q=n, P=P, HD=hd, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_D=max(16, triton.next_power_of_2(hd)),
        BLOCK_N=64, BLOCK_P=max(16, triton.next_power_of_2(priv)), IEEE=q.dtype == torch.float32)
    return out.permute(0, 2, 1, 3)


def _kernel():
    """The Triton kernel (its module is imported on first use: importing this one never needs Triton)."""
    from ._triton_kernels import group_attn

    return group_attn
