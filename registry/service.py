"""``Registry``: the transaction owner. Each change runs in one transaction with its verification; a refused or
failed change is rolled back whole and then logged (with its verification report) in a transaction of its own."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from timm.models.vision_transformer import VisionTransformer

from continual_mem import MemoryViT
from continual_mem.class_stats import ClassStats

from . import api, changes, parallel, stats
from .db import open_engine, session, to_url
from .errors import RegistryError, VerificationFailed
from .schema import Event, Model, Task, VerificationRun, utcnow

# events that change what a model computes (class statistics: what its task-agnostic answers are)
CHANGE_EVENTS = ("init", "add", "import", "remove", "stats")

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_MODEL = "default"


class Registry:
    """A task registry at a SQLAlchemy URL or SQLite file path.

    Args:
        location: ``sqlite:///path.db``, ``postgresql+psycopg://...``, or a plain file path (SQLite).
    """

    def __init__(self, location: str | Path) -> None:
        self.url = to_url(location)
        self.engine = open_engine(location)
        self._backbones: dict[str, VisionTransformer] = {}

    def __repr__(self) -> str:
        return f"Registry({self.engine.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------ helpers
    def _backbone(self, s: Session, model_name: str) -> VisionTransformer:
        row = api.get_model(s, model_name).backbone
        if row.fingerprint not in self._backbones:
            self._backbones[row.fingerprint] = api.instantiate_backbone(row)
        return self._backbones[row.fingerprint]

    def _change(self, op: str, model_name: str, task_name: str | None, fn: Callable[[Session], T]) -> T:
        try:
            with session(self.engine) as s:
                return fn(s)
        except VerificationFailed as exc:
            with session(self.engine) as s:
                api.record_report(s, api.get_model(s, model_name), exc.report)
                api.log_event(s, "failure", model_name, task_name, op=op, error=str(exc))
            raise
        except ValueError as exc:  # RegistryError, TaskError, TaskStateError, config errors
            with session(self.engine) as s:
                api.log_event(s, "failure", model_name, task_name, op=op, error=str(exc))
            raise

    # ------------------------------------------------------------ models
    def create_model(
        self,
        backbone: VisionTransformer,
        *,
        timm_name: str,
        name: str = DEFAULT_MODEL,
        model_kwargs: dict | None = None,
        weights_source: str = "embedded",
        probe: torch.Tensor | None = None,
        probe_size: int = 4,
        group_size: int = 4,
    ) -> None:
        """Register ``backbone`` (see :func:`registry.api.register_backbone`) and an empty model on it."""

        def run(s: Session) -> None:
            row = api.register_backbone(s, backbone, timm_name=timm_name, model_kwargs=model_kwargs,
                                        weights_source=weights_source)
            api.create_model(s, name, row, probe=probe, probe_size=probe_size, group_size=group_size)

        self._change("init", name, None, run)

    def models(self) -> list[str]:
        with session(self.engine) as s:
            return list(s.scalars(select(Model.name).order_by(Model.id)))

    def model_version(self, name: str = DEFAULT_MODEL) -> int:
        """A number that grows with every change of ``name``'s task set (init, add, import, remove): the id of
        its latest such event in the append-only log. Cheap to poll (servers watch it to pick up new tasks)."""
        with session(self.engine) as s:
            api.get_model(s, name)
            return int(s.scalar(select(func.max(Event.id)).where(
                Event.model_name == name, Event.kind.in_(CHANGE_EVENTS))) or 0)

    def load(self, name: str = DEFAULT_MODEL, *, tasks: Sequence[str] | None = None) -> MemoryViT:
        """The model from stored bytes only: the backbone and every task in order, or only ``tasks`` and the
        earlier tasks they read (``[]``: the backbone alone; what training a concatenation-mode task needs)."""
        with session(self.engine) as s:
            return api.load_model(s, name, backbone=self._backbone(s, name), tasks=tasks)

    # ------------------------------------------------------------ changes
    def add_task(
        self, net: MemoryViT, task_name: str, *, name: str = DEFAULT_MODEL, metrics: Sequence[dict] = (),
        class_stats: ClassStats | None = None,
    ) -> api.Report:
        """Store ``net``'s task ``task_name`` (and its class statistics, in the same transaction) and verify."""
        def run(s: Session) -> api.Report:
            report = changes.add_task(s, name, net, task_name, metrics=metrics)
            if class_stats is not None:
                stats.store(s, api.get_model(s, name), task_name, class_stats.to_bytes())
            return report

        return self._change("add", name, task_name, run)

    def set_class_stats(self, task_name: str, class_stats: ClassStats, *, name: str = DEFAULT_MODEL) -> None:
        """Write a task's class statistics; refused if it has them already (they never change)."""
        def run(s: Session) -> None:
            stats.store(s, api.get_model(s, name, for_update=True), task_name, class_stats.to_bytes())
            api.log_event(s, "stats", name, task_name, classes=class_stats.num_classes)

        self._change("stats", name, task_name, run)

    def tasks_with_class_stats(self, *, name: str = DEFAULT_MODEL) -> set[str]:
        """The tasks that have class statistics (cheap: no task rows' details, no bytes)."""
        with session(self.engine) as s:
            return stats.with_stats(s, api.get_model(s, name))

    def class_stats(self, tasks: Sequence[str] | None = None, *, name: str = DEFAULT_MODEL) -> list[ClassStats]:
        """Class statistics of ``tasks`` (default every task) in task order; RegistryError for a task without."""
        with session(self.engine) as s:
            return stats.read(s, api.get_model(s, name), tasks)

    def import_bundle(self, bundle: bytes | str | Path, *, name: str = DEFAULT_MODEL) -> api.Report:
        return self.import_bundles([bundle], name=name)

    def import_bundles(self, bundles: Sequence[bytes | str | Path], *, name: str = DEFAULT_MODEL,
                       class_stats: Sequence[ClassStats] = ()) -> api.Report:
        """Task bundles (bytes or files) in one change and one verification of every task, with the class
        statistics of any of them; all or none is stored."""
        items = []
        for i, bundle in enumerate(bundles):
            if isinstance(bundle, (str, Path)):
                path = Path(bundle)
                if not path.is_file():
                    raise RegistryError(f"bundle file {path} does not exist")
                items.append((path.read_bytes(), str(path)))
            else:
                items.append((bundle, "bundle" if len(bundles) == 1 else f"bundle {i}"))
        def run(s: Session) -> api.Report:
            report = changes.import_bundles(s, name, items, backbone=self._backbone(s, name))
            for st in class_stats:
                stats.store(s, api.get_model(s, name), st.task, st.to_bytes())
            return report

        return self._change("import", name, None, run)

    def export_bundle(self, task_name: str, path: str | Path | None = None, *, name: str = DEFAULT_MODEL) -> bytes:
        with session(self.engine) as s:
            data = changes.export_bundle(s, name, task_name)
        if path is not None:
            path = Path(path)
            tmp = path.with_name(path.name + ".partial")
            tmp.write_bytes(data)
            tmp.replace(path)
        return data

    def remove_task(self, task_name: str, *, name: str = DEFAULT_MODEL) -> api.Report:
        return self._change("remove", name, task_name, lambda s: changes.remove_task(
            s, name, task_name, backbone=self._backbone(s, name)))

    def verify(self, *, name: str = DEFAULT_MODEL, tasks: Sequence[str] | None = None,
               since: int | None = None, workers: int = 1) -> api.Report:
        """Bit-exact check against the stored references, always recorded: every task, or only ``tasks``, or only
        the tasks added or imported after model version ``since`` (:meth:`model_version`); each with the earlier
        tasks it reads. ``workers`` > 1 spreads the tasks over that many processes (:mod:`registry.parallel`):
        the same bits, for hosts with cores to spare."""
        if workers < 1:
            raise RegistryError(f"workers must be >= 1, got {workers}")
        with session(self.engine) as s:
            model = api.get_model(s, name)
            only = None if tasks is None else list(tasks)
            if since is not None:
                if since < 0:
                    raise RegistryError(f"since must be a model version >= 0 (as `verify --json` reports it), "
                                        f"got {since}")
                added = set(s.scalars(select(Event.task_name).where(
                    Event.model_name == name, Event.kind.in_(("add", "import")), Event.id > since)))
                only = (only or []) + [t.name for t in model.tasks if t.name in added]
            trigger = "manual" if only is None else f"manual:{','.join(sorted(set(only))) or 'none'}"
            if workers > 1:
                report = self._check_in_parallel(s, model, trigger, only, workers)
            else:
                report = api.check(s, model, trigger=trigger, backbone=self._backbone(s, name), only=only)
            report = stats.check(s, model, report, only=only)
            api.record_report(s, model, report)
        return report

    def _check_in_parallel(self, s: Session, model: Model, trigger: str, only: list[str] | None,
                           workers: int) -> api.Report:
        started = utcnow()
        names = [t.name for t in model.tasks] if only is None else list(dict.fromkeys(only))
        found = parallel.check_in_parallel(self.url, model.name, names, workers)
        build = api.current_build(api.verify_threads(s))
        checks = [found[t.name] for t in model.tasks if t.name in found]  # model order, as one process reports
        return api.Report(model.name, trigger, build, started, utcnow(), checks)

    # ------------------------------------------------------------ reading
    def tasks(self, *, name: str = DEFAULT_MODEL) -> list[dict]:
        with session(self.engine) as s:
            model = api.get_model(s, name)
            with_stats = stats.with_stats(s, model)
            return [{"name": t.name, "position": t.position, "class_stats": t.name in with_stats,
                     "regime": t.regime, "mode": t.mode, "memory": t.memory,
                     "layers": t.layers, "num_classes": t.num_classes, "dataset": t.dataset,
                     "param_count": t.param_count, "params_sha256": t.params.sha256,
                     "params_bytes": t.params.size, "status": t.status,
                     "created_at": t.created_at.isoformat(),
                     "metrics": [{"split": m.split, "accuracy": m.accuracy, "loss": m.loss, "steps": m.steps,
                                  "wall_time_s": m.wall_time_s, "device": m.device} for m in t.metrics]}
                    for t in model.tasks]

    def events(self, *, name: str | None = None) -> list[dict]:
        with session(self.engine) as s:
            q = select(Event).order_by(Event.id)
            if name is not None:
                q = q.where(Event.model_name == name)
            return [{"at": e.at.isoformat(), "kind": e.kind, "model": e.model_name, "task": e.task_name,
                     "detail": e.detail} for e in s.scalars(q)]

    def verification_history(self, *, name: str = DEFAULT_MODEL) -> list[dict]:
        with session(self.engine) as s:
            model = api.get_model(s, name)
            runs = s.scalars(select(VerificationRun).where(VerificationRun.model_id == model.id)
                             .order_by(VerificationRun.id))
            return [{"id": r.id, "trigger": r.trigger, "ok": r.ok, "finished_at": r.finished_at.isoformat(),
                     "results": {x.task_name: x.status for x in r.results}} for r in runs]

    def task_names(self, *, name: str = DEFAULT_MODEL) -> list[str]:
        with session(self.engine) as s:
            model = api.get_model(s, name)
            return list(s.scalars(select(Task.name).where(Task.model_id == model.id).order_by(Task.position)))
