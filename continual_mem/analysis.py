"""Memory-attention analysis (paper Appendix B; Memory Transformer attention maps).

For a task with memory, on a batch of images: per layer and head, the fraction of query tokens whose attention
mass on the task's memory is >= 0.5, the mean mass, and the attention mass between blocks of the sequence
(``processing``: tokens -> tokens, ``read``: tokens -> memory, ``write``: propagated memory -> tokens,
``memory``: propagated memory -> memory; a block exists only where the regime has it).
"""
from __future__ import annotations

import torch

from .backbone import capture_qkv, split_qkv
from .masking import TokenSpec, build_attention_mask
from .model import MemoryViT


def _attention_probs(model: MemoryViT, qkv: list[torch.Tensor], masks: dict[int, torch.Tensor] | None = None):
    """Each block's attention probabilities ``(B, H, L, L)`` from its recorded qkv output."""
    probs: dict[int, torch.Tensor] = {}
    for i, (blk, out) in enumerate(zip(model.backbone.blocks, qkv)):
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
    per_layer = []  # (query rows, memory cols, write rows) per layer
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
            per_layer.append((probs[i], rows, cols.get(i, []), []))
    else:
        N = model.embed(images[:1]).shape[1]
        m_in = c.input_memory
        with capture_qkv(model.backbone) as qkv:
            model.separate_pass(t, images)
        probs = _attention_probs(model, qkv)
        for i in range(depth):
            keep = N + m_in
            L = probs[i].shape[-1]
            mem_cols = list(range(N, keep)) + list(range(keep, L))  # propagated + per-layer memory
            per_layer.append((probs[i], list(range(N)), mem_cols, list(range(N, keep))))
    frac, mass = [], []
    blocks = {"processing": 0.0, "read": 0.0, "write": 0.0, "memory": 0.0}
    for p, rows, cols, write_rows in per_layer:
        if cols:
            on_mem = p[:, :, rows][..., cols].sum(-1)  # (B, H, queries)
            frac.append((on_mem >= 0.5).float().mean(dim=(0, 2)).tolist())
            mass.append(on_mem.mean(dim=(0, 2)).tolist())
            blocks["read"] += float(on_mem.mean()) / depth
        else:
            heads = p.shape[1]
            frac.append([0.0] * heads)
            mass.append([0.0] * heads)
        token_cols = [x for x in range(p.shape[-1]) if x not in set(cols)]
        blocks["processing"] += float(p[:, :, rows][..., token_cols].sum(-1).mean()) / depth
        if write_rows:
            blocks["write"] += float(p[:, :, write_rows][..., token_cols].sum(-1).mean()) / depth
            blocks["memory"] += float(p[:, :, write_rows][..., cols].sum(-1).mean()) / depth
    return {"task": task, "regime": c.regime, "images": B, "fraction_ge_half": frac, "mean_memory_mass": mass,
            "blocks": {k: v for k, v in blocks.items() if v or k in ("processing", "read")}}


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
