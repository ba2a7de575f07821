"""Reference implementation (test oracle): one full sequence through timm's blocks with the Table-1 mask.

Sequence at block i: ``[CLS, registers, patches, task tokens of every token task, memory of layer i]``; the
boolean mask comes from :func:`continual_mem.masking.build_attention_mask`; memory outputs are dropped after
each block. This is slow (every task widens the sequence) and its kernels differ from the fast path, so it is
compared with ``allclose``, never used for preservation.
"""
from __future__ import annotations

import torch

from .masking import TokenSpec, build_attention_mask
from .model import ORIGINAL, MemoryViT


@torch.no_grad()
def reference_forward(model: MemoryViT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    bb = model.backbone
    token_names = model.token_task_names
    token_tasks = [model.tasks[n] for n in token_names]
    modes = [t.config.mode for t in token_tasks]

    h = model.embed(x)
    B, N, _ = h.shape
    layout = [TokenSpec("backbone")] * N
    parts = [h]
    for j, t in enumerate(token_tasks):
        parts.append(t.tokens.expand(B, -1, -1))
        layout += [TokenSpec("task", j)] * t.config.task_tokens
    h = torch.cat(parts, dim=1)
    keep = h.shape[1]

    for i, blk in enumerate(bb.blocks):
        layer_layout = list(layout)
        mems = [h]
        for j, t in enumerate(token_tasks):
            mem = t.memory_at(i) if t.memory is not None else None
            if mem is not None:
                mems.append(mem.expand(B, -1, -1))
                layer_layout += [TokenSpec("memory", j)] * mem.shape[1]
        mask = build_attention_mask(layer_layout, modes).to(x.device)
        h = blk(torch.cat(mems, dim=1), attn_mask=mask)[:, :keep]
    h = bb.norm(h)

    out = {ORIGINAL: bb.forward_head(h[:, :N])}
    pre_logits = bb.forward_head(h[:, :N], pre_logits=True)
    offset = N
    for name, task in model.tasks.items():
        c = task.config
        if c.regime == "head":
            out[name] = task.head(pre_logits)
        elif c.has_tokens:
            tok = h[:, offset : offset + c.task_tokens]
            offset += c.task_tokens
            out[name] = task.head(bb.fc_norm(tok.mean(dim=1)))
        else:
            out[name] = model.separate_pass(task, x)
    return out
