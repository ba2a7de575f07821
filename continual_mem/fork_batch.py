"""Routed fine-tuned late forks, batched: the rows asking for fine-tuned fork tasks of one shape run as one pass,
each row with its own task's weights.

A fine-tuned late fork (``--fork-layers K --fork-finetune``) owns class tokens, per-layer memory, a copy of the
backbone's last ``K`` blocks and a head. Run one task at a time, a batch whose images each name another fork task
costs a launch sequence per image. Here tasks of one *family* (the same fork, tokens, memory, block layout and head
width: :func:`family`) sit in the slots of a :class:`~continual_mem.paging.SlotStore`, and one pass runs every row
with the weights of its slot (gathered per row):

- before the fork, the task's tokens attend to the backbone's K/V and to their memory, through the routed-group
  block of capacity 1 (the memory K/V computed per row from the row's memory);
- in the branch, timm's block arithmetic with per-row weights (batched products, per-row norms and layer scales);
  per-layer memory is appended as tokens whose outputs are dropped, as the per-task branch does;
- the head is one batched product over the family's padded head width.

It is a private branch, so anything may run inside: the per-row arithmetic is not the per-task path's (the two
agree to float tolerance), but every kernel's shape depends on the batch size and the family only, so a row's
answer does not depend on the other rows, on the other tasks, or on which slot its task was paged into
(``tests/test_fork_batch.py``).
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import paging
from .kernels import row_linear_triton
from .layers import memory_kv
from .paging import Layout, SlotStore
from .row_linear import head_width
from .stacked import plain_block

_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {family: SlotStore}
_FAMILIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # task -> its family


def family(task) -> tuple | None:
    """The batch a task joins (policy): its layout and fork, or None when it takes the per-task path (not a
    fine-tuned late fork, or one with adapters, extension reads, input memory or blocks this pass does not
    reproduce)."""
    if task not in _FAMILIES:  # a task's structure never changes; its layout walk is not free
        _FAMILIES[task] = _family(task)
    return _FAMILIES[task]


def _family(task) -> tuple | None:
    c = task.config
    if not (c.fork_layers and c.fork_finetune and c.mode == "concatenation" and c.spec.path == "token"):
        return None
    if c.sees or task.tokens is None or task.blocks is None or task.adapters is not None:
        return None
    if task.input_memory is not None or task.head.bias is None or not all(plain_block(b) for b in task.blocks):
        return None
    blk = task.blocks[0]
    return ("fork", c.fork_layers, c.fork_select, c.fork_pool, c.layers, layout(task).entries,
            blk.norm1.eps, blk.norm2.eps, blk.attn.num_heads, task.tokens.dtype)


def families(model) -> dict[tuple, list[str]]:
    """The model's batched fork families, each with its tasks in the model's order (policy)."""
    out: dict[tuple, list[str]] = {}
    for name, task in model.tasks.items():
        if (key := family(task)) is not None:
            out.setdefault(key, []).append(name)
    return out


def layout(task) -> Layout:
    """A family's slot layout: tokens, memory, the head padded to its gathered width
    (:func:`~continual_mem.row_linear.head_width`), then every branch block's parameters in timm's order."""
    head_rows = head_width(task.config.num_classes)
    entries = [("tokens", tuple(task.tokens.shape))]
    if task.memory is not None:
        entries.append(("memory", tuple(task.memory.shape)))
    D = task.head.weight.shape[1]
    entries += [("head.weight", (head_rows, D)), ("head.bias", (head_rows,))]
    entries += [(f"blocks.{j}.{n}", tuple(p.shape)) for j, blk in enumerate(task.blocks)
                for n, p in blk.named_parameters()]
    return Layout(tuple(entries))


def sources(task) -> list[torch.Tensor]:
    """A task's tensors in :func:`layout` order."""
    out = [task.tokens] + ([task.memory] if task.memory is not None else []) + [task.head.weight, task.head.bias]
    return out + [p for blk in task.blocks for _, p in blk.named_parameters()]


