"""How a served batch routes (policy, pure): which images take a routed pass and with which tasks, the batch
sizes passes run at, which graphs a model's warm-up captures, and where each image's answers lie in a routed
graph's output."""
from __future__ import annotations

from collections.abc import Container, Sequence


def routes_for(asked: list[tuple[str, ...] | None], known: list[str], *,
               route_all: bool = False) -> list[list[str]] | None:
    """Each image's tasks for a routed pass, or ``None`` when every image asks for every task (the all-task pass)
    (policy, pure). ``route_all``: the model cannot run the all-task pass (paged tasks), every pass routes. A task
    no longer in the model (removed while the request waited) is left out; the request then finds it missing from
    its answer."""
    if all(a is None for a in asked) and not route_all:
        return None
    have = set(known)
    return [list(known) if a is None else [n for n in a if n in have] for a in asked]


WARM_EVERY_TASK_MAX = 64  # tasks; above it the all-task pass's graphs are captured on first use


def warm_every_task(tasks: int, *, paged: bool) -> bool:
    """Whether warming a model captures its all-task graphs (policy, pure): not for a model with paged tasks (it
    has no all-task pass) nor one of more than :data:`WARM_EVERY_TASK_MAX` tasks. Requests to such a model name
    their tasks; capturing every task's pass for every bucket took 226 s at K = 1,001 (H200), which a live swap
    then waits for."""
    return not paged and tasks <= WARM_EVERY_TASK_MAX


def bucket_for(n: int, max_batch: int) -> int:
    """The batch size a pass of ``n`` images runs at: the next power of two, capped at ``max_batch`` (so a few
    graphs cover every size, and a fixed image meets the same kernels whatever else shares its batch bucket)."""
    if not 1 <= n <= max_batch:
        raise ValueError(f"need 1 <= n <= max_batch, got n={n}, max_batch={max_batch}")
    return min(1 << (n - 1).bit_length(), max_batch)


def answer_rows(rows: Sequence[Sequence[tuple[str, int, int]]], origin: Sequence[int],
                routes: Sequence[Sequence[str]], width: int, keep: Container[str]) -> list[list[tuple[str, int, int]]]:
    """Each image's ``(task, start, end)`` in a routed graph's flattened output of ``width`` columns per graph row:
    graph row ``r`` holds (``rows[r]``, :attr:`~continual_mem.routed_graph.Layout.rows`) part of image
    ``origin[r]``'s tasks (:meth:`~continual_mem.routed_graph.RoutedGraph.split`). In the order the image asked
    for them (``routes``), tasks outside ``keep`` left out."""
    found: list[dict[str, tuple[str, int, int]]] = [{} for _ in routes]
    for r, (b, row) in enumerate(zip(origin, rows)):
        for name, lo, hi in row:
            found[b].setdefault(name, (name, r * width + lo, r * width + hi))
    return [[found[b][n] for n in dict.fromkeys(route) if n in found[b] and n in keep]
            for b, route in enumerate(routes)]
