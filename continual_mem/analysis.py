"""Memory-attention analysis (paper Appendix B; Memory Transformer attention maps).

For a task with memory, on a batch of images: per layer and head, the fraction of query tokens whose attention
mass on the task's memory is >= 0.5, the mean mass, and the attention mass between blocks of the sequence
(``processing``: tokens -> tokens, ``read``: tokens -> memory, ``write``: propagated memory -> tokens,
``memory``: propagated memory -> memory; a block exists only where the regime has it). For propagated-memory
regimes (``input-memory``, ``hybrid``, ``mem-ctrl``, ``mem-bottleneck``) ``block_map`` gives that 2×2 split per
layer (the Memory Transformer paper's analysis): rows are the queries (sequence, memory), columns the keys; each
row sums to 1. ``mem-ctrl``'s memory rows come from its controller blocks, ``mem-bottleneck``'s are masked.
"""
from __future__ import annotations

import torch

from types import SimpleNamespace

from .backbone import capture_qkv, split_qkv
from .masking import TokenSpec, build_attention_mask
from .model import MemoryViT


def _attention_probs(model: MemoryViT, qkv: list[torch.Tensor], masks: dict[int, torch.Tensor] | None = None,
                     blocks=None):
    """Each block's attention probabilities ``(B, H, L, L)`` from its recorded qkv output."""
    probs: dict[int, torch.Tensor] = {}
    for i, (blk, out) in enumerate(zip(blocks if blocks is not None else model.backbone.blocks, qkv)):
        q, k, _ = split_qkv(blk.attn, out)
        s = (q * blk.attn.scale) @ k.transpose(-2, -1)
        if masks is not None and i in masks:
            s = s.masked_fill(~masks[i].to(s.device), float("-inf"))
        probs[i] = s.softmax(-1)
    return probs