def owners(task) -> dict[str, tuple]:
    """Per layout entry, the (module, attribute) holding its parameter (for :func:`~continual_mem.paging.offload`)."""
    out = {"tokens": (task, "tokens"), "head.weight": (task.head, "weight"), "head.bias": (task.head, "bias")}
    if task.memory is not None:
        out["memory"] = (task, "memory")
    for j, blk in enumerate(task.blocks):
        for n, _ in blk.named_parameters():
            path, _, attr = n.rpartition(".")
            out[f"blocks.{j}.{n}"] = (blk.get_submodule(path) if path else blk, attr)
    return out


def run(model, like, views: dict[str, torch.Tensor], idx: torch.Tensor, state) -> torch.Tensor:
    """Every row's logits ``(B, head_rows)`` through the task in its slot (``idx[b]``, 0: the empty slot, whose
    row is computed and ignored). ``like``: any task of the family (its config and block structure)."""
    c = like.config
    bb = model.backbone
    fork = model.depth - c.fork_layers
    n = c.task_tokens
    tokens = views["tokens"][idx][:, 0]  # (B, n, D)
    memory = views["memory"][idx] if "memory" in views else None  # (B, layers, m, D)
    for i in range(fork):
        blk = bb.blocks[i]
        mk = mv = None
        if memory is not None and i in like.layer_to_slot:
            mk, mv = memory_kv(blk, memory[:, like.layer_to_slot[i]])  # (B, H, m, hd): one memory per row
        tokens, _, _ = model.group_block(blk, tokens, *state.backbone_kv[i], mk, mv, 1, triton=state.paths.triton)
    h = torch.cat([tokens, model.private_stream(like, state.block_inputs[fork])], dim=1)
    keep = h.shape[1]
    for j, ref in enumerate(like.blocks):
        i = fork + j
        x = h
        if memory is not None and i in like.layer_to_slot:
            x = torch.cat([h, memory[:, like.layer_to_slot[i]]], dim=1)
        prefix = f"blocks.{j}."
        if state.paths.triton:  # the linear layers read their slot's weights in place from the store
            p = {name[len(prefix):]: v for name, v in views.items() if name.startswith(prefix)}
            h = row_block(ref, p, x, idx)[:, :keep]
        else:
            p = {name[len(prefix):]: v[idx] for name, v in views.items() if name.startswith(prefix)}
            h = row_block(ref, p, x)[:, :keep]
    pooled = bb.fc_norm(bb.norm(h[:, :n]).mean(dim=1))
    w, b = views["head.weight"][idx], views["head.bias"][idx]
    return torch.baddbmm(b.unsqueeze(1), pooled.unsqueeze(1), w.transpose(1, 2)).squeeze(1)


