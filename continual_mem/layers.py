"""The per-task block computation of the fast path.

A task's query tokens go through a frozen timm ``Block``'s own sub-modules (norm1, qkv, q/k norm, proj, ls1,
norm2, mlp, ls2) and attend to a key set assembled by the caller: the backbone's K/V of that layer, the
task's own tokens and memory (and, in extension mode, earlier tasks' tokens and memory). The shapes here
depend only on the task itself, never on how many tasks the model holds.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block

from .backbone import split_qkv
from .kernels import group_attention_torch, group_attention_triton, task_attention_triton, task_kernel_fits


def memory_kv(blk: Block, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of memory tokens ``(1, m, D)`` at one block: ``(1, H, m, hd)`` each. Image-independent."""
    _, k, v = split_qkv(blk.attn, blk.attn.qkv(blk.norm1(memory)))
    return k, v


def attend(
    q: torch.Tensor,
    shared_k: torch.Tensor,
    shared_v: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Softmax attention of ``q`` over [shared keys, private keys] without copying the shared ones.

    The backbone's K/V (``shared_k``, ``shared_v``: ``(B, H, N, hd)``) are read in place by every task; only the
    task's few private keys (its tokens, memory, earlier tasks') are concatenated. Concatenating the backbone K/V
    per task instead was measured at 43% of GPU time with 10 tasks (benchmarks/profile_single_pass.py).
    """
    B = q.shape[0]
    k = torch.cat([t.expand(B, -1, -1, -1) for t in keys], dim=2)  # (B, H, S, hd), S small
    v = torch.cat([t.expand(B, -1, -1, -1) for t in values], dim=2)
    q = q * scale
    n_shared = shared_k.shape[2]
    scores = torch.cat([q @ shared_k.transpose(-2, -1), q @ k.transpose(-2, -1)], dim=-1)  # (B, H, n, N + S)
    p = scores.softmax(dim=-1).to(v.dtype)
    return p[..., :n_shared] @ shared_v + p[..., n_shared:] @ v


def task_block(
    blk: Block,
    tokens: torch.Tensor,
    shared_k: torch.Tensor,
    shared_v: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    *,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advance a task's tokens through one block.

    Args:
        blk: The frozen timm block.
        tokens: ``(B, n, D)`` the task's token states entering the block.
        shared_k: The backbone's keys at this block, ``(B, H, N, hd)`` (contiguous, shared by all tasks).
        shared_v: The backbone's values.
        keys: Further context keys ``(B|1, H, *, hd)`` (memory, earlier tasks); the task's own token keys
            are put first.
        values: Matching values.
        fused: Use the fused Triton attention (the call's plan decides: ``Paths.fused_task``) where the task fits
            one kernel program (:func:`~continual_mem.kernels.task_kernel_fits`), else the PyTorch expression.

    Returns:
        The new token states ``(B, n, D)`` and the tokens' own keys and values ``(B, H, n, hd)``.
    """
    h = blk.norm1(tokens)
    q, k, v = split_qkv(blk.attn, blk.attn.qkv(h))  # (B, H, n, hd)
    private = k.shape[2] + sum(t.shape[2] for t in keys)
    if fused and task_kernel_fits(queries=k.shape[2], private=private):
        B = tokens.shape[0]  # fused forward and backward, the backbone's K/V read in place
        own_k = torch.cat([t.expand(B, -1, -1, -1).to(q.dtype) for t in (k, *keys)], dim=2)
        own_v = torch.cat([t.expand(B, -1, -1, -1).to(q.dtype) for t in (v, *values)], dim=2)
        out = task_attention_triton(q, shared_k, shared_v, own_k, own_v, blk.attn.scale)
    else:
        out = attend(q, shared_k, shared_v, [k, *keys], [v, *values], blk.attn.scale)
    return _finish(blk, tokens, h, out), k, v


