"""Routed passes: each image computes only the tasks it asks for.

The backbone runs once for the whole batch, through timm's own code, as in the all-task pass. Then:

- **Grouped tasks** (concatenation-mode token tasks, e.g. masked memory): the tasks rows ask for, of one group
  shape, run as *routed groups*. A routed group has the model's group capacity, but its slots are filled per row:
  row ``b``'s slot ``s`` holds the ``s``-th task that row asked for (its class tokens and its memory K/V, gathered
  from the task's own group cache). One set of kernels per block runs every row, whatever tasks the rows chose, so
  a thousand such tasks cost about what one group costs.
- **Fine-tuned late forks** of one family run batched, each row with its own task's weights, paged in by use
  (:mod:`continual_mem.fork_batch`, :mod:`continual_mem.paging`).
- **Other per-task units** (plain late forks, side networks, own passes): each task runs on the rows that asked
  for it, gathered, in tiles of ``tile`` rows (the last tile padded), so their cost follows the rows, not the task
  count.
- **Heads**: on the CPU each asked head runs over the whole batch's pooled states of its slot (a linear-head
  task's: the backbone's pooled features), the shape the all-task pass gives it; on CUDA one gathered product per
  slot and head width (:func:`gathered_heads`, :mod:`continual_mem.head_table`), linear-head tasks included.
- The serving fast path replays this as a CUDA graph (:mod:`continual_mem.routed_graph`).
- **Extension tasks** and the tasks they read run as in the all-task pass, on every row (they read the earlier
  tasks' token K/V in its layout).

Exactness: every kernel's shape depends on the batch size, the group capacity and ``tile``, never on which tasks
or rows share the pass, so a row's answer does not depend on its neighbours; adding a task changes no routed
answer. The computations are the all-task pass's own (same group block, same cached memory K/V, same heads), so on
the CPU a routed answer equals the all-task pass bit for bit (``tests/test_routed.py``). On CUDA a routed group
runs the per-group fused kernel with one memory set per row, not the stacked path, and the heads run gathered
(:func:`gathered_heads`): routed answers there agree with the all-task pass to float tolerance, and are as stable.
Batched forks run their own arithmetic (a private branch) and agree with the per-task path to float tolerance,
with the same stability (``tests/test_fork_batch.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from . import fork_batch, paging, task_paths
from .cache_keys import KVKey
from .forward_plan import ORIGINAL, GroupUnit, HeadUnit, PassState, StackUnit, TokenUnit, backbone_pass, make_plan
from .head_table import gathered_product, head_rows, head_slots, head_task_table, row_heads


@dataclass(frozen=True)
class RoutedGroup:
    """Slot assignment of one routed group: ``slots[b]`` are row ``b``'s tasks (``None``: empty slot)."""

    shape: tuple
    slots: tuple[tuple[str | None, ...], ...]


