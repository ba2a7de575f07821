"""Per-task weights paged to the device by use: a slot store per family of like tasks, least recently used out.

A *slot store* holds the weights of up to ``capacity`` tasks of one family (tasks whose weights have the same
layout, e.g. fine-tuned late forks of one shape, :mod:`continual_mem.fork_batch`) as one flat device tensor, one
row per slot (row 0 stays zero: the empty slot). A routed pass asks :meth:`SlotStore.ensure` for its tasks' slots;
a task not resident is copied in (one copy per task from a host pack, asynchronous on CUDA, on a copy stream that
the compute stream waits for), evicting the least recently used task the pass does not need.

Tasks may live on the host: :func:`offload` moves a task's weights into one pinned host buffer (its parameters
become views of it), so a model's task count is not capped by device memory; such a task runs in routed passes
only (:func:`paged`). Copies are exact, and which slot a task sits in is only an address, so a routed answer is
the same whether the task was resident, paged in, or moved between slots.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

_PACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # task -> its flat host pack (offloaded tasks)
_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # task -> its entries' tensors (resident tasks)


@dataclass(frozen=True)
class Layout:
    """Where each of a family's per-task tensors sits in a slot's flat row: ``(name, shape)`` in order. A task's
    tensor may be shorter on the first axis than its entry (a head with fewer classes): it fills the top rows and
    the rest is not read."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def offsets(self) -> dict[str, tuple[int, tuple[int, ...]]]:
        out, at = {}, 0
        for name, shape in self.entries:
            out[name] = (at, shape)
            at += _numel(shape)
        return out

    @property
    def size(self) -> int:
        return sum(_numel(s) for _, s in self.entries)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def entry_views(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of ``flat`` (``(..., layout.size)``) per entry, ``(..., *shape)``."""
    lead = flat.shape[:-1]
    return {name: flat[..., at:at + _numel(shape)].view(*lead, *shape) for name, (at, shape) in layout.offsets.items()}


def fence(device: torch.device) -> torch.cuda.Event | None:
    """An event at the compute stream's current position (None off CUDA): a store may overwrite slots once the
    work queued before it is done, so its copies overlap what is queued after (the backbone)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class SlotStore:
    """A family's device slots (see the module doc). ``sources(task)`` gives a task's tensors in layout order;
    ``capacity`` None grows the store to hold every task asked for (from ``slots``)."""

    def __init__(self, layout: Layout, sources, *, device: torch.device, dtype: torch.dtype,
                 capacity: int | None = None, slots: int = 1) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"a slot store needs capacity >= 1, got {capacity}")
        self.layout = layout
        self.sources = sources
        self.capacity = capacity
        self.device, self.dtype = device, dtype
        size = capacity if capacity is not None else max(1, slots)  # ``slots``: the first size of a growing store
        self.flat = torch.zeros(1 + size, layout.size, device=device, dtype=dtype)
        self.resident: OrderedDict[str, tuple[int, object, int]] = OrderedDict()  # name -> (slot, task ref, stamp)
        self.free = list(range(self.flat.shape[0] - 1, 0, -1))
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.page_ins = 0

    @property
    def slots(self) -> int:
        return self.flat.shape[0] - 1

    def views(self) -> dict[str, torch.Tensor]:
        """Every entry of every slot, ``(1 + slots, *shape)``."""
        return entry_views(self.flat, self.layout)

    def ensure(self, tasks: Sequence, *, after: torch.cuda.Event | None = None) -> dict[str, int]:
        """Each task's slot, paging in the tasks not resident (or changed since). ``after``: copies wait for it
        (else for everything queued so far); the current stream then waits for the copies."""
        need = list({t.name: t for t in tasks}.values())
        if self.capacity is not None and len(need) > self.capacity:
            raise ValueError(f"{len(need)} tasks asked at once but the store holds {self.capacity}; ask in chunks "
                             "(chunks) or raise the capacity")
        out, missing = {}, []
        for t in need:
            hit = self.resident.get(t.name)
            if hit is not None and hit[1]() is t and hit[2] == stamp(t):
                self.resident.move_to_end(t.name)
                out[t.name] = hit[0]
            else:
                missing.append(t)
        if not missing:
            return out
        new = sum(t.name not in self.resident for t in missing)  # a changed task keeps its slot
        if self.capacity is None and len(self.free) < new:
            self._grow(self.slots + new)
        wanted = {t.name for t in need}
        for name in list(self.resident):  # least recently used first
            if len(self.free) >= new:
                break
            if name not in wanted:
                self.free.append(self.resident.pop(name)[0])
        self._page_in(missing, out, after)
        return out

    @torch.no_grad()
    def _grow(self, slots: int) -> None:
        new = torch.zeros(1 + max(slots, 2 * self.slots), self.layout.size, device=self.device, dtype=self.dtype)
        new[:self.flat.shape[0]].copy_(self.flat)
        self.free = list(range(new.shape[0] - 1, self.flat.shape[0] - 1, -1)) + self.free
        self.flat = new

    def _page_in(self, tasks: list, out: dict[str, int], after) -> None:
        stream = self.copy_stream
        if stream is not None:
            stream.wait_event(after) if after is not None else stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for t in tasks:
                old = self.resident.pop(t.name, None)
                slot = old[0] if old is not None else self.free.pop()
                self._copy(t, self.flat[slot])
                self.resident[t.name] = (slot, weakref.ref(t), stamp(t))
                out[t.name] = slot
                self.page_ins += 1
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        log.debug("paged in %d tasks (%d resident of %d slots)", len(tasks), len(self.resident), self.slots)

    @torch.no_grad()
    def _copy(self, task, row: torch.Tensor) -> None:
        pack = _PACKS.get(task)
        if pack is not None and paged(task):
            row.copy_(pack, non_blocking=True)  # one copy from pinned host memory
            return
        views = entry_views(row, self.layout)  # a shorter head leaves rows whose logits are never read
        for (name, _), src in zip(self.layout.entries, self.sources(task)):
            views[name][:src.shape[0]].copy_(src, non_blocking=True)
            if src.is_cuda:  # read on the copy stream: the allocator must not hand its memory out before that
                src.record_stream(torch.cuda.current_stream())


