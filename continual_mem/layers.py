"""The per-task block computation of the fast path.

A task's query tokens go through a frozen timm ``Block``'s own sub-modules (norm1, qkv, q/k norm, proj, ls1,
norm2, mlp, ls2) and attend to a key set assembled by the caller: the backbone's K/V of that layer, the
task's own tokens and memory (and, in extension mode, earlier tasks' tokens and memory). The shapes here
depend only on the task itself, never on how many tasks the model holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .backbone import split_qkv


def memory_kv(blk: Block, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of memory tokens ``(1, m, D)`` at one block: ``(1, H, m, hd)`` each. Image-independent."""
    _, k, v = split_qkv(blk.attn, blk.attn.qkv(blk.norm1(memory)))
    return k, v


def task_block(
    blk: Block,
    tokens: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advance a task's tokens through one block.

    Args:
        blk: The frozen timm block.
        tokens: ``(B, n, D)`` the task's token states entering the block.
        keys: Context keys, first the backbone's ``(B, H, N, hd)``, then any ``(B|1, H, *, hd)`` (memory,
            earlier tasks). The task's own token keys are inserted right after the backbone's.
        values: Matching values.

    Returns:
        The new token states ``(B, n, D)`` and the tokens' own keys and values ``(B, H, n, hd)``.
    """
    attn = blk.attn
    B, n, _ = tokens.shape
    h = blk.norm1(tokens)
    q, k, v = split_qkv(attn, attn.qkv(h))  # (B, H, n, hd)
    ks = [keys[0], k] + [t.expand(B, -1, -1, -1) for t in keys[1:]]
    vs = [values[0], v] + [t.expand(B, -1, -1, -1) for t in values[1:]]
    out = F.scaled_dot_product_attention(q, torch.cat(ks, dim=2), torch.cat(vs, dim=2), scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(B, n, attn.num_heads * attn.head_dim))
    gate = getattr(attn, "gate", None)  # timm >= 1.0.30
    if gate is not None:
        out = out * gate(h).sigmoid()
    tokens = tokens + blk.ls1(attn.proj(out))
    tokens = tokens + blk.ls2(blk.mlp(blk.norm2(tokens)))
    return tokens, k, v
