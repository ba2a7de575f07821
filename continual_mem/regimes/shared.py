"""The preserving regimes of the shared single pass (the paper's method and its baselines).

``head``: a linear head on the backbone's pooled features. ``head+cls``: the task's own class token(s) in the
shared pass. ``masked-memory``: class token(s) plus per-layer memory (keys/values only), masked so that the
backbone and every other task stay bit-exact (paper Table 1). Token tasks may fork late into a private branch
(``fork_layers``). Their forward is the model's shared pass; their oracle the masked sequence of
:mod:`continual_mem.reference`.
"""
from __future__ import annotations

from ..flops import adapter_flops, block_flops, dims, head_flops
from .registry import register
from .spec import RegimeSpec


def head_only_flops(model, task) -> tuple[int, int]:
    return head_flops(task.head), 0


def token_flops(model, task) -> tuple[int, int]:
    """Task token rows over the backbone's keys (plus the tokens and memory it sees) before its fork; the private
    branch's whole stream after it; memory keys/values once per forward."""
    c = task.config
    d, a, hidden, n = dims(model)
    flops, batch = head_flops(task.head), 0
    owners = [task, *(model.tasks[s] for s in c.sees)]
    fork = model.depth - c.fork_layers
    for i in range(model.depth):
        if i >= fork:  # private branch: the whole stream [tokens, registers, patches] + memory, own pass
            bb = model.backbone
            patches = c.fork_select or bb.patch_embed.num_patches // (c.fork_pool[0] * c.fork_pool[1])
            if c.fork_select and i == fork:  # the class token's attention row that picks the patches
                flops += 2 * n * d * 2 * a + 2 * n * a
            seq = c.task_tokens + bb.num_prefix_tokens - 1 + patches + (c.memory if i in task.layer_to_slot else 0)
            flops += block_flops(d, a, hidden, seq, seq)
            if task.adapters_at(i) is not None:
                flops += adapter_flops(seq, d, c.adapter_dim)
            continue
        keys = n + sum(t.config.task_tokens for t in owners)
        for t in owners:
            if (mem := t.memory_at(i) if t.memory is not None else None) is not None:
                keys += mem.shape[1]
        flops += block_flops(d, a, hidden, c.task_tokens, keys)
        if task.memory is not None and i in task.layer_to_slot:
            batch += 2 * c.memory * d * 2 * a  # memory K/V: computed once per forward
    return flops, batch


register(
    RegimeSpec("head", "head", "linear head on the backbone's features (shared pass)", head_only_flops),
    RegimeSpec("head+cls", "token", "own class token(s) in the shared pass, masked", token_flops,
               class_tokens=True),
    RegimeSpec("masked-memory", "token", "class token(s) and per-layer memory in the shared pass, masked "
               "(the paper's method)", token_flops, class_tokens=True, layer_memory=True),
)
