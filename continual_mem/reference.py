"""Reference implementation (test oracle), written from the paper's equations on timm's own blocks with explicit
boolean masks. It reads the backbone and each task's parameters and calls nothing of :class:`MemoryViT` or of the
fast path (no ``embed``, ``private_stream``, ``separate_pass``, task paths or kernels), so a test comparing the two
can disagree.

Shared pass, sequence at block i: ``[CLS, registers, patches, task tokens of every token task, memory of layer
i]``, masked by :func:`continual_mem.masking.build_attention_mask` (paper Table 1); memory outputs are dropped
after each block. A late-fork task's private patches join at its fork layer as a copy (pooled or selected where
asked) of the backbone's registers and patches there, and the mask confines its tokens to them from then on.

Own-pass regimes: one sequence of their own, ``[task tokens, registers, patches, input memory, memory of layer
i]``, with everyone attending to everything except as the regime says (memory rows only keep the softmax finite;
MemBottleneck's sequence rows see memory only): each regime's module gives its oracle (``RegimeSpec.reference``),
built on :mod:`continual_mem.reference_ops`.

Slow (every task widens the sequence) and on other kernels than the fast path, so it is compared with
``allclose``, never used for preservation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from . import reference_ops as ops
from .masking import TokenSpec, build_attention_mask
from .model import ORIGINAL  # the key of the backbone's own head: a name, not code under test


def _private(bb: VisionTransformer, task, hidden: torch.Tensor, fork: int) -> torch.Tensor:
    """A forked task's private stream at its fork: the registers and patches entering block ``fork`` (``hidden`` is
    ``[CLS, registers, patches]``), the grid average-pooled, or only the patches the class token attends to most
    (softmax over all keys, mean over heads), in grid order."""
    c, prefix = task.config, bb.num_prefix_tokens
    registers, patches = hidden[:, 1:prefix], hidden[:, prefix:]
    B, _, D = patches.shape
    if c.fork_select:
        blk = bb.blocks[fork]
        attn = blk.attn
        qkv = attn.qkv(blk.norm1(hidden)).reshape(B, hidden.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        probs = (q[:, :, :1] @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)  # (B, H, 1, N)
        keep = probs[:, :, 0, prefix:].mean(dim=1).topk(c.fork_select, dim=-1).indices.sort(dim=-1).values
        patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, D))
    elif tuple(c.fork_pool) != (1, 1):
        gh, gw = bb.patch_embed.grid_size
        grid = patches.transpose(1, 2).reshape(B, D, gh, gw)
        patches = F.avg_pool2d(grid, tuple(c.fork_pool)).flatten(2).transpose(1, 2)
    return torch.cat([registers, patches], dim=1)


@torch.no_grad()
def own_pass_reference(bb: VisionTransformer, task, x: torch.Tensor) -> torch.Tensor:
    """An own-pass (or side-network) task's logits: its regime's oracle (``RegimeSpec.reference``, built on
    :mod:`continual_mem.reference_ops`)."""
    return task.config.spec.reference(bb, task, x)


@torch.no_grad()
def reference_forward(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output of ``model`` (``{"original": ..., task: ...}``) from the masked full sequence and the own
    passes; reads ``model.backbone`` and ``model.tasks`` only."""
    bb = model.backbone
    depth = len(bb.blocks)
    tasks = list(model.tasks.values())
    token_tasks = [t for t in tasks if t.config.spec.path == "token"]
    modes = [t.config.mode for t in token_tasks]

    h = ops.embed(bb, x)
    B, N, _ = h.shape
    layout = [TokenSpec("backbone")] * N
    parts = [h]
    for j, t in enumerate(token_tasks):
        parts.append(t.tokens.expand(B, -1, -1))
        layout += [TokenSpec("task", j)] * t.config.task_tokens
    h = torch.cat(parts, dim=1)
    forks = {j: depth - t.config.fork_layers for j, t in enumerate(token_tasks) if t.config.fork_layers}

    for i, blk in enumerate(bb.blocks):
        for j, fork in forks.items():
            if fork == i:  # the task's private stream starts from the backbone's state entering this block
                private = _private(bb, token_tasks[j], h[:, :N], fork)
                h = torch.cat([h, private], dim=1)
                layout += [TokenSpec("private", j)] * private.shape[1]
        keep = h.shape[1]
        layer_layout = list(layout)
        mems = [h]
        for j, t in enumerate(token_tasks):
            if (mem := ops.memory(t, i)) is not None:
                mems.append(mem.expand(B, -1, -1))
                layer_layout += [TokenSpec("memory", j)] * mem.shape[1]
        forked = frozenset(j for j, fork in forks.items() if i >= fork)
        mask = build_attention_mask(layer_layout, modes, forked).to(x.device)
        # a forked task's adapters act on its branch rows (its tokens and private patches) from its fork block on
        rows = {j: torch.tensor([p for p, spec in enumerate(layer_layout) if spec.task == j and spec.kind in
                                 ("task", "private")], device=x.device) for j in forked}
        own = {j for j in forked if token_tasks[j].blocks is not None}  # branches with their own fine-tuned blocks
        adapted = [(rows[j], pair) for j, t in enumerate(token_tasks)
                   if j in forked and j not in own and (pair := ops.adapters(t, i, depth)) is not None]
        seq = torch.cat(mems, dim=1)
        new = blk(seq, attn_mask=mask) if not adapted else ops.block_with_row_adapters(blk, seq, mask, adapted)
        for j in own:  # the whole sequence through the task's copy; the mask confines its rows to its own keys
            t = token_tasks[j]
            copy, pair = ops.block(t, i, bb), ops.adapters(t, i, depth)
            mine = copy(seq, attn_mask=mask) if pair is None else ops.block_with_row_adapters(copy, seq, mask,
                                                                                            [(rows[j], pair)])
            new[:, rows[j]] = mine[:, rows[j]]
        h = new[:, :keep]
    h = bb.norm(h)

    out = {ORIGINAL: bb.forward_head(h[:, :N])}
    pre_logits = bb.forward_head(h[:, :N], pre_logits=True)
    offset = N
    for task in tasks:
        c = task.config
        if c.spec.path == "head":
            out[c.name] = task.head(pre_logits)
        elif task in token_tasks:
            out[c.name] = ops.pool(bb, task, h[:, offset: offset + c.task_tokens])
            offset += c.task_tokens
        else:
            out[c.name] = own_pass_reference(bb, task, x)
    return out