def stamp(task) -> int:
    """Changes whenever one of the task's paged tensors is written in place (version counters only grow)."""
    pack = _PACKS.get(task)
    if pack is not None and paged(task):
        return pack._version  # its parameters are views of the pack: they share its version counter
    params = _PARAMS.get(task)
    if params is None:
        params = _PARAMS[task] = [p for p in task.parameters()]
    return sum(p._version for p in params)


def chunks(names: Sequence[str], capacity: int | None) -> list[list[str]]:
    """``names`` in runs a store of ``capacity`` holds at once (policy, pure; None: one run)."""
    if capacity is None or len(names) <= capacity:
        return [list(names)]
    return [list(names[i:i + capacity]) for i in range(0, len(names), capacity)]


def offload(task, layout: Layout, sources, modules: dict[str, tuple[nn.Module, str]]) -> int:
    """Move ``task``'s paged tensors into one host buffer (pinned where CUDA is present): ``modules[entry]`` is
    the (module, attribute) owning each entry's parameter, rebound to a view of the buffer. Returns its bytes."""
    with torch.inference_mode(False):  # the pack's version counter is its stamp: not an inference tensor
        return _offload(task, layout, sources, modules)


def _offload(task, layout: Layout, sources, modules: dict[str, tuple[nn.Module, str]]) -> int:
    srcs = list(sources(task))
    flat = torch.zeros(layout.size, dtype=srcs[0].dtype, pin_memory=torch.cuda.is_available())
    views = entry_views(flat, layout)
    for (name, _), src in zip(layout.entries, srcs):
        view = views[name][:src.shape[0]]
        view.copy_(src.detach())
        owner, attr = modules[name]
        old = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(view, requires_grad=old.requires_grad))
    _PACKS[task] = flat
    _PARAMS.pop(task, None)
    return flat.numel() * flat.element_size()


def paged(task) -> bool:
    """Whether ``task``'s weights live in its host pack (:func:`offload`), not on its model's device."""
    pack = _PACKS.get(task)
    return pack is not None and task.tokens is not None and task.tokens.data_ptr() == pack.data_ptr()


def paged_names(tasks) -> list[str]:
    """The names of the paged ones among ``tasks`` (quick when nothing was ever offloaded)."""
    return [t.name for t in tasks if paged(t)] if len(_PACKS) else []