def group_block(
    blk: Block,
    tokens: torch.Tensor,
    shared_k: torch.Tensor,
    shared_v: torch.Tensor,
    memory_k: torch.Tensor | None,
    memory_v: torch.Tensor | None,
    slots: int,
    *,
    triton: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advance a fixed-capacity group of tasks through one block in one set of kernels.

    Slot ``s`` owns tokens ``[s*n, (s+1)*n)`` and memory ``[s*m, (s+1)*m)``; it attends to the backbone's K/V
    (read once for the whole group) and to its own tokens and memory only. Every kernel's shape depends on the
    capacity ``slots``, never on how many slots are filled, and each slot is an independent block of rows, so
    filling another slot cannot change a slot's bits.

    Args:
        blk: The frozen timm block.
        tokens: ``(B, slots * n, D)`` token states of every slot (zeros in empty slots).
        shared_k: The backbone's keys at this block, ``(B, H, N, hd)``.
        shared_v: The backbone's values.
        memory_k: ``(1, H, slots * m, hd)`` every slot's memory keys at this block, or None; ``(B, H, slots * m,
            hd)``, one set per row, for a routed group (:mod:`continual_mem.routed`).
        memory_v: Matching values.
        slots: The group's capacity.
        triton: Run the fused Triton kernel (the call's plan decides: ``Paths.triton``), else the PyTorch
            expression.

    Returns:
        New token states ``(B, slots * n, D)`` and the tokens' keys and values ``(B, H, slots * n, hd)``.
    """
    attn = blk.attn
    B, L, _ = tokens.shape
    n, H, hd = L // slots, attn.num_heads, attn.head_dim
    h = blk.norm1(tokens)
    q, k, v = split_qkv(attn, attn.qkv(h))  # (B, H, slots * n, hd)
    if triton:  # scaling and every K/V read in place, inside the kernel
        out = group_attention_triton(q, shared_k, shared_v, k, v, memory_k, memory_v, slots=slots, scale=attn.scale)
        return _finish(blk, tokens, h, out), k, v
    q = q * attn.scale
    own_k, own_v = k.view(B, H, slots, n, hd), v.view(B, H, slots, n, hd)
    if memory_k is not None:
        m = memory_k.shape[2] // slots
        # one memory for every row (a group), or one per row (a routed group): the same values either way
        own_k = torch.cat([own_k, memory_k.view(-1, H, slots, m, hd).expand(B, -1, -1, -1, -1)], dim=3)
        own_v = torch.cat([own_v, memory_v.view(-1, H, slots, m, hd).expand(B, -1, -1, -1, -1)], dim=3)
    out = group_attention_torch(q.view(B, H, slots, n, hd), shared_k, shared_v, own_k, own_v)  # (B, H, L, hd)
    return _finish(blk, tokens, h, out), k, v


def _finish(blk: Block, tokens: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rest of the block after attention (``out``: ``(B, H, L, hd)``): head merge, proj, residuals, MLP."""
    attn = blk.attn
    B, L, _ = tokens.shape
    out = attn.norm(out.transpose(1, 2).reshape(B, L, attn.num_heads * attn.head_dim))
    gate = getattr(attn, "gate", None)  # timm >= 1.0.30
    if gate is not None:
        out = out * gate(h).sigmoid()
    tokens = tokens + blk.ls1(attn.proj(out))
    return tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))


def adapted_block(blk: Block, after_attn, after_mlp, x: torch.Tensor) -> torch.Tensor:
    """timm's pre-norm ``Block`` with an adapter on the attention and on the MLP output, before each residual add
    (Houlsby et al. 2019): the block's own sub-modules, in its order. With identity adapters it is ``blk(x)``
    bit for bit."""
    x = x + blk.drop_path1(blk.ls1(after_attn(blk.attn(blk.norm1(x)))))
    return x + blk.drop_path2(blk.ls2(after_mlp(blk.mlp(blk.norm2(x)))))
