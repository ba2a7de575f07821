"""The shared pass's task paths, run by :mod:`continual_mem.forward_plan`'s units: a single task's tokens (the
per-task path), a fixed-capacity group of tasks in one set of kernels per block, and every group of one shape
stacked into one set of launches per block (:mod:`continual_mem.stacked`). All read the backbone's K/V in place;
none changes what an existing task computes when tasks are added. ``model`` is the :class:`MemoryViT` (its
``backbone``, ``tasks``, ``kv_cache`` and block functions), ``state`` the call's ``PassState``."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from . import stacked
from .branches import branch
from .cache_keys import KVKey
from .layers import memory_kv
from .own_ops import pool_tokens
from .task import TaskModule


_WATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {slot: (names, tasks, params)}


def watched_params(model, slot: tuple, names: tuple[str, ...], members: list, params_of) -> list[nn.Parameter]:
    """The parameters :func:`cached` stamps for a table built from ``members`` (the tasks ``names``): the tensors
    ``params_of(task)`` gives (None skipped), kept per ``slot`` while the same task objects fill it (``nn.Module``
    attribute reads are slow, and a table's are stamped on every pass)."""
    memo = _WATCHED.setdefault(model, {})
    hit = memo.get(slot)
    if hit is None or hit[0] != names or any(a is not b for a, b in zip(hit[1], members)):
        hit = memo[slot] = (names, members, [p for t in members for p in params_of(t) if p is not None])
    return hit[2]


def cached(model, key: KVKey, params: list[nn.Parameter], compute, local: dict):
    """``compute()`` once per forward, and across forwards while none of ``params`` trains or changes."""
    if key in local:
        return local[key]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        value = compute()
    else:
        dev = params[0].device.type
        stamp = (tuple((p._version, id(p)) for p in params), params[0].device,
                 torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        hit = model.kv_cache.get(key)
        if hit is None or hit[0] != stamp:
            with torch.no_grad():
                hit = (stamp, compute())
            model.kv_cache[key] = hit
        value = hit[1]
    local[key] = value
    return value

def _memory_kv(model, task: TaskModule, layer: int, local: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Memory K/V of a single-path task at ``layer`` (image-independent)."""
    mem = task.memory_at(layer)
    if mem is None:
        return None
    return cached(model, KVKey.task(task.name, layer), [task.memory],
                  lambda: memory_kv(model.backbone.blocks[layer], task.memory_at(layer)), local)

def token_task(model, task: TaskModule, state) -> torch.Tensor:
    """One task on the per-task path (extension-mode tasks, late forks, and any task while it trains): its tokens
    attend to the backbone, itself, its memory and the tokens and memory of the earlier tasks it sees."""
    backbone_kv, token_kv, mem_kv = state.backbone_kv, state.token_kv, state.mem_kv
    keep_kv = task.name in state.readers
    B = backbone_kv[0][0].shape[0]
    tokens = task.tokens.expand(B, -1, -1)  # (B, n, D)
    own: list[tuple[torch.Tensor, torch.Tensor]] = []
    fork = model.depth - task.config.fork_layers
    for i, blk in enumerate(model.backbone.blocks):
        if i >= fork:
            return branch(model, task, tokens, state.block_inputs[fork], fork)
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        _memory_kv(model, task, i, mem_kv)  # stored in mem_kv under KVKey.task(name, i)
        for owner in (task.name, *task.config.sees):
            if owner != task.name:
                tk, tv = token_kv[owner][i]
                ks.append(tk)
                vs.append(tv)
            if (key := KVKey.task(owner, i)) in mem_kv:
                ks.append(mem_kv[key][0])
                vs.append(mem_kv[key][1])
        tokens, k, v = model.task_block(blk, tokens, *backbone_kv[i], ks, vs, fused=state.paths.fused_task)
        if keep_kv:
            own.append((k, v))
    if keep_kv:
        token_kv[task.name] = own
    return pool_tokens(model.backbone, tokens, task)

def group_memory(model, names: tuple[str | None, ...], tasks: list, layer: int,
                 local: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every slot's memory K/V of a group at ``layer``, ``(1, H, slots * m, hd)`` (zeros for empty slots;
    image-independent, cached); each task's share is also put in ``local`` under ``KVKey.task(name, layer)``."""
    first = next(t for t in tasks if t is not None)
    if layer not in first.layer_to_slot:
        return None
    blk = model.backbone.blocks[layer]
    empty_mem = first.tokens.new_zeros(first.config.memory, model.backbone.embed_dim)

    def stacked() -> tuple[torch.Tensor, torch.Tensor]:
        mem = torch.cat([t.memory[t.layer_to_slot[layer]] if t is not None else empty_mem for t in tasks])
        return memory_kv(blk, mem.unsqueeze(0))  # (1, H, G * m, hd)

    params = [t.memory for t in tasks if t is not None and t.memory is not None]
    mk, mv = cached(model, KVKey.group(names, layer), params, stacked, local)
    m = first.config.memory
    for s, t in enumerate(tasks):
        if t is not None:
            local[KVKey.task(t.name, layer)] = (mk[:, :, s * m:(s + 1) * m], mv[:, :, s * m:(s + 1) * m])
    return mk, mv

def _group_tokens(tasks: list, batch: int) -> torch.Tensor:
    """A group's starting token states ``(batch, slots * n, D)`` (zeros in empty slots)."""
    ref = next(t for t in tasks if t is not None).tokens
    empty = torch.zeros_like(ref)
    return torch.cat([t.tokens if t is not None else empty for t in tasks], dim=1).expand(batch, -1, -1)

def pooled_slots(model, tokens: torch.Tensor, slots: int, normed: bool) -> torch.Tensor:
    """Each slot's pooled features ``(B, slots, D)`` from a group's final token states ``(B, slots * n, D)``
    (``normed``: the final norm already ran)."""
    bb = model.backbone
    B, L, D = tokens.shape
    return bb.fc_norm((tokens if normed else bb.norm(tokens)).view(B, slots, L // slots, D).mean(dim=2))


def _heads(model, tasks: list, tokens: torch.Tensor, normed: bool) -> dict[str, torch.Tensor]:
    """Each slot's logits from a group's final token states ``(B, slots * n, D)``."""
    pooled = pooled_slots(model, tokens, len(tasks), normed)
    return {t.name: t.head(pooled[:, s]) for s, t in enumerate(tasks) if t is not None}

def run_group(model, names: tuple[str | None, ...], state) -> dict[str, torch.Tensor]:
    """A fixed-capacity group of concatenation-mode tasks, in one set of kernels per block."""
    backbone_kv, token_kv, mem_kv, keep_kv = state.backbone_kv, state.token_kv, state.mem_kv, state.readers
    tasks = [model.tasks[n] if n is not None else None for n in names]
    n, G = next(t for t in tasks if t is not None).config.task_tokens, len(names)
    tokens = _group_tokens(tasks, backbone_kv[0][0].shape[0])
    keep = [(s, t.name) for s, t in enumerate(tasks) if t is not None and t.name in keep_kv]
    kept: dict[str, list] = {name: [] for _, name in keep}
    for i, blk in enumerate(model.backbone.blocks):
        mk, mv = group_memory(model, names, tasks, i, mem_kv) or (None, None)
        tokens, k, v = model.group_block(blk, tokens, *backbone_kv[i], mk, mv, G, triton=state.paths.triton)
        for s, name in keep:
            kept[name].append((k[:, :, s * n:(s + 1) * n], v[:, :, s * n:(s + 1) * n]))
    token_kv.update(kept)
    return _heads(model, tasks, tokens, normed=False)

def run_stack(model, units: list[tuple[str | None, ...]], state) -> dict[str, torch.Tensor]:
    """Several groups of one shape in one set of launches per block (:mod:`continual_mem.stacked`); each
    group's results are those it would have alone on this path, bit for bit."""
    backbone_kv, token_kv, mem_kv, keep_kv = state.backbone_kv, state.token_kv, state.mem_kv, state.readers
    groups = [[model.tasks[n] if n is not None else None for n in names] for names in units]
    G, slots, B = len(groups), len(units[0]), backbone_kv[0][0].shape[0]
    start = [_group_tokens(tasks, B) for tasks in groups]
    tokens = stacked.group_buffer(G, start[0].shape[0] * start[0].shape[1], start[0].shape[2], start[0])
    for g, t in enumerate(start):
        tokens[g].view_as(t).copy_(t)
    params = [t.memory for tasks in groups for t in tasks if t is not None and t.memory is not None]
    memory = []
    for i in range(model.depth):
        per = [group_memory(model, names, tasks, i, mem_kv) for names, tasks in zip(units, groups)]
        if per[0] is None:
            memory.append(None)
            continue
        memory.append(cached(model, KVKey.stack(tuple(units), i), params,
                                   lambda per=per: tuple(torch.cat(kv, dim=2) for kv in zip(*per)), mem_kv))
    keep = [(g, s, t.name) for g, tasks in enumerate(groups) for s, t in enumerate(tasks)
            if t is not None and t.name in keep_kv]
    normed, kept = stacked.run_blocks(model.backbone, tokens, backbone_kv, memory, batch=B, slots=slots,
                                      keep=bool(keep))
    n = tokens.shape[1] // B // slots
    for g, s, name in keep:
        token_kv[name] = [(qkv[g, :, s * n:(s + 1) * n, 1].transpose(1, 2), qkv[g, :, s * n:(s + 1) * n, 2]
                           .transpose(1, 2)) for qkv in kept]
    out: dict[str, torch.Tensor] = {}
    for g, tasks in enumerate(groups):
        out.update(_heads(model, tasks, normed[g].view(B, -1, normed.shape[2]), normed=True))
    return out
