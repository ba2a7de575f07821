"""Verification spread over worker processes: each checks a contiguous part of the tasks (with the tasks they
read) in a process of its own, at the registry's verification thread count, so the bits are the one-process
check's (a task's logits do not depend on the other tasks of a pass). Threads would not do: the CPU thread count
that decides a forward's bits is per thread in PyTorch, and one process's threads share the interpreter."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from . import api
from .api import TaskCheck
from .db import open_engine, session


def parts(names: Sequence[str], workers: int) -> list[list[str]]:
    """``names`` in ``workers`` contiguous parts of near-equal size, none empty (policy, pure)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n = min(workers, len(names))
    size, extra = divmod(len(names), n) if n else (0, 0)
    out, at = [], 0
    for i in range(n):
        k = size + (i < extra)
        out.append(list(names[at:at + k]))
        at += k
    return out


def _check_part(url: str, model_name: str, names: list[str]) -> list[TaskCheck]:
    engine = open_engine(url, read_only=True)  # beside the caller's transaction, which holds the write lock
    with session(engine) as s:
        model = api.get_model(s, model_name)
        return api.check(s, model, trigger="part", backbone=api.instantiate_backbone(model.backbone),
                         only=names).tasks


def check_in_parallel(url: str, model_name: str, names: Sequence[str], workers: int) -> dict[str, TaskCheck]:
    """Every task of ``names`` (and the tasks they read) checked in ``workers`` processes, by task name."""
    found: dict[str, TaskCheck] = {}
    if not names:
        return found
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for checks in pool.map(_check_part, *zip(*[(url, model_name, p) for p in parts(names, workers)])):
            for c in checks:
                found.setdefault(c.name, c)  # a task read by two parts: checked twice, the same bits
    return found
