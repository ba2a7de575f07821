"""The test oracle's building blocks, written from the paper's equations on timm's blocks with explicit masks.

Shared by :mod:`continual_mem.reference` (the masked shared pass) and each own-pass regime's oracle. They read
the backbone and a task's parameters and call nothing of the fast path (no ``MemoryViT`` method, no
:mod:`continual_mem.own_ops`), so a test comparing the two can disagree.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer


def embed(bb: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm's embedding steps: ``[CLS, registers, patches]`` entering block 0."""
    return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))


def memory(task, layer: int) -> torch.Tensor | None:
    """The task's per-layer memory ``(1, m, D)`` at ``layer``, from its parameter and its config's layer list."""
    layers = task.config.layers
    return None if task.memory is None or layer not in layers else task.memory[layers.index(layer)][None]


def adapters(task, layer: int, depth: int):
    """The task's (after-attention, after-MLP) adapters at ``layer``: every block for the adapter regimes, the
    fork's blocks for a forked token task (the order the parameters were made in)."""
    if task.adapters is None:
        return None
    first = depth - len(task.adapters) // 2
    return None if layer < first else (task.adapters[2 * (layer - first)], task.adapters[2 * (layer - first) + 1])


def block(task, layer: int, bb: VisionTransformer):
    """The block a forked task's branch runs at ``layer``: its fine-tuned copy, else the backbone's."""
    if task.blocks is None:
        return bb.blocks[layer]
    return task.blocks[layer - (len(bb.blocks) - len(task.blocks))]


def block_with_row_adapters(blk, x: torch.Tensor, mask: torch.Tensor | None, adapted: list) -> torch.Tensor:
    """timm's block on the whole sequence, each task's adapters applied to its own rows (``None``: every row)."""
    def rows(y: torch.Tensor, k: int) -> torch.Tensor:
        y = y.clone()
        for idx, pair in adapted:
            if idx is None:
                y = pair[k](y)
            else:
                y[:, idx] = pair[k](y[:, idx])
        return y

    x = x + blk.drop_path1(blk.ls1(rows(blk.attn(blk.norm1(x), attn_mask=mask), 0)))
    return x + blk.drop_path2(blk.ls2(rows(blk.mlp(blk.norm2(x)), 1)))


def pool(bb: VisionTransformer, task, tokens: torch.Tensor) -> torch.Tensor:
    """Final norm states of the task's tokens ``(B, n, D)`` averaged, fc_norm, head."""
    return task.head(bb.fc_norm(tokens.mean(dim=1)))


# (mask, sequence rows) -> None: a regime's change to the own sequence's mask, in place
MaskRule = Callable[[torch.Tensor, int], None]
# (block output, block input, mask, layer, sequence rows) -> block output: a regime's change to a block's result
BlockRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


@torch.no_grad()
def own_sequence_reference(bb: VisionTransformer, task, x: torch.Tensor, *, mask_rule: MaskRule | None = None,
                           block_rule: BlockRule | None = None) -> torch.Tensor:
    """An own-pass task's logits from one sequence of its own, ``[task tokens, registers, patches, input memory,
    memory of layer i]``, everyone attending to everything (memory rows only keep the softmax finite) except as
    ``mask_rule`` says; ``block_rule`` may replace rows of a block's output. A task without tokens (adapters
    alone) keeps the backbone's own tokens and pooling, every row adapted."""
    depth = len(bb.blocks)
    h = embed(bb, x)
    B = h.shape[0]
    if task.tokens is None:
        for i, blk in enumerate(bb.blocks):
            h = block_with_row_adapters(blk, h, None, [(None, adapters(task, i, depth))])
        return task.head(bb.forward_head(bb.norm(h), pre_logits=True))
    parts = [task.tokens.expand(B, -1, -1), h[:, 1:]]  # the task's tokens take the class token's place
    if task.input_memory is not None:
        parts.append(task.input_memory.expand(B, -1, -1))
    h = torch.cat(parts, dim=1)
    n_seq = h.shape[1] - (task.config.input_memory if task.input_memory is not None else 0)
    for i, blk in enumerate(bb.blocks):
        keep = h.shape[1]
        mem = memory(task, i)
        seq = h if mem is None else torch.cat([h, mem.expand(B, -1, -1)], dim=1)
        n = seq.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device)
        mask[keep:] = False
        mask[keep:, keep:] = torch.eye(n - keep, dtype=torch.bool, device=x.device)  # memory: a key, never a query
        if mask_rule is not None:
            mask_rule(mask, n_seq)
        pair = adapters(task, i, depth)
        new = blk(seq, attn_mask=mask) if pair is None else block_with_row_adapters(blk, seq, mask, [(None, pair)])
        if block_rule is not None:
            new = block_rule(new, seq, mask, i, n_seq)
        h = new[:, :keep]
    return pool(bb, task, bb.norm(h)[:, : task.config.task_tokens])
