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
    tokens = [t.name for t in model.tasks if TaskConfig.from_dict(t.config).has_tokens]
    if (problem := extension_mismatch(config, tokens, owner=owner, fix="retrain it on the current model")) is not None:
        raise RegistryError(problem)
    position = (s.scalar(select(func.max(Task.position)).where(Task.model_id == model.id)) or 0) + 1
    row = Task(model=model, name=config.name, position=position, dataset=config.dataset, mode=config.mode,
               regime=config.regime, memory=config.memory, layers=list(config.layers),
               num_classes=config.num_classes, class_names=list(config.class_names), config=config.to_dict(),
               param_count=sum(t.numel() for t in tensors.values()))
    row.params = TaskParams(data=data, sha256=api.sha256(data), size=len(data))
    s.add(row)
    s.flush()
    report = api.check(s, model, trigger=f"{kind}:{config.name}", backbone=backbone, new=[config.name])
    if not report.ok:
        raise VerificationFailed(failure_message(report, f"{kind} of task {config.name!r}"), report)
    out = next(c for c in report.tasks if c.name == config.name).logits
    raw = out.numpy().tobytes()
    row.reference = Reference(logits=raw, sha256=api.sha256(raw), shape=list(out.shape),
                              dtype=str(out.dtype).removeprefix("torch."), build=report.build)
    for m in metrics:
        row.metrics.append(Metric(**m))
    api.record_report(s, model, report)
    api.log_event(s, kind, model.name, config.name, regime=config.regime, mode=config.mode, source=source,
                  sha256=row.params.sha256)
    return report


def add_task(
    s: Session, model_name: str, net: MemoryViT, task_name: str, *, metrics: Sequence[dict] = ()
) -> Report:
    """Store ``net``'s task ``task_name`` (parameters, reference outputs, metrics) and verify older tasks."""
    model = api.get_model(s, model_name, for_update=True)
    if task_name not in net.tasks:
        raise RegistryError(f"the model being stored has no task {task_name!r}; its tasks are {net.task_names}")
    return insert_and_verify(s, model, export_task_bytes(net, task_name), kind="add", source=f"task {task_name!r}",
                             backbone=net.backbone, metrics=metrics)


def import_bundle(
    s: Session, model_name: str, data: bytes, *, source: str, backbone: VisionTransformer | None = None
) -> Report:
    model = api.get_model(s, model_name, for_update=True)
    return insert_and_verify(s, model, data, kind="import", source=source, backbone=backbone)


def _task_row(model: Model, task_name: str) -> Task:
    row = next((t for t in model.tasks if t.name == task_name), None)
    if row is None:
        raise RegistryError(f"model {model.name!r} has no task {task_name!r}; see `continual-mem tasks`")
    return row


def export_bundle(s: Session, model_name: str, task_name: str) -> bytes:
    """The stored bundle (safetensors + JSON config + backbone fingerprint), checked against its sha256."""
    row = _task_row(api.get_model(s, model_name), task_name)
    if api.sha256(row.params.data) != row.params.sha256:
        raise RegistryError(f"task {task_name!r}'s stored parameters are corrupted (sha256 mismatch)")
    return row.params.data


def remove_task(s: Session, model_name: str, task_name: str, *, backbone: VisionTransformer | None = None) -> Report:
    model = api.get_model(s, model_name, for_update=True)
    row = _task_row(model, task_name)
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
