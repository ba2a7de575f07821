"""Registry data functions. Each takes a session and never commits: the caller owns the transaction
(``with registry.db.session(engine) as s:``), so a change and its verification commit or roll back together."""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import platform
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import timm
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy import select
from sqlalchemy.orm import Session, object_session, undefer
from timm.models.vision_transformer import VisionTransformer

from continual_mem import MemoryViT, TaskConfig, fingerprint
from continual_mem.backbone import freeze, validate_backbone
from continual_mem.state import build_task, read_task_bytes

from .errors import RegistryError
from .schema import (
    Backbone,
    Event,
    Meta,
    Model,
    Probe,
    Reference,
    Task,
    TaskParams,
    VerificationResult,
    VerificationRun,
    utcnow,
)

log = logging.getLogger(__name__)
FAILING = frozenset({"mismatch", "corrupt", "blocked"})


@dataclass
class TaskCheck:
    name: str
    status: str  # equal | mismatch | corrupt | blocked | not-comparable | new
    max_abs_diff: float | None = None
    detail: str = ""
    logits: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class Report:
    """Outcome of one verification: ``ok`` is False if any task is mismatched, corrupt or blocked."""

    model: str
    trigger: str
    build: dict
    started_at: dt.datetime
    finished_at: dt.datetime
    tasks: list[TaskCheck]

    @property
    def ok(self) -> bool:
        return not any(t.status in FAILING for t in self.tasks)

    def failing(self) -> list[TaskCheck]:
        return [t for t in self.tasks if t.status in FAILING]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- build / device facts
def verify_threads(s: Session) -> int:
    return int(s.scalar(select(Meta.value).where(Meta.key == "verify_threads")) or 1)


def current_build(threads: int) -> dict:
    """What decides the bits of a CPU float32 forward. References are only compared on an equal build."""
    return {
        "device": "cpu",
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": threads,
        "dtype": "float32",
    }


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- rows
def get_model(s: Session, name: str, *, for_update: bool = False) -> Model:
    q = select(Model).where(Model.name == name)
    if for_update:  # serialises writers on PostgreSQL; SQLite already holds the write lock (BEGIN IMMEDIATE)
        q = q.with_for_update()
    row = s.scalars(q).one_or_none()
    if row is None:
        known = s.scalars(select(Model.name)).all()
        hint = f"known models: {list(known)}" if known else "run `continual-mem init` first"
        raise RegistryError(f"no model named {name!r} in this registry; {hint}")
    return row


def task_row(model: Model, task_name: str) -> Task:
    row = next((t for t in model.tasks if t.name == task_name), None)
    if row is None:
        raise RegistryError(f"model {model.name!r} has no task {task_name!r}; see `continual-mem tasks`")
    return row


def log_event(s: Session, kind: str, model_name: str, task_name: str | None = None, **detail) -> None:
    s.add(Event(kind=kind, model_name=model_name, task_name=task_name, detail=detail))


def register_backbone(
    s: Session,
    backbone: VisionTransformer,
    *,
    timm_name: str,
    model_kwargs: dict | None = None,
    weights_source: str = "embedded",
) -> Backbone:
    """Record a backbone (deduplicated by fingerprint). ``weights_source="embedded"`` stores the weights in the
    database (self-contained registry); ``"pretrained"`` or ``"file:PATH"`` store only where they come from."""
    if not (weights_source in ("embedded", "pretrained") or weights_source.startswith("file:")):
        raise RegistryError(f"weights source {weights_source!r} not understood: use embedded, pretrained or file:PATH")
    cpu = backbone if next(backbone.parameters()).device.type == "cpu" else copy.deepcopy(backbone).cpu()
    fp = fingerprint(cpu)
    row = s.scalars(select(Backbone).where(Backbone.fingerprint == fp)).one_or_none()
    if row is not None:
        return row
    row = Backbone(
        timm_name=timm_name,
        model_kwargs=dict(model_kwargs or {}),
        weights_source=weights_source,
        weights=st_save({k: v.contiguous() for k, v in cpu.state_dict().items()}) if weights_source == "embedded" else None,
        fingerprint=fp,
        image_size=int(cpu.patch_embed.img_size[0]),
        timm_version=timm.__version__,
        torch_version=torch.__version__,
    )
    s.add(row)
    s.flush()
    return row


