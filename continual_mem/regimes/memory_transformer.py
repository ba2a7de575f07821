"""The Memory Transformer's ablations (Burtsev et al. 2020) on propagated input memory, own pass.

``mem-ctrl``: the frozen block updates the sequence (which reads the memory), a dedicated trainable copy of each
block (the controller) updates the memory. ``mem-bottleneck``: sequence tokens attend only to memory (no
token-to-token attention), memory to everything.
"""
from __future__ import annotations

import torch

from ..flops import own_sequence_flops
from ..own_ops import own_logits, own_sequence
from ..reference_ops import own_sequence_reference
from .registry import register
from .spec import RegimeSpec


def bottleneck_mask(n_seq: int, n_mem: int, device=None) -> torch.Tensor:
    """MemBottleneck's boolean mask (True = may attend), rows are queries: sequence -> memory only, memory -> all."""
    n = n_seq + n_mem
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:, n_seq:] = True
    mask[n_seq:, :] = True
    return mask


def bottleneck_pass(model, task, x: torch.Tensor) -> torch.Tensor:
    bb = model.backbone
    h = own_sequence(task, model.embed(x))
    n_seq = h.shape[1] - task.config.input_memory
    mask = bottleneck_mask(n_seq, h.shape[1] - n_seq, h.device)
    for blk in bb.blocks:
        h = blk(h, attn_mask=mask)
    return own_logits(bb, task, h)


def controller_pass(model, task, x: torch.Tensor) -> torch.Tensor:
    bb = model.backbone
    h = own_sequence(task, model.embed(x))
    n_seq = h.shape[1] - task.config.input_memory
    for blk, ctrl in zip(bb.blocks, task.controllers):
        h = torch.cat([blk(h)[:, :n_seq], ctrl(h)[:, n_seq:]], dim=1)
    return own_logits(bb, task, h)


def bottleneck_reference(bb, task, x: torch.Tensor) -> torch.Tensor:
    def sequence_reads_memory_only(mask: torch.Tensor, n_seq: int) -> None:
        mask[:n_seq, :n_seq] = False

    return own_sequence_reference(bb, task, x, mask_rule=sequence_reads_memory_only)


def controller_reference(bb, task, x: torch.Tensor) -> torch.Tensor:
    def controller_writes_memory(new, seq, mask, layer: int, n_seq: int) -> torch.Tensor:
        return torch.cat([new[:, :n_seq], task.controllers[layer](seq, attn_mask=mask)[:, n_seq:]], dim=1)

    return own_sequence_reference(bb, task, x, block_rule=controller_writes_memory)


register(
    RegimeSpec("mem-ctrl", "own", "propagated memory updated by a trainable copy of each block (own pass)",
               lambda model, task: (own_sequence_flops(model, task, block_copies=2), 0), class_tokens=True,
               input_memory=True, controllers=True, own_pass=controller_pass, reference=controller_reference),
    RegimeSpec("mem-bottleneck", "own", "propagated memory; the sequence attends to memory only (own pass)",
               lambda model, task: (own_sequence_flops(model, task), 0), class_tokens=True, input_memory=True,
               own_pass=bottleneck_pass, reference=bottleneck_reference, own_mask=bottleneck_mask),
)
