"""Class statistics in the registry: written once per task (with the task, or later), read for task-agnostic
prediction, checked by ``verify``. Each function takes a session and never commits."""
from __future__ import annotations

from collections.abc import Collection, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from continual_mem.class_stats import ClassStats, StatsError

from . import api
from .api import Report, TaskCheck
from .errors import RegistryError
from .schema import Model, Task, TaskStats


def store(s: Session, model: Model, task_name: str, data: bytes) -> None:
    """Attach ``data`` (:meth:`ClassStats.to_bytes`) to ``task_name``; refused if the task has statistics already
    (they never change) or if they do not fit the task."""
    row = api.task_row(model, task_name)
    if s.scalar(select(TaskStats.task_id).where(TaskStats.task_id == row.id)) is not None:
        raise RegistryError(f"task {task_name!r} already has class statistics; they are written once and never "
                            "change (add the task again under another name to recompute them)")
    try:
        stats = ClassStats.from_bytes(data, source=f"class statistics of {task_name!r}")
    except StatsError as exc:
        raise RegistryError(str(exc)) from None
    if stats.task != task_name or stats.num_classes != row.num_classes:
        raise RegistryError(f"class statistics of task {stats.task!r} with {stats.num_classes} classes do not fit "
                            f"task {task_name!r} ({row.num_classes} classes); compute them for this task")
    s.add(TaskStats(task_id=row.id, data=data, sha256=api.sha256(data), size=len(data)))
    s.flush()


def read(s: Session, model: Model, names: Sequence[str] | None = None) -> list[ClassStats]:
    """The statistics of ``names`` (default: every task), in the model's task order; a task without statistics, or
    with corrupt ones, is a :class:`RegistryError` naming the fix."""
    rows = [t for t in model.tasks if names is None or t.name in names]
    if names is not None and (unknown := sorted(set(names) - {t.name for t in rows})):
        raise RegistryError(f"model {model.name!r} has no tasks {unknown}; see `continual-mem tasks`")
    found = {r.task_id: r for r in s.scalars(select(TaskStats).where(TaskStats.task_id.in_([t.id for t in rows]))
                                             .options(undefer(TaskStats.data)))}
    missing = [t.name for t in rows if t.id not in found]
    if missing:
        raise RegistryError(f"tasks {missing[:5]}{' …' if len(missing) > 5 else ''} have no class statistics; "
                            f"compute them with `continual-mem stats {missing[0]}` (once per task)")
    out = []
    for t in rows:
        got, problem = _stored(found[t.id], t)
        if problem is not None:
            raise RegistryError(f"task {t.name!r}'s stored class statistics are corrupted ({problem})")
        out.append(got)
    return out


def _stored(row: TaskStats, task: Task) -> tuple[ClassStats | None, str | None]:
    """A stored row's statistics, or what is wrong with them: bytes against their sha256, readable, the task's."""
    if api.sha256(row.data) != row.sha256:
        return None, "do not match their sha256"
    try:
        got = ClassStats.from_bytes(row.data)
    except StatsError as exc:
        return None, f"unreadable: {exc}"
    if got.task != task.name or got.num_classes != task.num_classes:
        return None, f"belong to task {got.task!r} ({got.num_classes} classes)"
    return got, None


def with_stats(s: Session, model: Model) -> set[str]:
    """The model's tasks that have class statistics (one query, no bytes read)."""
    ids = set(s.scalars(select(TaskStats.task_id).where(TaskStats.task_id.in_([t.id for t in model.tasks]))))
    return {t.name for t in model.tasks if t.id in ids}


def check(s: Session, model: Model, report: Report, only: Collection[str] | None = None) -> Report:
    """``report`` with each checked task's stored statistics checked too: bytes against their sha256, readable,
    still the task's. A task whose outputs are equal but whose statistics are not is reported ``corrupt``."""
    names = {c.name for c in report.tasks}
    rows = {t.id: t for t in model.tasks if t.name in names and (only is None or t.name in only)}
    bad: dict[str, str] = {}
    for r in s.scalars(select(TaskStats).where(TaskStats.task_id.in_(list(rows))).options(undefer(TaskStats.data))):
        _, problem = _stored(r, rows[r.task_id])
        if problem is not None:
            bad[rows[r.task_id].name] = f"stored class statistics {problem}"
    if not bad:
        return report
    report.tasks = [TaskCheck(c.name, "corrupt", c.max_abs_diff, "; ".join(filter(None, [c.detail, bad[c.name]])))
                    if c.name in bad else c for c in report.tasks]
    return report