def instantiate_backbone(row: Backbone) -> VisionTransformer:
    """Rebuild a registered backbone and check its fingerprint."""
    from continual_mem.backbone import load_weights

    model = timm.create_model(row.timm_name, pretrained=row.weights_source == "pretrained", **row.model_kwargs)
    validate_backbone(model)
    if row.weights is not None:
        model.load_state_dict(st_load(row.weights), strict=True)
    elif row.weights_source.startswith("file:"):
        load_weights(model, row.weights_source.removeprefix("file:"))
    freeze(model)
    actual = fingerprint(model)
    if actual != row.fingerprint:
        raise RegistryError(
            f"backbone {row.timm_name} rebuilt from {row.weights_source} has fingerprint {actual[:12]}…, "
            f"registered {row.fingerprint[:12]}…; restore the original weights"
        )
    return model


def create_model(
    s: Session,
    name: str,
    backbone_row: Backbone,
    *,
    probe: torch.Tensor | None = None,
    probe_size: int = 4,
    seed: int = 0,
    group_size: int = 4,
) -> Model:
    """A new, empty model with its fixed probe batch (given, or ``randn`` from ``seed``)."""
    if group_size < 1:
        raise RegistryError(f"group size must be >= 1, got {group_size}")
    if s.scalars(select(Model).where(Model.name == name)).one_or_none() is not None:
        raise RegistryError(f"a model named {name!r} already exists in this registry; pick another --name")
    recipe: dict = {"kind": "given"}
    if probe is None:
        g = torch.Generator().manual_seed(seed)
        size = backbone_row.image_size
        probe = torch.randn(probe_size, 3, size, size, generator=g)
        recipe = {"kind": "randn", "seed": seed, "shape": list(probe.shape)}
    data = st_save({"images": probe.detach().to("cpu", torch.float32).contiguous()})
    row = Model(name=name, backbone=backbone_row, group_size=group_size)
    s.add(row)
    s.flush()
    s.add(Probe(model_id=row.id, recipe=recipe, data=data, sha256=sha256(data)))
    log_event(s, "init", name, backbone=backbone_row.timm_name, fingerprint=backbone_row.fingerprint)
    return row


def probe_images(s: Session, model: Model) -> torch.Tensor:
    probe = s.scalars(select(Probe).where(Probe.model_id == model.id)).one()
    if sha256(probe.data) != probe.sha256:
        raise RegistryError(f"the probe batch of model {model.name!r} is corrupted (sha256 mismatch)")
    return st_load(probe.data)["images"]


