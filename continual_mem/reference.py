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
MemBottleneck's sequence rows see memory only).

Slow (every task widens the sequence) and on other kernels than the fast path, so it is compared with
``allclose``, never used for preservation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from .masking import TokenSpec, build_attention_mask
from .model import ORIGINAL  # the key of the backbone's own head: a name, not code under test


def _embed(bb: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm's embedding steps: ``[CLS, registers, patches]`` entering block 0."""
    return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))


def _memory(task, layer: int) -> torch.Tensor | None:
    """The task's per-layer memory ``(1, m, D)`` at ``layer``, from its parameter and its config's layer list."""
    layers = task.config.layers
    return None if task.memory is None or layer not in layers else task.memory[layers.index(layer)][None]


def _adapters(task, layer: int, depth: int):
    """The task's (after-attention, after-MLP) adapters at ``layer``: every block for the adapter regimes, the
    fork's blocks for a forked token task (the order the parameters were made in)."""
    if task.adapters is None:
        return None
    first = depth - len(task.adapters) // 2
    return None if layer < first else (task.adapters[2 * (layer - first)], task.adapters[2 * (layer - first) + 1])


def _block(task, layer: int, bb: VisionTransformer):
    """The block a forked task's branch runs at ``layer``: its fine-tuned copy, else the backbone's."""
    if task.blocks is None:
        return bb.blocks[layer]
    return task.blocks[layer - (len(bb.blocks) - len(task.blocks))]


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


def _block_with_row_adapters(blk, x: torch.Tensor, mask: torch.Tensor | None, adapted: list) -> torch.Tensor:
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


def _pool(bb: VisionTransformer, task, tokens: torch.Tensor) -> torch.Tensor:
    """Final norm states of the task's tokens ``(B, n, D)`` averaged, fc_norm, head."""
    return task.head(bb.fc_norm(tokens.mean(dim=1)))


@torch.no_grad()
def own_pass_reference(bb: VisionTransformer, task, x: torch.Tensor) -> torch.Tensor:
    """A non-preserving task's logits from one sequence of its own (see the module docstring)."""
    c = task.config
    if c.regime == "full":
        return task.head(task.backbone.forward_head(task.backbone.forward_features(x), pre_logits=True))
    depth = len(bb.blocks)
    h = _embed(bb, x)
    B = h.shape[0]
    if task.tokens is None:  # adapters alone: the backbone's own tokens and pooling, every row adapted
        for i, blk in enumerate(bb.blocks):
            h = _block_with_row_adapters(blk, h, None, [(None, _adapters(task, i, depth))])
        return task.head(bb.forward_head(bb.norm(h), pre_logits=True))
    parts = [task.tokens.expand(B, -1, -1), h[:, 1:]]  # the task's tokens take the class token's place
    if task.input_memory is not None:
        parts.append(task.input_memory.expand(B, -1, -1))
    h = torch.cat(parts, dim=1)
    n_seq = h.shape[1] - (c.input_memory if task.input_memory is not None else 0)
    for i, blk in enumerate(bb.blocks):
        keep = h.shape[1]
        mem = _memory(task, i)
        seq = h if mem is None else torch.cat([h, mem.expand(B, -1, -1)], dim=1)
        n = seq.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=x.device)
        mask[keep:] = False
        mask[keep:, keep:] = torch.eye(n - keep, dtype=torch.bool, device=x.device)  # memory: a key, never a query
        if c.regime == "mem-bottleneck":  # sequence rows read memory only; memory rows read everything
            mask[:n_seq, :n_seq] = False
        pair = _adapters(task, i, depth)
        new = blk(seq, attn_mask=mask) if pair is None else _block_with_row_adapters(blk, seq, mask, [(None, pair)])
        if c.regime == "mem-ctrl":  # the task's controller copy of the block updates the propagated memory
            new = torch.cat([new[:, :n_seq], task.controllers[i](seq, attn_mask=mask)[:, n_seq:]], dim=1)
        h = new[:, :keep]
    return _pool(bb, task, bb.norm(h)[:, : c.task_tokens])


