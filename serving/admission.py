"""Which queued requests share the next pass of a model with paged tasks (``serve --page-forks``).

A routed pass pages in the paged tasks its rows ask for, least recently used out; one that asks for more than
the model's slots (``--resident-tasks``) runs in chunks and pages every one of them in again, so requests spread
over many paged tasks thrash (docs/many_tasks.md: 32 forks, 8 slots, 249 images/s). As S-LoRA batches requests by
adapter, the batcher fills a pass with the oldest requests whose paged tasks fit the slots together and leaves
the others first in line for the next pass: the oldest request always runs, so none waits for ever. A request's
answer does not depend on which others share its pass (tests/test_batching_properties.py), so this changes when
requests run, never what they get.
"""
from __future__ import annotations

from collections.abc import Sequence


def fits_slots(asked: Sequence[tuple[str, ...] | None], *, paged: frozenset[str], slots: int | None,
               every: Sequence[str] = ()) -> list[bool]:
    """For queued requests oldest first (``asked``: each one's tasks; None: every task, ``every``), whether each
    joins the next pass (policy, pure): the first always; a later one while the pass's distinct paged tasks,
    with its own, stay within ``slots``. Without paged tasks or a slot limit, all of them."""
    if not paged or slots is None:
        return [True] * len(asked)
    used: set[str] = set()
    out = []
    for i, tasks in enumerate(asked):
        mine = paged.intersection(every if tasks is None else tasks)
        ok = i == 0 or len(used | mine) <= slots
        if ok:
            used |= mine
        out.append(ok)
    return out


def split(batch: list, asked: Sequence[tuple[str, ...] | None], *, paged: frozenset[str], slots: int | None,
          every: Sequence[str] = ()) -> tuple[list, list]:
    """``batch`` (in ``asked``'s order) as the requests that run now and those that wait for the next pass."""
    mask = fits_slots(asked, paged=paged, slots=slots, every=every)
    return [b for b, ok in zip(batch, mask) if ok], [b for b, ok in zip(batch, mask) if not ok]
