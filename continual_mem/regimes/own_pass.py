"""Own-pass regimes: the paper's full-attention baselines and Table 4, on a sequence of the task's own.

``memory``: class token(s) and per-layer memory with full attention (patches read the memory). ``input-memory``:
memory injected once at the input and propagated like ordinary tokens (Burtsev et al.). ``hybrid``: both.
``adapters``: Houlsby bottleneck adapters in every block, the backbone's own tokens and pooling.
``memory+adapters``: per-layer memory and adapters. Not preserving: each runs a pass of its own.
"""
from __future__ import annotations

from ..flops import own_sequence_flops
from ..own_ops import blocks_with_memory, own_logits, own_sequence
from ..reference_ops import own_sequence_reference
from .registry import register
from .spec import RegimeSpec


def own_pass(model, task, x):
    """timm's blocks on the task's own sequence, per-layer memory as extra keys/values, adapters where it has
    them; a task without tokens (adapters alone) keeps the backbone's own tokens and pooling."""
    bb = model.backbone
    h = model.embed(x)
    if task.tokens is None:
        return task.head(bb.forward_head(bb.norm(blocks_with_memory(bb, task, h, 0)), pre_logits=True))
    return own_logits(bb, task, blocks_with_memory(bb, task, own_sequence(task, h), 0))


def own_flops(model, task) -> tuple[int, int]:
    return own_sequence_flops(model, task), 0


def _own(name: str, summary: str, **parts) -> RegimeSpec:
    return RegimeSpec(name, "own", summary, own_flops, own_pass=own_pass, reference=own_sequence_reference, **parts)


register(
    _own("memory", "class token(s) and per-layer memory, full attention (own pass)", class_tokens=True,
         layer_memory=True),
    _own("input-memory", "memory injected at the input and propagated (own pass)", class_tokens=True,
         input_memory=True),
    _own("hybrid", "per-layer and input memory (own pass)", class_tokens=True, layer_memory=True, input_memory=True),
    _own("adapters", "Houlsby bottleneck adapters in every block (own pass)", adapters=True),
    _own("memory+adapters", "per-layer memory and adapters in every block (own pass)", class_tokens=True,
         layer_memory=True, adapters=True),
)