@torch.no_grad()
def reference_forward(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output of ``model`` (``{"original": ..., task: ...}``) from the masked full sequence and the own
    passes; reads ``model.backbone`` and ``model.tasks`` only."""
    bb = model.backbone
    depth = len(bb.blocks)
    tasks = list(model.tasks.values())
    token_tasks = [t for t in tasks if t.config.regime in ("head+cls", "masked-memory")]
    modes = [t.config.mode for t in token_tasks]

    h = _embed(bb, x)
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
            if (mem := _memory(t, i)) is not None:
                mems.append(mem.expand(B, -1, -1))
                layer_layout += [TokenSpec("memory", j)] * mem.shape[1]
        forked = frozenset(j for j, fork in forks.items() if i >= fork)
        mask = build_attention_mask(layer_layout, modes, forked).to(x.device)
        # a forked task's adapters act on its branch rows (its tokens and private patches) from its fork block on
        rows = {j: torch.tensor([p for p, spec in enumerate(layer_layout) if spec.task == j and spec.kind in
                                 ("task", "private")], device=x.device) for j in forked}
        own = {j for j in forked if token_tasks[j].blocks is not None}  # branches with their own fine-tuned blocks
        adapted = [(rows[j], pair) for j, t in enumerate(token_tasks)
                   if j in forked and j not in own and (pair := _adapters(t, i, depth)) is not None]
        seq = torch.cat(mems, dim=1)
        new = blk(seq, attn_mask=mask) if not adapted else _block_with_row_adapters(blk, seq, mask, adapted)
        for j in own:  # the whole sequence through the task's copy; the mask confines its rows to its own keys
            t = token_tasks[j]
            copy, pair = _block(t, i, bb), _adapters(t, i, depth)
            mine = copy(seq, attn_mask=mask) if pair is None else _block_with_row_adapters(copy, seq, mask,
                                                                                            [(rows[j], pair)])
            new[:, rows[j]] = mine[:, rows[j]]
        h = new[:, :keep]
    h = bb.norm(h)

    out = {ORIGINAL: bb.forward_head(h[:, :N])}
    pre_logits = bb.forward_head(h[:, :N], pre_logits=True)
    offset = N
    for task in tasks:
        c = task.config
        if c.regime == "head":
            out[c.name] = task.head(pre_logits)
        elif task in token_tasks:
            out[c.name] = _pool(bb, task, h[:, offset: offset + c.task_tokens])
            offset += c.task_tokens
        else:
            out[c.name] = own_pass_reference(bb, task, x)
    return out


@torch.no_grad()
def unmasked_concatenation(model, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The paper's naive concatenation (Sec. 4.4), the experiment that motivates the mask.

    Independently trained full-attention ``memory`` tasks share one sequence with no mask: [every task's class
    tokens, registers, patches] plus every task's memory at each layer, everybody attending to everybody. Each
    task's patches now also see the other tasks' memory, so its accuracy drifts as tasks are added.
    """
    tasks = [model.tasks[n] for n in names]
    wrong = [t.config.name for t in tasks if t.config.regime != "memory"]
    if wrong:
        raise ValueError(f"naive concatenation takes full-attention memory tasks; {wrong} are not regime 'memory'")
    bb = model.backbone
    h = _embed(bb, x)
    B = h.shape[0]
    h = torch.cat([*(t.tokens.expand(B, -1, -1) for t in tasks), h[:, 1:]], dim=1)
    keep = h.shape[1]
    for i, blk in enumerate(bb.blocks):
        mems = [m.expand(B, -1, -1) for t in tasks if (m := _memory(t, i)) is not None]
        h = blk(torch.cat([h, *mems], dim=1))[:, :keep] if mems else blk(h)
    h = bb.norm(h)
    out, offset = {}, 0
    for t in tasks:
        n = t.config.task_tokens
        out[t.config.name] = _pool(bb, t, h[:, offset:offset + n])
        offset += n
    return out
