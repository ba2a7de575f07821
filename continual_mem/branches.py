"""A late fork's private branch: its stream (the backbone's registers and patches entering the fork block,
pooled or selected where asked) through the backbone's blocks or the task's fine-tuned copy, with memory and
adapters. It runs timm's own blocks and touches nothing of the shared pass, which is why it may do anything.
``model`` is the :class:`~continual_mem.model.MemoryViT` (its ``backbone`` and ``depth``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import split_qkv
from .own_ops import blocks_with_memory, pool_tokens
from .task import TaskModule


def branch(model, task: TaskModule, tokens: torch.Tensor, hidden: torch.Tensor, fork: int) -> torch.Tensor:
    """Late fork: blocks ``fork..depth-1`` on the task's private stream [its tokens, the backbone's registers and
    patches entering block ``fork``] through timm's own blocks, with full attention; per-layer memory is
    appended as extra tokens whose outputs are dropped (as in the own-pass regimes)."""
    h = torch.cat([tokens, private_stream(model, task, hidden)], dim=1)  # the task's tokens take the CLS's place
    h = blocks_with_memory(model.backbone, task, h, fork)
    return pool_tokens(model.backbone, h[:, : task.config.task_tokens], task)

def private_stream(model, task: TaskModule, hidden: torch.Tensor) -> torch.Tensor:
    """What a late-fork task's private stream starts from: the backbone's registers and patches entering the
    fork block (``hidden`` is ``[CLS, registers, patches]``), the patch grid average-pooled by ``fork_pool``
    when asked (position embeddings are already in the states, so pooling keeps them)."""
    p = task.config.fork_pool
    if task.config.fork_select:
        return select_patches(model, hidden, task.config.fork_select, model.depth - task.config.fork_layers)
    if p == (1, 1):
        return hidden[:, 1:]
    prefix = model.backbone.num_prefix_tokens
    patches = hidden[:, prefix:]
    B, _, D = patches.shape
    gh, gw = model.backbone.patch_embed.grid_size
    pooled = F.avg_pool2d(patches.transpose(1, 2).reshape(B, D, gh, gw), p)
    return torch.cat([hidden[:, 1:prefix], pooled.flatten(2).transpose(1, 2)], dim=1)

def select_patches(model, hidden: torch.Tensor, keep: int, block: int) -> torch.Tensor:
    """``[registers, the keep patches the class token attends to most at ``block``]``, patches in grid order:
    the class token's attention row of that block (softmax over every key, mean over heads), from the states
    entering it."""
    bb = model.backbone
    prefix = bb.num_prefix_tokens
    attn = bb.blocks[block].attn
    q, k, _ = split_qkv(attn, attn.qkv(bb.blocks[block].norm1(hidden)))  # (B, H, N, hd)
    row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, N)
    score = row[:, :, 0, prefix:].mean(dim=1)  # (B, patches)
    idx = score.topk(keep, dim=-1).indices.sort(dim=-1).values
    patches = hidden[:, prefix:].gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return torch.cat([hidden[:, 1:prefix], patches], dim=1)