def _full_attention_memory(spec) -> bool:
    """Per-layer memory and class tokens on an own pass, nothing else (the ``memory`` regime)."""
    return (spec.path == "own" and spec.class_tokens and spec.layer_memory
            and not (spec.input_memory or spec.adapters or spec.controllers or spec.backbone_copy))


@torch.no_grad()
def unmasked_concatenation(model, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The paper's naive concatenation (Sec. 4.4), the experiment that motivates the mask.

    Independently trained full-attention ``memory`` tasks share one sequence with no mask: [every task's class
    tokens, registers, patches] plus every task's memory at each layer, everybody attending to everybody. Each
    task's patches now also see the other tasks' memory, so its accuracy drifts as tasks are added.
    """
    tasks = [model.tasks[n] for n in names]
    wrong = [t.config.name for t in tasks if not _full_attention_memory(t.config.spec)]
    if wrong:
        raise ValueError(f"naive concatenation takes full-attention memory tasks; {wrong} are not regime 'memory'")
    bb = model.backbone
    h = ops.embed(bb, x)
    B = h.shape[0]
    h = torch.cat([*(t.tokens.expand(B, -1, -1) for t in tasks), h[:, 1:]], dim=1)
    keep = h.shape[1]
    for i, blk in enumerate(bb.blocks):
        mems = [m.expand(B, -1, -1) for t in tasks if (m := ops.memory(t, i)) is not None]
        h = blk(torch.cat([h, *mems], dim=1))[:, :keep] if mems else blk(h)
    h = bb.norm(h)
    out, offset = {}, 0
    for t in tasks:
        n = t.config.task_tokens
        out[t.config.name] = ops.pool(bb, t, h[:, offset:offset + n])
        offset += n
    return out
