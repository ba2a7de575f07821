"""Building blocks of private passes (a late fork's branch, the own-pass regimes), on timm's own blocks.

Nothing here touches the shared pass, which is why a private pass may do anything. Tasks are read duck-typed
(``TaskModule``'s ``block_at``, ``memory_at``, ``adapters_at``, ``tokens``, ``input_memory``, ``head``), so the
regime modules can use these without importing the model.
"""
from __future__ import annotations

import functools

import torch

from .layers import adapted_block


def blocks_with_memory(bb, task, h: torch.Tensor, start: int) -> torch.Tensor:
    """Blocks ``start..depth-1`` of timm's own code on ``h`` (the task's fine-tuned copy where it has one, its
    adapters where it has them); where the task has per-layer memory, everyone attends to it and its outputs are
    dropped."""
    B, keep = h.shape[0], h.shape[1]
    for i in range(start, len(bb.blocks)):
        blk = task.block_at(i, bb)
        mem = task.memory_at(i) if task.memory is not None else None
        pair = task.adapters_at(i)
        run = blk if pair is None else functools.partial(adapted_block, blk, *pair)
        h = run(h) if mem is None else run(torch.cat([h, mem.expand(B, -1, -1)], dim=1))[:, :keep]
    return h


def own_sequence(task, h: torch.Tensor) -> torch.Tensor:
    """An own pass's opening sequence from the embedded ``h = [CLS, registers, patches]``: the task's class tokens
    take the class token's place (patches attend to them), propagated input memory goes last."""
    B = h.shape[0]
    h = torch.cat([task.tokens.expand(B, -1, -1), h[:, 1:]], dim=1)
    if task.input_memory is not None:  # propagated memory: ordinary tokens from here on
        h = torch.cat([h, task.input_memory.expand(B, -1, -1)], dim=1)
    return h


def own_logits(bb, task, h: torch.Tensor) -> torch.Tensor:
    """The head on the final norm states of the task's tokens, averaged, through the backbone's fc_norm."""
    return task.head(bb.fc_norm(bb.norm(h)[:, : task.config.task_tokens].mean(dim=1)))


def pool_tokens(bb, tokens: torch.Tensor, task) -> torch.Tensor:
    """Final norm, average over the task's tokens, fc_norm, head: ``(B, n, D) -> (B, classes)``."""
    return task.head(bb.fc_norm(bb.norm(tokens).mean(dim=1)))