# ---------------------------------------------------------------- model assembly
def _cpu_backbone(backbone: VisionTransformer | None, row: Backbone) -> VisionTransformer:
    if backbone is None:
        return instantiate_backbone(row)
    p = next(backbone.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32:
        backbone = copy.deepcopy(backbone).to("cpu", torch.float32)
    return backbone


def closure(model: Model, tasks: Collection[str]) -> set[str]:
    """``tasks`` and every earlier task they read (an extension task reads the tokens of the tasks it sees)."""
    sees = {t.name: t.config.get("sees", []) for t in model.tasks}
    unknown = sorted(set(tasks) - set(sees))
    if unknown:
        raise RegistryError(f"model {model.name!r} has no task {unknown[0]!r}; see `continual-mem tasks`")
    out: set[str] = set()
    todo = list(tasks)
    while todo:
        if (n := todo.pop()) not in out:
            out.add(n)
            todo.extend(sees[n])
    return out


def _by_task(model: Model, table, only: Collection[str] | None) -> dict:
    """``table``'s rows (bundles or references) of the model's tasks (``only``: of those), by task id: one query,
    not one per task (2,000 at K = 1,000)."""
    ids = [t.id for t in model.tasks if only is None or t.name in only]
    query = select(table).where(table.task_id.in_(ids))
    if table is TaskParams:
        query = query.options(undefer(TaskParams.data))
    return {row.task_id: row for row in object_session(model).scalars(query)}


def assemble(model: Model, *, backbone: VisionTransformer | None = None,
             only: Collection[str] | None = None) -> tuple[MemoryViT, dict[str, TaskCheck]]:
    """Build the model from stored bytes, task by task (``only``: these tasks alone, in the model's order);
    unreadable tasks are reported, not attached."""
    bb = _cpu_backbone(backbone, model.backbone)
    net = MemoryViT(bb, group_size=model.group_size)
    if backbone is not None and net.backbone_fingerprint() != model.backbone.fingerprint:
        raise RegistryError("the given backbone is not the registered one (fingerprints differ)")
    problems: dict[str, TaskCheck] = {}
    broken_tokens: list[str] = []
    blobs = _by_task(model, TaskParams, only)
    for row in model.tasks:
        if only is not None and row.name not in only:
            continue
        blob = blobs[row.id]
        data = blob.data
        actual = sha256(data)
        cfg = TaskConfig.from_dict(row.config)
        if actual != blob.sha256:
            problems[row.name] = TaskCheck(row.name, "corrupt", detail=(
                f"parameter blob sha256 mismatch: stored {blob.sha256[:16]}…, computed {actual[:16]}…"))
        elif cfg.mode == "extension" and broken_tokens:
            problems[row.name] = TaskCheck(row.name, "blocked", detail=f"attends to unreadable task(s) {broken_tokens}")
        else:
            try:
                config, tensors, meta = read_task_bytes(data, source=f"task {row.name!r}")
                net.attach(build_task(net, config, tensors, meta.get("backbone_fingerprint", "")))
            except ValueError as exc:
                problems[row.name] = TaskCheck(row.name, "corrupt", detail=str(exc))
        if row.name in problems and cfg.has_tokens:
            broken_tokens.append(row.name)
    return net, problems


def load_model(s: Session, name: str, *, backbone: VisionTransformer | None = None,
               tasks: Collection[str] | None = None) -> MemoryViT:
    """The model (backbone + every task, or ``tasks`` and the earlier tasks they read, in order), refusing any
    unreadable task. Only the tasks loaded are read, hashed and parsed."""
    model = get_model(s, name)
    net, problems = assemble(model, backbone=backbone, only=None if tasks is None else closure(model, tasks))
    if problems:
        raise RegistryError("; ".join(f"task {p.name!r} is {p.status}: {p.detail}" for p in problems.values()))
    return net


# ---------------------------------------------------------------- verification
def _tensor_from_ref(ref: Reference) -> torch.Tensor:
    return torch.frombuffer(bytearray(ref.logits), dtype=getattr(torch, ref.dtype)).reshape(ref.shape)


def compare(name: str, out: torch.Tensor, ref: Reference | None, build: dict) -> TaskCheck:
    """Task ``name``'s recomputed logits against its stored reference: equal only if the build is the same and
    the bytes are (sha256 and ``torch.equal``)."""
    if ref is None:
        return TaskCheck(name, "corrupt", detail="no stored reference outputs")
    if ref.build != build:
        diff = {k: (ref.build.get(k), build.get(k)) for k in build if ref.build.get(k) != build.get(k)}
        return TaskCheck(name, "not-comparable", detail=f"reference computed on another build: {diff}")
    stored = _tensor_from_ref(ref)
    if sha256(out.numpy().tobytes()) == ref.sha256 and torch.equal(out, stored):
        return TaskCheck(name, "equal", max_abs_diff=0.0)
    mad = (out.double() - stored.double()).abs().max().item() if out.shape == stored.shape else float("inf")
    return TaskCheck(name, "mismatch", max_abs_diff=mad,
                     detail=f"logits differ from the stored reference (sha256 {ref.sha256[:16]}…)")


def check(
    s: Session,
    model: Model,
    *,
    trigger: str,
    backbone: VisionTransformer | None = None,
    new: Sequence[str] = (),
    only: Collection[str] | None = None,
) -> Report:
    """Recompute every task's logits (``only``: those tasks and the tasks they read) on the probe (one pass, CPU
    float32) and compare bytes with the stored references. Tasks in ``new`` get their logits returned (to become
    their reference). Writes nothing."""
    started = utcnow()
    threads = verify_threads(s)
    build = current_build(threads)
    images = probe_images(s, model)
    with cpu_threads(threads):
        checked = None if only is None else closure(model, only)
        net, problems = assemble(model, backbone=backbone, only=checked)
        with torch.inference_mode():
            logits = net(images, original=False)  # no task: {}
    checks: list[TaskCheck] = []
    references = _by_task(model, Reference, checked)
    for row in model.tasks:
        if checked is not None and row.name not in checked:
            continue
        if row.name in problems:
            checks.append(problems[row.name])
        elif row.name in new:
            checks.append(TaskCheck(row.name, "new", logits=logits[row.name].contiguous()))
        else:
            checks.append(compare(row.name, logits[row.name].contiguous(), references.get(row.id), build))
    return Report(model.name, trigger, build, started, utcnow(), checks)


def record_report(s: Session, model: Model, report: Report) -> VerificationRun:
    ids = dict(s.execute(select(Task.name, Task.id).where(Task.model_id == model.id)).all())
    run = VerificationRun(model_id=model.id, trigger=report.trigger, started_at=report.started_at,
                          finished_at=report.finished_at, ok=report.ok, build=report.build)
    run.results = [VerificationResult(task_id=ids.get(c.name), task_name=c.name, status=c.status,
                                      max_abs_diff=c.max_abs_diff, detail=c.detail) for c in report.tasks]
    s.add(run)
    log_event(s, "verify", model.name, None, trigger=report.trigger, ok=report.ok,
              statuses={c.name: c.status for c in report.tasks})
    return run
