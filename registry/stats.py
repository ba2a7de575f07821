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


def _row(model: Model, task_name: str) -> Task:
    row = next((t for t in model.tasks if t.name == task_name), None)
    if row is None:
        raise RegistryError(f"model {model.name!r} has no task {task_name!r}; see `continual-mem tasks`")
    return row


def store(s: Session, model: Model, task_name: str, data: bytes) -> None:
    """Attach ``data`` (:meth:`ClassStats.to_bytes`) to ``task_name``; refused if the task has statistics already
    (they never change) or if they do not fit the task."""
    row = _row(model, task_name)
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
        r = found[t.id]
        if api.sha256(r.data) != r.sha256:
            raise RegistryError(f"task {t.name!r}'s stored class statistics are corrupted (sha256 mismatch)")
        out.append(ClassStats.from_bytes(r.data, source=f"class statistics of {t.name!r}"))
    return out


def has_stats(s: Session, model: Model) -> dict[str, bool]:
    ids = set(s.scalars(select(TaskStats.task_id).where(TaskStats.task_id.in_([t.id for t in model.tasks]))))
    return {t.name: t.id in ids for t in model.tasks}


def check(s: Session, model: Model, report: Report, only: Collection[str] | None = None) -> Report:
    """``report`` with each checked task's stored statistics checked too: bytes against their sha256, readable,
    still the task's. A task whose outputs are equal but whose statistics are not is reported ``corrupt``."""
    names = {c.name for c in report.tasks}
    rows = {t.id: t for t in model.tasks if t.name in names and (only is None or t.name in only)}
    bad: dict[str, str] = {}
    for r in s.scalars(select(TaskStats).where(TaskStats.task_id.in_(list(rows))).options(undefer(TaskStats.data))):
        name = rows[r.task_id].name
        if api.sha256(r.data) != r.sha256:
            bad[name] = "stored class statistics do not match their sha256"
            continue
        try:
            stats = ClassStats.from_bytes(r.data)
        except StatsError as exc:
            bad[name] = f"stored class statistics unreadable: {exc}"
            continue
        if stats.task != name or stats.num_classes != rows[r.task_id].num_classes:
            bad[name] = f"stored class statistics belong to task {stats.task!r} ({stats.num_classes} classes)"
    if not bad:
        return report
    report.tasks = [TaskCheck(c.name, "corrupt", c.max_abs_diff, "; ".join(filter(None, [c.detail, bad[c.name]])))
                    if c.name in bad else c for c in report.tasks]
    return report
