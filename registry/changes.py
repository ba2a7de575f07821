"""Registry changes: add, import, export and remove a task. Each takes a session and never commits; a change and
the verification of every other task (:func:`registry.api.check`) commit or roll back together."""
from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from timm.models.vision_transformer import VisionTransformer

from continual_mem import MemoryViT, TaskConfig
from continual_mem.checks import dependants, extension_mismatch, name_taken, removal_refused
from continual_mem.state import export_task_bytes, read_task_bytes

from . import api
from .api import Report
from .errors import RegistryError, VerificationFailed
from .schema import Metric, Model, Reference, Task, TaskParams


def failure_message(report: Report, change: str) -> str:
    parts = [f"{c.name} ({c.status}{'' if c.max_abs_diff is None else f', max abs diff {c.max_abs_diff:.3g}'}"
             f"{': ' + c.detail if c.detail else ''})" for c in report.failing()]
    return f"{change} rolled back: verification failed for {', '.join(parts)}"


# ---------------------------------------------------------------- changes
def insert_and_verify(
    s: Session,
    model: Model,
    data: bytes,
    *,
    kind: str,
    source: str,
    backbone: VisionTransformer | None,
    metrics: Sequence[dict] = (),
) -> Report:
    """Store one task bundle and verify every task with it (see :func:`insert_many_and_verify`)."""
    return insert_many_and_verify(s, model, [(data, source, metrics)], kind=kind, backbone=backbone)


def insert_many_and_verify(
    s: Session,
    model: Model,
    bundles: Sequence[tuple[bytes, str, Sequence[dict]]],
    *,
    kind: str,
    backbone: VisionTransformer | None,
) -> Report:
    """Store task bundles ``(data, source, metrics)`` in order, then verify every task in one check: the new ones
    get their reference outputs, every older one must answer bit for bit as stored. Nothing is committed here."""
    tokens = [t.name for t in model.tasks if TaskConfig.from_dict(t.config).has_tokens]  # extended as rows come
    rows = [_insert(s, model, data, source=source, metrics=metrics, tokens=tokens) for data, source, metrics in bundles]
    s.flush()
    names = [row.name for row, _ in rows]
    trigger = f"{kind}:{names[0]}" if len(names) == 1 else f"{kind}:{len(names)} tasks"
    report = api.check(s, model, trigger=trigger, backbone=backbone, new=names)
    if not report.ok:
        what = f"task {names[0]!r}" if len(names) == 1 else f"{len(names)} tasks ({names[0]!r} to {names[-1]!r})"
        raise VerificationFailed(failure_message(report, f"{kind} of {what}"), report)
    logits = {c.name: c.logits for c in report.tasks if c.name in names}
    for row, source in rows:
        raw = logits[row.name].numpy().tobytes()
        row.reference = Reference(logits=raw, sha256=api.sha256(raw), shape=list(logits[row.name].shape),
                                  dtype=str(logits[row.name].dtype).removeprefix("torch."), build=report.build)
    api.record_report(s, model, report)
    for row, source in rows:
        api.log_event(s, kind, model.name, row.name, regime=row.regime, mode=row.mode, source=source,
                      sha256=row.params.sha256)
    return report


def _insert(s: Session, model: Model, data: bytes, *, source: str, metrics: Sequence[dict],
            tokens: list[str]) -> tuple[Task, str]:
    """One bundle checked (backbone, name, extension order against the model's token tasks ``tokens``, to which
    it is appended) and added to ``model`` as its last task."""
    config, tensors, meta = read_task_bytes(data, source=source)
    if meta.get("backbone_fingerprint") != model.backbone.fingerprint:
        raise RegistryError(
            f"{source}: task {config.name!r} was trained on backbone {meta.get('backbone_fingerprint', '?')[:12]}…, "
            f"model {model.name!r} uses {model.backbone.fingerprint[:12]}…; import it into a model with that backbone"
        )
    owner = f"model {model.name!r}"
    if (problem := name_taken(config.name, (t.name for t in model.tasks), owner=owner,
                              fix="remove it or rename")) is not None:
        raise RegistryError(problem)
    if (problem := extension_mismatch(config, tokens, owner=owner, fix="retrain it on the current model")) is not None:
        raise RegistryError(problem)
    if config.has_tokens:
        tokens.append(config.name)
    position = (s.scalar(select(func.max(Task.position)).where(Task.model_id == model.id)) or 0) + 1
    row = Task(model=model, name=config.name, position=position, dataset=config.dataset, mode=config.mode,
               regime=config.regime, memory=config.memory, layers=list(config.layers),
               num_classes=config.num_classes, class_names=list(config.class_names), config=config.to_dict(),
               param_count=sum(t.numel() for t in tensors.values()))
    row.params = TaskParams(data=data, sha256=api.sha256(data), size=len(data))
    for m in metrics:
        row.metrics.append(Metric(**m))
    s.add(row)
    s.flush()  # the next bundle's position and name checks see this one
    return row, source


def add_task(
    s: Session, model_name: str, net: MemoryViT, task_name: str, *, metrics: Sequence[dict] = ()
) -> Report:
    """Store ``net``'s task ``task_name`` (parameters, reference outputs, metrics) and verify older tasks."""
    model = api.get_model(s, model_name, for_update=True)
    if task_name not in net.tasks:
        raise RegistryError(f"the model being stored has no task {task_name!r}; its tasks are {net.task_names}")
    return insert_and_verify(s, model, export_task_bytes(net, task_name), kind="add", source=f"task {task_name!r}",
                             backbone=net.backbone, metrics=metrics)


def import_bundles(
    s: Session, model_name: str, bundles: Sequence[tuple[bytes, str]], *, backbone: VisionTransformer | None = None
) -> Report:
    """Several bundles ``(data, source)`` in one change: appended in order, then one verification of every task
    (instead of one per bundle: importing K tasks costs one check, not K)."""
    if not bundles:
        raise RegistryError("no bundle to import; give one or more task files")
    model = api.get_model(s, model_name, for_update=True)
    return insert_many_and_verify(s, model, [(data, source, ()) for data, source in bundles], kind="import",
                                  backbone=backbone)


def export_bundle(s: Session, model_name: str, task_name: str) -> bytes:
    """The stored bundle (safetensors + JSON config + backbone fingerprint), checked against its sha256."""
    row = api.task_row(api.get_model(s, model_name), task_name)
    if api.sha256(row.params.data) != row.params.sha256:
        raise RegistryError(f"task {task_name!r}'s stored parameters are corrupted (sha256 mismatch)")
    return row.params.data


def remove_task(s: Session, model_name: str, task_name: str, *, backbone: VisionTransformer | None = None) -> Report:
    model = api.get_model(s, model_name, for_update=True)
    row = api.task_row(model, task_name)
    readers = dependants(task_name, {t.name: t.config.get("sees", []) for t in model.tasks})
    if (problem := removal_refused(task_name, readers)) is not None:
        raise RegistryError(problem)
    model.tasks.remove(row)
    s.delete(row)
    s.flush()
    report = api.check(s, model, trigger=f"remove:{task_name}", backbone=backbone)
    if not report.ok:
        raise VerificationFailed(failure_message(report, f"removal of task {task_name!r}"), report)
    api.record_report(s, model, report)
    api.log_event(s, "remove", model_name, task_name)
    return report