@torch.no_grad()
def memory_attention(model: MemoryViT, task: str, images: torch.Tensor) -> dict:
    """Attention statistics of ``task``'s memory on ``images`` (see module doc)."""
    t = model.tasks[task]
    c = t.config
    if t.memory is None and t.input_memory is None:
        raise ValueError(f"task {task!r} ({c.regime}) has no memory to analyse; use a memory regime")
    forked = [n for n, task_ in model.tasks.items() if task_.config.fork_layers]
    if forked:
        raise ValueError(f"memory analysis does not cover late-fork tasks ({forked}); analyse a model without them")
    depth, B = model.depth, images.shape[0]
    per_layer = []  # (probabilities, query rows, memory cols, write rows, probabilities of the write rows) per layer
    if c.has_tokens:
        from .reference import reference_forward

        names = model.token_task_names
        modes = [model.tasks[n].config.mode for n in names]
        j = names.index(task)
        N = model.embed(images[:1]).shape[1]
        layout = [TokenSpec("backbone")] * N
        for idx, n in enumerate(names):
            layout += [TokenSpec("task", idx)] * model.tasks[n].config.task_tokens
        rows = [p for p, s in enumerate(layout) if s == TokenSpec("task", j)]
        masks, cols = {}, {}
        for i in range(depth):
            lay = list(layout)
            for idx, n in enumerate(names):
                mem = model.tasks[n].memory_at(i) if model.tasks[n].memory is not None else None
                if mem is not None:
                    start = len(lay)
                    lay += [TokenSpec("memory", idx)] * mem.shape[1]
                    if idx == j:
                        cols[i] = list(range(start, len(lay)))
            masks[i] = build_attention_mask(lay, modes)
        with capture_qkv(model.backbone) as qkv:
            reference_forward(model, images)
        probs = _attention_probs(model, qkv, masks)
        for i in range(depth):
            per_layer.append((probs[i], rows, cols.get(i, []), [], probs[i]))
    else:
        N = model.embed(images[:1]).shape[1]
        m_in = c.input_memory
        controllers = t.controllers  # MemCtrl: the copies that write the memory
        with capture_qkv(model.backbone) as qkv, \
                capture_qkv(SimpleNamespace(blocks=controllers or [])) as ctrl_qkv:
            model.separate_pass(t, images)
        own_mask = c.spec.own_mask(N, m_in, None) if c.spec.own_mask is not None else None
        masks = {i: own_mask for i in range(depth)} if own_mask is not None else None
        probs = _attention_probs(model, qkv, masks)
        ctrl_probs = _attention_probs(model, ctrl_qkv, blocks=controllers) if controllers is not None else None
        keep = N + m_in
        for i in range(depth):
            L = probs[i].shape[-1]
            mem_cols = list(range(N, keep)) + list(range(keep, L))  # propagated + per-layer memory
            # the memory rows' attention is whoever computes them: the controller for mem-ctrl
            write_probs = ctrl_probs[i] if ctrl_probs is not None else probs[i]
            per_layer.append((probs[i], list(range(N)), mem_cols, list(range(N, keep)), write_probs))
    frac, mass, block_map = [], [], []
    blocks = {"processing": 0.0, "read": 0.0, "write": 0.0, "memory": 0.0}
    for p, rows, cols, write_rows, write_p in per_layer:
        read = 0.0
        if cols:
            on_mem = p[:, :, rows][..., cols].sum(-1)  # (B, H, queries)
            frac.append((on_mem >= 0.5).float().mean(dim=(0, 2)).tolist())
            mass.append(on_mem.mean(dim=(0, 2)).tolist())
            read = float(on_mem.mean())
        else:
            heads = p.shape[1]
            frac.append([0.0] * heads)
            mass.append([0.0] * heads)
        token_cols = [x for x in range(p.shape[-1]) if x not in set(cols)]
        layer = {"processing": float(p[:, :, rows][..., token_cols].sum(-1).mean()), "read": read}
        if write_rows:  # propagated memory: its rows' attention too, the per-layer 2x2 block map
            layer["write"] = float(write_p[:, :, write_rows][..., token_cols].sum(-1).mean())
            layer["memory"] = float(write_p[:, :, write_rows][..., cols].sum(-1).mean())
            block_map.append(layer)
        blocks["processing"] += layer["processing"] / depth
        blocks["read"] += read / depth
        blocks["write"] += layer.get("write", 0.0) / depth
        blocks["memory"] += layer.get("memory", 0.0) / depth
    result = {"task": task, "regime": c.regime, "images": B, "fraction_ge_half": frac, "mean_memory_mass": mass,
              "blocks": {k: v for k, v in blocks.items() if v or k in ("processing", "read")}}
    if block_map:
        result["block_map"] = block_map
    return result


def plot_block_map(result: dict, path) -> None:
    """One 2×2 panel per layer: queries (sequence, memory) × keys (sequence, memory), attention mass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = result["block_map"]
    fig, axes = plt.subplots(1, len(maps), figsize=(1.25 * len(maps) + 1, 1.9), squeeze=False)
    for i, (ax, m) in enumerate(zip(axes[0], maps)):
        grid = [[m["processing"], m["read"]], [m["write"], m["memory"]]]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for r in range(2):
            for col in range(2):
                ax.text(col, r, f"{grid[r][col]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[r][col] < 0.6 else "black")
        ax.set_xticks([0, 1], ["seq", "mem"], fontsize=6)
        ax.set_yticks([0, 1], ["seq", "mem"] if i == 0 else ["", ""], fontsize=6)
        ax.set_title(f"layer {i}", fontsize=7)
    fig.suptitle(f"task {result['task']} ({result['regime']}): attention mass, queries (rows) x keys (columns); "
                 "read = seq->mem, write = mem->seq", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, title in ((axes[0], "fraction_ge_half", "queries with >= 0.5 attention on memory"),
                           (axes[1], "mean_memory_mass", "mean attention mass on memory")):
        im = ax.imshow(result[key], vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"task {result['task']} ({result['regime']}), {result['images']} images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
