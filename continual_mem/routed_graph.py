"""Routed passes as CUDA graphs: the serving fast path for requests that name their tasks.

An eager routed pass launches a few hundred small kernels; in a server they compete with the event loop for the
GIL (``docs/many_tasks.md``). Here a routed pass over every grouped task of the model is captured once per batch
size: the backbone, then for each group shape one routed group whose slot assignment is an input tensor, and for
each (slot, head width) one gathered head product over every row; then each family of fine-tuned late forks
(:mod:`continual_mem.fork_batch`) over every row, each row reading its task's weights from the family's slot store
(slot 0, the empty one, for rows that ask none of them); then the linear-head tasks' heads on the backbone's pooled
features, gathered (:mod:`continual_mem.head_table`): one product per (slot, head width) over every row, each row
reading the heads it asked for, :data:`~continual_mem.head_table.HEAD_SLOTS` per row (a served backbone with one
head is a graph too; a thousand head tasks cost what a few do). A call pages the forks it needs into their slots,
writes the images and the indices into the captured inputs and replays; the host only builds the indices
(:meth:`RoutedGraph.layout`). The eager routed pass of forks launches ~650 kernels at ~70 us of host time each
(H200 host, ``dev/diag_fork_pass.py``): a served pass of forks was bound by its launches, not the GPU.

The graph runs the eager routed pass's kernels on the same shapes, so its answers are the eager routed pass's at
that batch size; like it, a row's answer never depends on the other rows or tasks. It holds the model's gather
tables as they were at capture: after any change of tasks or parameters it refuses to run and must be rebuilt.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from . import fork_batch, paging
from .forward_plan import PassState, backbone_pass, make_plan
from .graphs import CAPTURE_MODE, ModelStamp, inference_context
from .head_table import HEAD_SLOTS, gathered_product, head_task_names, head_task_table, row_heads
from .model import MemoryViT
from .routed import gathered_head, routed_pooled, shape_groups, tables
from .sm_partition import side_stream

_HEADS = "linear-head tasks"  # their kind in a row's split (never a fork family's or a group shape's key)


@dataclass(frozen=True)
class Layout:
    """Where each row's answers are: ``rows[b]`` is ``[(task, first column, end column), ...]`` in the graph's
    output ``(B, columns)``; ``slots``, ``heads``, ``forks`` (each row's slot in a fork family's store) and
    ``task_heads`` (per (slot, width), each row's linear-head task's row in the head table) are the index inputs
    the pass reads."""

    rows: list[list[tuple[str, int, int]]]
    slots: dict[tuple, list[list[int]]]
    heads: dict[tuple, list[int]]
    forks: dict[tuple, list[int]]
    task_heads: dict[tuple[int, int], list[int]]


class RoutedGraph:
    """Capture a routed pass of ``model``'s grouped tasks, batched forks and heads for ``example``'s shape, then
    replay it for any routes those tasks fit (:meth:`layout`).

    Args:
        model: The model, on a CUDA device, in eval mode, with a grouped (concatenation-mode token) task, a
            batched fork or a linear-head task (:meth:`routable`).
        example: An input of the batch size and dtype that will be used.
        autocast_dtype: Run under ``torch.autocast`` with this dtype, or None.
        warmup: Eager warm-up passes before capture (kernel selection, Triton compilation).
        capture: False runs the same pass on the same inputs eagerly at every call, on any device (a check of
            the layout without a GPU).
    """

    def __init__(self, model: MemoryViT, example: torch.Tensor, *, autocast_dtype: torch.dtype | None = None,
                 warmup: int = 2, capture: bool = True) -> None:
        if capture and example.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and input on a CUDA device")
        self.model, self.autocast_dtype = model.eval(), autocast_dtype
        if not self.routable(model):
            raise ValueError("the model has no grouped task, batched fork or head task to route; use the eager "
                             "routed pass")
        groups = shape_groups(model)
        batch, slots, dev = example.shape[0], model.group_size, example.device
        with self._context():
            self.tables = {shape: tables(model, g, {}) for shape, g in groups.items()}
            self.head_table = head_task_table(model, {})
        self.shape_of = {name: shape for shape, t in self.tables.items() for name in t.index}
        self.keys = [(shape, s, w) for shape, t in self.tables.items() for s in range(slots) for w in sorted(t.heads)]
        self.columns: dict[tuple, int] = {}
        at = 0
        for key in self.keys:
            self.columns[key] = at
            at += key[2]
        # fork families: every task in its store's slots (a store that grows does so now, not under the graph)
        self.families = fork_batch.families(model)
        self.fork_of = {name: key for key, names in self.families.items() for name in names}
        self.likes = {key: model.tasks[names[0]] for key, names in self.families.items()}
        self.stores = {key: fork_batch.store(model, self.likes[key], dev) for key in self.families}
        for key, st in self.stores.items():
            if st.capacity is None:
                st.ensure([model.tasks[n] for n in self.families[key]])
        self.flats = {key: st.flat for key, st in self.stores.items()}
        for key, st in self.stores.items():
            self.columns[key] = at
            at += st.views()["head.weight"].shape[1]
        self.heads = dict.fromkeys(self.head_table.head_at if self.head_table else ())  # linear-head tasks
        self.head_keys = [(s, w) for s in range(HEAD_SLOTS) for w in sorted(self.head_table.heads)] \
            if self.head_table else []
        self.head_columns: dict[tuple[int, int], int] = {}
        for key in self.head_keys:
            self.head_columns[key] = at
            at += key[1]
        self.static_x = example.clone()
        self.static_slots = {shape: torch.zeros(batch, slots, dtype=torch.int64, device=dev) for shape in self.tables}
        self.static_heads = {key: torch.zeros(batch, dtype=torch.int64, device=dev) for key in self.keys}
        self.static_forks = {key: torch.zeros(batch, dtype=torch.int64, device=dev) for key in self.families}
        self.static_task_heads = {key: torch.zeros(batch, dtype=torch.int64, device=dev) for key in self.head_keys}
        self._stamp = ModelStamp(self.model)
        self.graph = None
        if not capture:
            return
        stream = side_stream() or torch.cuda.Stream()  # inside a partition: on its SMs (see sm_partition)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._context():
            for _ in range(warmup):
                self._pass()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with self._context(), torch.cuda.graph(self.graph, stream=side_stream(), capture_error_mode=CAPTURE_MODE):
            self.static_out = self._pass()

    def _context(self):
        return inference_context(self.autocast_dtype)

    @staticmethod
    def routable(model: MemoryViT) -> bool:
        """Whether a routed graph of ``model`` would hold any task (a grouped one, a batched fork or a head)."""
        return bool(shape_groups(model)) or bool(fork_batch.families(model)) or bool(head_task_names(model))

    def _pass(self) -> torch.Tensor:
        """Every grouped task's routed group, every (slot, width) head product, every fork family's rows and every
        (slot, width) product of the linear-head tasks: ``(B, columns)``."""
        plan = make_plan(self.model, [*self.shape_of, *self.fork_of, *self.heads], original=False,
                         device=self.static_x.device)
        state = PassState(self.static_x, replace(plan.paths, stacked=False))
        backbone_pass(self.model, plan, state, original=False)
        pooled = {shape: routed_pooled(self.model, t, self.static_slots[shape], state)
                  for shape, t in self.tables.items()}
        out = [gathered_head(self.tables[shape], pooled[shape], s, w, self.static_heads[(shape, s, w)])
               for shape, s, w in self.keys]
        out += [fork_batch.run(self.model, self.likes[key], self.stores[key].views(), self.static_forks[key], state)
                for key in self.families]
        out += [gathered_product(self.head_table.heads[w], state.pre_logits, self.static_task_heads[(s, w)])
                for s, w in self.head_keys]
        return torch.cat(out, dim=1)

    def layout(self, routes: Sequence[Sequence[str]]) -> Layout | None:
        """Where ``routes``' answers will be, and the indices that put them there; None if the graph cannot
        serve them (a task neither grouped nor a batched fork nor a head, a row asking for more tasks of one shape
        than a group holds, for more head tasks than :data:`~continual_mem.head_table.HEAD_SLOTS` or for two forks of
        one family, or more forks of a family than its store's slots): use the eager routed pass then. Pages the
        forks asked for into their slots (the replay waits for the copies)."""
        slots = self.model.group_size
        forks = self._fork_slots(routes)
        if forks is None:
            return None
        out_rows: list[list[tuple[str, int, int]]] = []
        slot_idx = {shape: [[0] * slots for _ in routes] for shape in self.tables}
        head_idx = {key: [0] * len(routes) for key in self.keys}
        fork_idx = {key: [0] * len(routes) for key in self.families}
        task_head_idx = {key: [0] * len(routes) for key in self.head_keys}
        for b, route in enumerate(routes):
            used: dict[tuple, int] = {}
            row = []
            mine = row_heads(route, self.head_table) if self.head_table else []
            if len(mine) > HEAD_SLOTS:
                return None
            for name in route:
                if name in self.heads:
                    s = mine.index(name)  # the eager pass's slot: the row's s-th head task
                    width, head_row = self.head_table.head_at[name]
                    task_head_idx[(s, width)][b] = head_row
                    lo = self.head_columns[(s, width)]
                    row.append((name, lo, lo + self.model.tasks[name].config.num_classes))
                    continue
                key = self.fork_of.get(name)
                if key is not None:
                    fork_idx[key][b] = forks[name]
                    lo = self.columns[key]
                    row.append((name, lo, lo + self.model.tasks[name].config.num_classes))
                    continue
                shape = self.shape_of.get(name)
                if shape is None or used.get(shape, 0) >= slots:
                    return None
                s = used[shape] = used.get(shape, 0)
                used[shape] += 1
                table = self.tables[shape]
                width, head_row = table.head_at[name]
                slot_idx[shape][b][s] = table.index[name]
                head_idx[(shape, s, width)][b] = head_row
                lo = self.columns[(shape, s, width)]
                row.append((name, lo, lo + self.model.tasks[name].config.num_classes))
            out_rows.append(row)
        return Layout(out_rows, slot_idx, head_idx, fork_idx, task_head_idx)

    def split(self, routes: Sequence[Sequence[str]], *,
              most: int | None = None) -> tuple[list[list[str]], list[int]] | None:
        """``routes`` as rows the graph holds (policy, pure): a row asking for two forks of one family, or more
        tasks of one shape than a group holds, becomes several rows of the same image, each with at most one fork
        per family, one group per shape and :data:`~continual_mem.head_table.HEAD_SLOTS` head tasks (the first with
        room, in the row's order). Returns the rows and the row each came from; None when a task is neither grouped
        nor a batched fork nor a head, or the rows would number more than ``most``. A row's answers are those of a
        row asking for its part alone (rows never see each other), at the bucket the rows fill."""
        slots = self.model.group_size
        rows: list[list[str]] = []
        origin: list[int] = []

        def new_row(b: int) -> bool:
            if most is not None and len(rows) == most:
                return False
            rows.append([])
            origin.append(b)
            return True

        for b, route in enumerate(routes):
            first = len(rows)
            seen: dict = {}  # fork family, group shape or _HEADS -> the row's tasks of it so far
            for name in route:
                if name in self.heads:
                    kind, cap = _HEADS, HEAD_SLOTS
                else:
                    kind, cap = self.fork_of.get(name), 1
                    if kind is None:
                        kind, cap = self.shape_of.get(name), slots
                        if kind is None:
                            return None
                part = seen.get(kind, 0) // cap  # parts fill in order: the first with room
                seen[kind] = seen.get(kind, 0) + 1
                while first + part >= len(rows):
                    if not new_row(b):
                        return None
                rows[first + part].append(name)
            if len(rows) == first and not new_row(b):  # a row asking for nothing stays a row
                return None
        return rows, origin

    def _fork_slots(self, routes: Sequence[Sequence[str]]) -> dict[str, int] | None:
        """Each fork asked for in ``routes``, paged in, and its slot; None when a row asks two of one family or a
        family's store cannot hold its forks at once."""
        asked: dict[tuple, dict[str, None]] = {}
        for route in routes:
            mine = {self.fork_of[n]: n for n in route if n in self.fork_of}
            if len(mine) < sum(n in self.fork_of for n in route):  # two of one family in this row
                return None
            for key, name in mine.items():
                asked.setdefault(key, {})[name] = None
        out: dict[str, int] = {}
        for key, names in asked.items():
            st = self.stores[key]
            if len(paging.chunks(list(names), st.capacity)) > 1:  # the eager pass runs them in chunks
                return None
            out.update(st.ensure([self.model.tasks[n] for n in names]))
            if st.flat is not self.flats[key]:
                raise RuntimeError("a fork store was reallocated since capture; build a new RoutedGraph")
        return out

    def __call__(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Replay for ``x`` with ``layout``'s indices; returns the graph's output ``(B, columns)`` (overwritten by
        the next replay: copy what you keep)."""
        if self._stamp.changed():
            raise RuntimeError("tasks or parameters changed since capture; build a new RoutedGraph")
        if x.shape != self.static_x.shape or x.dtype != self.static_x.dtype:
            raise ValueError(f"captured for input {tuple(self.static_x.shape)} {self.static_x.dtype}, got "
                             f"{tuple(x.shape)} {x.dtype}")
        if len(layout.rows) != x.shape[0]:
            raise ValueError(f"layout has {len(layout.rows)} rows but the batch has {x.shape[0]} images")
        host = [torch.tensor(layout.slots[shape], dtype=torch.int64) for shape in self.tables]
        host += [torch.tensor(layout.heads[key], dtype=torch.int64) for key in self.keys]
        host += [torch.tensor(layout.forks[key], dtype=torch.int64) for key in self.families]
        host += [torch.tensor(layout.task_heads[key], dtype=torch.int64) for key in self.head_keys]
        flat = torch.cat([h.view(-1) for h in host])
        if x.device.type == "cuda":
            flat = flat.pin_memory().to(x.device, non_blocking=True)
        at = 0
        for dst in [*self.static_slots.values(), *self.static_heads.values(), *self.static_forks.values(),
                    *self.static_task_heads.values()]:
            dst.view(-1).copy_(flat[at:at + dst.numel()])
            at += dst.numel()
        self.static_x.copy_(x)
        if self.graph is None:  # capture=False
            with self._context():
                return self._pass()
        self.graph.replay()
        return self.static_out
