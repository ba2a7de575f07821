"""Reference implementation (test oracle): one full sequence through timm's blocks with the Table-1 mask.

Sequence at block i: ``[CLS, registers, patches, task tokens of every token task, memory of layer i]``; the
boolean mask comes from :func:`continual_mem.masking.build_attention_mask`; memory outputs are dropped after
each block. A late-fork task's private patches join the sequence at its fork layer as a copy of the backbone's
registers and patches there (kind ``private``), and the mask confines its tokens to them from then on. This is slow (every task widens the sequence) and its kernels differ from the fast path, so it is
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
    forks = {j: model.depth - t.config.fork_layers for j, t in enumerate(token_tasks) if t.config.fork_layers}

    for i, blk in enumerate(bb.blocks):
        for j, fork in forks.items():
            if fork == i:  # the task's private stream starts from the backbone's state entering this block
                private = model.private_stream(token_tasks[j], h[:, :N])
                h = torch.cat([h, private], dim=1)
                layout += [TokenSpec("private", j)] * private.shape[1]
        keep = h.shape[1]
        layer_layout = list(layout)
        mems = [h]
        for j, t in enumerate(token_tasks):
            mem = t.memory_at(i) if t.memory is not None else None
            if mem is not None:
                mems.append(mem.expand(B, -1, -1))
                layer_layout += [TokenSpec("memory", j)] * mem.shape[1]
        forked = frozenset(j for j, fork in forks.items() if i >= fork)
        mask = build_attention_mask(layer_layout, modes, forked).to(x.device)
        # a forked task's adapters act on its branch rows (its tokens and private patches) from its fork block on
        rows = {j: torch.tensor([p for p, spec in enumerate(layer_layout) if spec.task == j and spec.kind in
                                 ("task", "private")], device=x.device) for j in forked}
        own = {j for j in forked if token_tasks[j].blocks is not None}  # branches with their own fine-tuned blocks
        adapted = [(rows[j], pair) for j, t in enumerate(token_tasks)
                   if j in forked and j not in own and (pair := t.adapters_at(i)) is not None]
        seq = torch.cat(mems, dim=1)
        new = blk(seq, attn_mask=mask) if not adapted else _block_with_row_adapters(blk, seq, mask, adapted)
        for j in own:  # the whole sequence through the task's copy; the mask confines its rows to its own keys
            t = token_tasks[j]
            copy, pair = t.block_at(i, bb), t.adapters_at(i)
            mine = copy(seq, attn_mask=mask) if pair is None else _block_with_row_adapters(copy, seq, mask,
                                                                                            [(rows[j], pair)])
            new[:, rows[j]] = mine[:, rows[j]]
        h = new[:, :keep]
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


@torch.no_grad()
def unmasked_concatenation(model: MemoryViT, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The paper's naive concatenation (Sec. 4.4), the experiment that motivates the mask.

    Independently trained full-attention ``memory`` tasks share one sequence with no mask: [every task's class
    tokens, registers, patches] plus every task's memory at each layer, everybody attending to everybody. Each
    task's patches now also see the other tasks' memory, so its accuracy drifts as tasks are added.
    """
    tasks = [model.tasks[n] for n in names]
    wrong = [t.name for t in tasks if t.config.regime != "memory"]
    if wrong:
        raise ValueError(f"naive concatenation takes full-attention memory tasks; {wrong} are not regime 'memory'")
    bb = model.backbone
    h = model.embed(x)
    B = h.shape[0]
    h = torch.cat([*(t.tokens.expand(B, -1, -1) for t in tasks), h[:, 1:]], dim=1)
    keep = h.shape[1]
    for i, blk in enumerate(bb.blocks):
        mems = [m.expand(B, -1, -1) for t in tasks if (m := t.memory_at(i)) is not None]
        h = blk(torch.cat([h, *mems], dim=1))[:, :keep] if mems else blk(h)
    h = bb.norm(h)
    out, offset = {}, 0
    for t in tasks:
        n = t.config.task_tokens
        out[t.name] = t.head(bb.fc_norm(h[:, offset:offset + n].mean(dim=1)))
        offset += n
    return out


def _block_with_row_adapters(blk, x: torch.Tensor, mask: torch.Tensor, adapted: list) -> torch.Tensor:
    """timm's block on the whole sequence, each task's adapters applied to its own rows only."""
    def rows(y: torch.Tensor, k: int) -> torch.Tensor:
        y = y.clone()
        for idx, pair in adapted:
            y[:, idx] = pair[k](y[:, idx])
        return y

    x = x + blk.drop_path1(blk.ls1(rows(blk.attn(blk.norm1(x), attn_mask=mask), 0)))
    return x + blk.drop_path2(blk.ls2(rows(blk.mlp(blk.norm2(x)), 1)))