def assign_slots(routes: Sequence[Sequence[str]], shape_of: dict[str, tuple], capacity: int,
                 order: Sequence[str]) -> list[RoutedGroup]:
    """Routed groups for ``routes`` (policy, pure): per group shape, each row's asked tasks of that shape in the
    model's ``order``, ``capacity`` per group; a row asking for more opens the shape's next routed group."""
    rank = {n: i for i, n in enumerate(order)}
    shapes = sorted({shape_of[n] for r in routes for n in r if n in shape_of}, key=repr)
    out = []
    for shape in shapes:
        per_row = [sorted({n for n in r if shape_of.get(n) == shape}, key=rank.__getitem__) for r in routes]
        for g in range(-(-max(len(p) for p in per_row) // capacity)):
            chunk = [tuple(p[g * capacity:(g + 1) * capacity]) for p in per_row]
            out.append(RoutedGroup(shape, tuple(c + (None,) * (capacity - len(c)) for c in chunk)))
    return out


def tiles(rows: Sequence[int], tile: int) -> list[list[int]]:
    """``rows`` in tiles of ``tile``, the last padded by repeating its last row (policy, pure)."""
    out = [list(rows[i:i + tile]) for i in range(0, len(rows), tile)]
    if out and len(out[-1]) < tile:
        out[-1] += [out[-1][-1]] * (tile - len(out[-1]))
    return out


def routed_forward(model, x: torch.Tensor, routes: Sequence[Sequence[str]], *, original: bool = False,
                   tile: int = 1) -> list[dict[str, torch.Tensor]]:
    """Per row, the logits of the tasks it asked for (``routes[b]``, known task names), in its order; see the
    module doc. :meth:`MemoryViT.forward_routed` checks the names."""
    if len(routes) != x.shape[0]:
        raise ValueError(f"routes has {len(routes)} rows but the batch has {x.shape[0]} images; give one task "
                         "list per image")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    wanted = list(dict.fromkeys(n for r in routes for n in r))
    with torch.no_grad():
        per_task = _run(model, x, routes, wanted, original=original, tile=tile)
    rows = []
    for b, r in enumerate(routes):
        row = {ORIGINAL: per_task[ORIGINAL][b]} if original else {}
        row.update({n: per_task[n][b] for n in r})
        rows.append(row)
    return rows


def _run(model, x, routes, wanted, *, original, tile) -> dict[str, dict[int, torch.Tensor] | torch.Tensor]:
    plan = make_plan(model, model.closure(wanted), original=original, device=x.device)
    fence = paging.fence(x.device)  # slot stores may overwrite what passes queued before this one read
    state = PassState(x, replace(plan.paths, stacked=False), readers=plan.readers)
    # the backbone's kernels are queued first: the host routes while the device runs them
    out: dict = backbone_pass(model, plan, state, original=original) if plan.shared else {}
    full = set(model.closure([n for n in wanted if model.tasks[n].config.sees]))  # extension tasks + what they read
    grouped: dict[str, tuple] = {}
    others = []
    for unit in plan.units:
        names = _unit_names(unit)
        if isinstance(unit, (GroupUnit, StackUnit)) and not full.intersection(names):
            grouped.update({n: model.tasks[n].config.group_shape for n in names})
        else:
            others.append(unit)
    forks = {}  # fine-tuned late forks run batched, one family per pass, each row with its own weights
    for unit in others:
        if isinstance(unit, TokenUnit) and unit.name not in full:
            t = model.tasks[unit.name]
            if (key := fork_batch.family(t)) is not None:
                forks[unit.name] = key
    others = [u for u in others if not (isinstance(u, TokenUnit) and u.name in forks)]
    families = {}
    for g in assign_slots(routes, forks, 1, model.task_names):
        families.setdefault(g.shape, []).append([row[0] for row in g.slots])
    fork_passes = [fork_batch.prepare(model, passes, x.device, fence) for passes in families.values()]
    by_shape = shape_groups(model)
    groups = assign_slots(routes, grouped, model.group_size, model.task_names)
    tabs = {g.shape: tables(model, by_shape[g.shape], state.mem_kv) for g in groups}
    gathered = gathered_heads(x.device)
    index = _Index()  # every index in one pinned, non-blocking copy: nothing here waits for the device
    slot_ids = [index.add([tabs[g.shape].index[t] if t is not None else 0 for row in g.slots for t in row])
                for g in groups]
    head_ids = [_head_indices(g, tabs[g.shape], index) if gathered else {} for g in groups]
    head_tab = head_task_table(model, state.mem_kv) if gathered and any(isinstance(u, HeadUnit) for u in others) \
        else None
    if head_tab is not None:  # linear-head tasks gathered too: one product per (slot, width) over every row
        others = [u for u in others if not isinstance(u, HeadUnit)]
        row_tasks = [row_heads(r, head_tab) for r in routes]  # row b's s-th head task is in slot s
        task_heads = {key: index.add(at) for key, at in
                      head_slots(routes, head_tab, max(len(r) for r in routes)).items()}
    per_task = [(unit, [index.add(c) for c in tiles([b for b, r in enumerate(routes) if unit.name in r], tile)])
                for unit in others if not (isinstance(unit, HeadUnit) or full.intersection(_unit_names(unit)))]
    index.to(x.device)
    for g, group in enumerate(groups):
        idx = index[slot_ids[g]].view(len(routes), model.group_size)
        got = _run_routed_group(model, group, tabs[group.shape], idx, {k: index[i] for k, i in head_ids[g].items()},
                                state)
        for name, rows in got.items():  # a task may sit in another routed group for another row
            out.setdefault(name, {}).update(rows)
    for fp in fork_passes:
        for name, rows in fork_batch.run_passes(model, fp, state).items():
            out.setdefault(name, {}).update(rows)
    if head_tab is not None:
        for (s, w), i in task_heads.items():
            logits = gathered_product(head_tab.heads[w], state.pre_logits, index[i])
            for b, mine in enumerate(row_tasks):
                if s < len(mine) and head_tab.head_at[mine[s]][0] == w:
                    out.setdefault(mine[s], {})[b] = logits[b, :model.tasks[mine[s]].config.num_classes]
    chunks = {unit: ids for unit, ids in per_task}
    for unit in others:
        names = _unit_names(unit)
        if isinstance(unit, HeadUnit) or full.intersection(names):
            res = unit.run(model, state)  # every row: cheap (a head) or read by extension tasks
            out.update({n: {b: v[b] for b in range(x.shape[0])} for n, v in res.items()})
            continue
        got: dict[int, torch.Tensor] = {}
        for i in chunks[unit]:
            res = unit.run(model, _rows_state(state, index[i]))[unit.name]
            got.update({b: res[j] for j, b in enumerate(index.host(i))})
        out[unit.name] = got
    return out


def _unit_names(unit) -> list[str]:
    if isinstance(unit, StackUnit):
        return [n for g in unit.groups for n in g if n is not None]
    if isinstance(unit, GroupUnit):
        return [n for n in unit.names if n is not None]
    return [unit.name]


class _Index:
    """Integer lists gathered on the host, sent to the device in one copy (pinned, non-blocking on CUDA)."""

    def __init__(self) -> None:
        self.lists: list[list[int]] = []
        self.flat: torch.Tensor | None = None
        self.starts: list[int] = []

    def add(self, values: list[int]) -> int:
        self.lists.append(list(values))
        return len(self.lists) - 1

    def host(self, i: int) -> list[int]:
        return self.lists[i]

    def to(self, device: torch.device) -> None:
        sizes = [len(v) for v in self.lists]
        self.starts = [0]
        for n in sizes:
            self.starts.append(self.starts[-1] + n)
        flat = torch.tensor([v for vs in self.lists for v in vs], dtype=torch.int64)
        if device.type == "cuda":
            flat = flat.pin_memory()
        self.flat = flat.to(device, non_blocking=True)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.flat[self.starts[i]:self.starts[i + 1]]


def _rows_state(state: PassState, idx: torch.Tensor) -> PassState:
    """The shared pass's state restricted to the rows ``idx`` (gathered copies; memory K/V are
    image-independent)."""
    return PassState(
        state.x[idx], state.paths,
        backbone_kv=[(k[idx], v[idx]) for k, v in state.backbone_kv],
        pre_logits=None if state.pre_logits is None else state.pre_logits[idx],
        features=None if state.features is None else state.features[idx],
        block_inputs={i: t[idx] for i, t in state.block_inputs.items()},
        mem_kv=state.mem_kv,
    )


@dataclass(frozen=True)
class Tables:
    """What routed groups of one shape gather from: row 0 an empty slot, row ``1 + i`` the shape's ``i``-th task
    (model order). ``tokens``: ``(1 + T, n, D)``; ``memory[layer]``: keys and values ``(1 + T, H, m, hd)``, each
    task's the slice of its all-task group's cached K/V (the same bits), or None where the shape has no memory."""

    index: dict[str, int]
    tokens: torch.Tensor
    memory: list[tuple[torch.Tensor, torch.Tensor] | None]
    heads: dict[int, tuple[torch.Tensor, torch.Tensor]]  # width -> weights (1 + T_w, width, D), biases (1 + T_w, width)
    head_at: dict[str, tuple[int, int]]  # task -> (width, its row in that width's table)


def gathered_heads(device: torch.device) -> bool:
    """Whether a routed pass runs its heads (routed groups' and linear-head tasks') gathered, one batched product
    per slot and width (policy, pure): on CUDA, where a launch per task would cost more than the heads'
    arithmetic. On the CPU each head runs as its own linear layer over the whole batch, the all-task pass's
    product, bit for bit."""
    return device.type == "cuda"


def shape_groups(model) -> dict[tuple, list[tuple[str | None, ...]]]:
    """The all-task pass's groups, by group shape (model order)."""
    out: dict[tuple, list] = {}
    for unit in model.plan():
        if unit.kind == "group":
            first = next(n for n in unit.names if n is not None)
            out.setdefault(model.tasks[first].config.group_shape, []).append(unit.names)
    return out


def tables(model, groups: list[tuple[str | None, ...]], local: dict) -> Tables:
    """The gather tables of one shape's ``groups``: built once, cached with the model's memory K/V (rebuilt when
    a task of the shape trains, changes, comes or goes)."""
    names = tuple(n for g in groups for n in g if n is not None)
    members = [model.tasks[n] for n in names]
    params = task_paths.watched_params(model, ("routed", names[0]), names, members,  # one slot per shape
                                       lambda t: (t.tokens, t.memory, t.head.weight, t.head.bias))

    def build() -> Tables:
        first = members[0]
        n, m, D = first.config.task_tokens, first.config.memory, model.backbone.embed_dim
        tokens = torch.cat([first.tokens.new_zeros(1, n, D), *(t.tokens for t in members)])
        memory: list = []
        for i in range(model.depth):
            if i not in first.layer_to_slot:
                memory.append(None)
                continue
            ks, vs = [], []
            for g in groups:
                gk, gv = task_paths.group_memory(model, g, [model.tasks[t] if t else None for t in g], i, local)
                ks += [gk[:, :, s * m:(s + 1) * m] for s, t in enumerate(g) if t is not None]
                vs += [gv[:, :, s * m:(s + 1) * m] for s, t in enumerate(g) if t is not None]
            memory.append(tuple(torch.cat([parts[0].new_zeros(parts[0].shape), *parts]) for parts in (ks, vs)))
        heads = head_rows(members, D)
        return Tables({name: i + 1 for i, name in enumerate(names)}, tokens, memory, heads.heads, heads.head_at)

    return task_paths.cached(model, KVKey.routed(names), params, build, local)


def _head_indices(group: RoutedGroup, table: Tables, index: "_Index") -> dict[tuple[int, int], int]:
    """For gathered heads: per (slot, width) present in ``group``, each row's row in that width's table (0: the
    zero head, for rows whose task there has another width or none)."""
    out = {}
    for s in range(len(group.slots[0])):
        widths = {table.head_at[row[s]][0] for row in group.slots if row[s] is not None}
        for w in sorted(widths):
            at = [table.head_at[row[s]][1] if row[s] is not None and table.head_at[row[s]][0] == w else 0
                  for row in group.slots]
            out[(s, w)] = index.add(at)
    return out


def routed_pooled(model, table: Tables, idx: torch.Tensor, state: PassState) -> torch.Tensor:
    """A routed group's pooled features ``(B, slots, D)``: class tokens and memory K/V gathered from ``table``
    (``idx``: ``(B, slots)`` rows of it, 0 for an empty slot), the group block on every row."""
    B, slots = idx.shape
    _, n, D = table.tokens.shape
    tokens = table.tokens[idx].view(B, slots * n, D)
    for i, blk in enumerate(model.backbone.blocks):
        mem = table.memory[i]
        mk, mv = (None, None) if mem is None else (_gather(mem[0], idx), _gather(mem[1], idx))
        tokens, _, _ = model.group_block(blk, tokens, *state.backbone_kv[i], mk, mv, slots, triton=state.paths.triton)
    return task_paths.pooled_slots(model, tokens, slots, normed=False)


def gathered_head(table: Tables, pooled: torch.Tensor, slot: int, width: int, at: torch.Tensor) -> torch.Tensor:
    """Every row's head of one width on one slot in one batched product, ``(B, width)``: row ``b`` uses row
    ``at[b]`` of that width's table (0: the zero head)."""
    return gathered_product(table.heads[width], pooled[:, slot], at)


def _run_routed_group(model, group: RoutedGroup, table: Tables, idx: torch.Tensor,
                      head_idx: dict[tuple[int, int], torch.Tensor],
                      state: PassState) -> dict[str, dict[int, torch.Tensor]]:
    """One routed group's logits per task and row: heads gathered (``head_idx``, see :func:`gathered_heads`) or
    one per task."""
    pooled = routed_pooled(model, table, idx, state)
    out: dict[str, dict[int, torch.Tensor]] = {}
    if head_idx:
        for (s, w), at in head_idx.items():
            logits = gathered_head(table, pooled, s, w, at)
            for b, row in enumerate(group.slots):
                name = row[s]
                if name is not None and table.head_at[name][0] == w:
                    out.setdefault(name, {})[b] = logits[b, :model.tasks[name].config.num_classes]
        return out
    for s in range(idx.shape[1]):
        rows_of: dict[str, list[int]] = {}
        for b, row in enumerate(group.slots):
            if row[s] is not None:
                rows_of.setdefault(row[s], []).append(b)
        for name, rows in rows_of.items():
            logits = model.tasks[name].head(pooled[:, s])  # every row: the all-task pass's shape
            got = out.setdefault(name, {})
            for b in rows:
                got[b] = logits[b]
    return out


def _gather(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table`` ``(T, H, m, hd)`` per-task memory K (or V), ``idx`` ``(B, slots)`` -> ``(B, H, slots * m, hd)``."""
    B, slots = idx.shape
    _, H, m, hd = table.shape
    return table[idx].permute(0, 2, 1, 3, 4).reshape(B, H, slots * m, hd)
