"""Routed passes as CUDA graphs: the serving fast path for requests that name their tasks.

An eager routed pass launches a few hundred small kernels; in a server they compete with the event loop for the
GIL (``docs/many_tasks.md``). Here a routed pass over every grouped task of the model is captured once per batch
size: the backbone, then for each group shape one routed group whose slot assignment is an input tensor, and for
each (slot, head width) one gathered head product over every row. A call writes the images and the indices into
the captured inputs and replays; the host only builds the indices (:meth:`RoutedGraph.layout`).

The graph runs the eager routed pass's kernels on the same shapes, so its answers are the eager routed pass's at
that batch size; like it, a row's answer never depends on the other rows or tasks. It holds the model's gather
tables as they were at capture: after any change of tasks or parameters it refuses to run and must be rebuilt.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .forward_plan import PassState, backbone_pass, make_plan
from .graphs import CAPTURE_MODE, ModelStamp, inference_context
from .model import MemoryViT
from .routed import gathered_head, routed_pooled, shape_groups, tables


@dataclass(frozen=True)
class Layout:
    """Where each row's answers are: ``rows[b]`` is ``[(task, first column, end column), ...]`` in the graph's
    output ``(B, columns)``; ``slots`` and ``heads`` are the index inputs the pass reads."""

    rows: list[list[tuple[str, int, int]]]
    slots: dict[tuple, list[list[int]]]
    heads: dict[tuple, list[int]]


class RoutedGraph:
    """Capture a routed pass of ``model``'s grouped tasks for ``example``'s shape, then replay it for any routes
    those tasks fit (:meth:`layout`).

    Args:
        model: The model, on a CUDA device, in eval mode, with at least one grouped (concatenation-mode token) task.
        example: An input of the batch size and dtype that will be used.
        autocast_dtype: Run under ``torch.autocast`` with this dtype, or None.
        warmup: Eager warm-up passes before capture (kernel selection, Triton compilation).
    """

    def __init__(self, model: MemoryViT, example: torch.Tensor, *, autocast_dtype: torch.dtype | None = None,
                 warmup: int = 2) -> None:
        if example.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and input on a CUDA device")
        self.model, self.autocast_dtype = model.eval(), autocast_dtype
        groups = shape_groups(model)
        if not groups:
            raise ValueError("the model has no grouped task to route; use the eager routed pass")
        batch, slots, dev = example.shape[0], model.group_size, example.device
        with self._context():
            self.tables = {shape: tables(model, g, {}) for shape, g in groups.items()}
        self.shape_of = {name: shape for shape, t in self.tables.items() for name in t.index}
        self.keys = [(shape, s, w) for shape, t in self.tables.items() for s in range(slots) for w in sorted(t.heads)]
        self.columns: dict[tuple, int] = {}
        at = 0
        for key in self.keys:
            self.columns[key] = at
            at += key[2]
        self.static_x = example.clone()
        self.static_slots = {shape: torch.zeros(batch, slots, dtype=torch.int64, device=dev) for shape in self.tables}
        self.static_heads = {key: torch.zeros(batch, dtype=torch.int64, device=dev) for key in self.keys}
        self._stamp = ModelStamp(self.model)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._context():
            for _ in range(warmup):
                self._pass()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with self._context(), torch.cuda.graph(self.graph, capture_error_mode=CAPTURE_MODE):
            self.static_out = self._pass()

    def _context(self):
        return inference_context(self.autocast_dtype)

    def _pass(self) -> torch.Tensor:
        """Every grouped task's routed group and every (slot, width) head product: ``(B, columns)``."""
        plan = make_plan(self.model, list(self.shape_of), original=False, device=self.static_x.device)
        state = PassState(self.static_x, replace(plan.paths, stacked=False))
        backbone_pass(self.model, plan, state, original=False)
        pooled = {shape: routed_pooled(self.model, t, self.static_slots[shape], state)
                  for shape, t in self.tables.items()}
        return torch.cat([gathered_head(self.tables[shape], pooled[shape], s, w, self.static_heads[(shape, s, w)])
                          for shape, s, w in self.keys], dim=1)

    def layout(self, routes: Sequence[Sequence[str]]) -> Layout | None:
        """Where ``routes``' answers will be, and the indices that put them there; None if the graph cannot
        serve them (a task that is not grouped, or a row asking for more tasks of one shape than a group holds):
        use the eager routed pass then."""
        slots = self.model.group_size
        out_rows: list[list[tuple[str, int, int]]] = []
        slot_idx = {shape: [[0] * slots for _ in routes] for shape in self.tables}
        head_idx = {key: [0] * len(routes) for key in self.keys}
        for b, route in enumerate(routes):
            used: dict[tuple, int] = {}
            row = []
            for name in route:
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
        return Layout(out_rows, slot_idx, head_idx)

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
        flat = torch.cat([h.view(-1) for h in host]).pin_memory().to(x.device, non_blocking=True)
        at = 0
        for dst in [*self.static_slots.values(), *self.static_heads.values()]:
            dst.view(-1).copy_(flat[at:at + dst.numel()])
            at += dst.numel()
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out