def row_block(ref, p: dict[str, torch.Tensor], x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """timm's pre-norm block (``ref``'s structure: heads, norms' eps, attention scale) on ``x`` ``(B, N, D)``,
    row ``b`` with the weights ``p[name][b]`` (``name`` as in ``ref.named_parameters()``); with ``idx``, ``p``
    holds whole store views and row ``b`` uses slot ``idx[b]``: the linear layers read it in place (Triton)."""
    B, N, D = x.shape
    heads = ref.attn.num_heads
    qkv = _linear(_norm(x, p, "norm1", ref.norm1.eps, idx), p, "attn.qkv", idx).view(B, N, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    a = F.scaled_dot_product_attention(q, k, v, scale=ref.attn.scale).transpose(1, 2).reshape(B, N, D)
    x = x + _scale(_linear(a, p, "attn.proj", idx), p, "ls1", idx)
    h = F.gelu(_linear(_norm(x, p, "norm2", ref.norm2.eps, idx), p, "mlp.fc1", idx))
    return x + _scale(_linear(h, p, "mlp.fc2", idx), p, "ls2", idx)


def _row(p: dict, name: str, idx: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's copy of the vector ``name`` (gathered from a store view when ``idx`` is given)."""
    v = p.get(name)
    return v if v is None or idx is None else v[idx]


def _norm(x: torch.Tensor, p: dict, name: str, eps: float, idx: torch.Tensor | None) -> torch.Tensor:
    return torch.addcmul(_row(p, f"{name}.bias", idx).unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps),
                         _row(p, f"{name}.weight", idx).unsqueeze(1))


def _linear(x: torch.Tensor, p: dict, name: str, idx: torch.Tensor | None) -> torch.Tensor:
    w, b = p[f"{name}.weight"], p.get(f"{name}.bias")
    if idx is not None:
        return row_linear_triton(x, w, b, idx)
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def _scale(x: torch.Tensor, p: dict, name: str, idx: torch.Tensor | None) -> torch.Tensor:
    gamma = _row(p, f"{name}.gamma", idx)
    return x if gamma is None else x * gamma.unsqueeze(1)



def offload(model, names: Sequence[str] | None = None) -> int:
    """Move the named tasks (default: every task of a batched family) to host memory, one pinned pack each: they
    then run in routed passes only, paged in by use (:mod:`continual_mem.paging`). Returns the bytes moved."""
    total = 0
    if names is None:
        names = [n for n, t in model.tasks.items() if family(t) is not None]
    for name in names:
        task = model.tasks[name]
        if family(task) is None:
            raise ValueError(f"task {name!r} is not a fine-tuned late fork that routed passes batch; only those "
                             "are paged (drop it from the list)")
        if not paging.paged(task):
            total += paging.offload(task, layout(task), sources, owners(task))
    return total


def place(model, device: torch.device | str):
    """Move ``model`` to ``device``, all but its paged tasks (they stay in their host packs); returns it."""
    model.backbone.to(device)
    for task in model.tasks.values():
        if not paging.paged(task):
            task.to(device)
    return model


def store(model, like, device: torch.device) -> SlotStore:
    """The model's slot store of ``like``'s family on ``device`` (made on first use; remade when the model's
    ``resident_tasks``, device or dtype changed)."""
    key = family(like)
    stores = _STORES.setdefault(model, {})
    got = stores.get(key)
    if got is None or got.capacity != model.resident_tasks or got.device != device or got.dtype != like.tokens.dtype:
        members = sum(family(t) == key for t in model.tasks.values())  # sized once: growing copies every slot
        got = stores[key] = SlotStore(layout(like), sources, device=device, dtype=like.tokens.dtype,
                                      capacity=model.resident_tasks, slots=members)
    return got


@dataclass
class FamilyPasses:
    """One family's routed passes of a call: ``passes[p][b]`` is row ``b``'s task in pass ``p`` (None: none)."""

    store: SlotStore
    like: object
    passes: list[list[str | None]]
    slots: dict[str, int] | None  # every task's slot, when the store holds them all at once (else per chunk)


def prepare(model, passes: Sequence[Sequence[str | None]], device: torch.device, fence) -> FamilyPasses:
    """Page in the family's tasks for ``passes`` now, while the backbone computes (``fence``: the compute
    stream's position before it), when the store holds them all; else :func:`run_passes` pages chunk by chunk."""
    names = list(dict.fromkeys(t for rows in passes for t in rows if t is not None))
    like = model.tasks[names[0]]
    st = store(model, like, device)
    slots = None
    if len(paging.chunks(names, st.capacity)) == 1:
        slots = st.ensure([model.tasks[n] for n in names], after=fence)
    return FamilyPasses(st, like, [list(r) for r in passes], slots)


def run_passes(model, fp: FamilyPasses, state) -> dict[str, dict[int, torch.Tensor]]:
    """Per task and row, the logits of a family's routed passes."""
    out: dict[str, dict[int, torch.Tensor]] = {}
    names = list(dict.fromkeys(t for rows in fp.passes for t in rows if t is not None))
    runs = [(names, fp.slots)] if fp.slots is not None else [(c, None) for c in paging.chunks(names,
                                                                                              fp.store.capacity)]
    for chunk, slots in runs:
        if slots is None:  # waits for the passes already queued: they may read the slots it overwrites
            slots = fp.store.ensure([model.tasks[n] for n in chunk])
        for rows in fp.passes:
            idx = [slots.get(t, 0) if t is not None else 0 for t in rows]
            if not any(idx):
                continue
            logits = run(model, fp.like, fp.store.views(), _indices(idx, state.x.device), state)
            for b, t in enumerate(rows):
                if t in slots:
                    out.setdefault(t, {})[b] = logits[b, :model.tasks[t].config.num_classes]
    return out


def _indices(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
