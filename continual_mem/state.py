"""Task state: export/import one task as a safetensors file (tensors + JSON config + backbone fingerprint),
and the paper's model concatenation (merge independently trained tasks). Loading never unpickles."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .checks import name_taken
from .config import TaskConfig
from .model import MemoryViT, TaskError
from .task import TaskModule

FORMAT = "continual-mem-task/1"


class TaskStateError(TaskError):
    """A task file or state cannot be attached (corrupt, other backbone, wrong shapes)."""


def task_tensors(model: MemoryViT, name: str) -> dict[str, torch.Tensor]:
    """The task's own tensors (its module's state dict), detached, on CPU, contiguous."""
    if name not in model.tasks:
        raise TaskError(f"no task named {name!r}; known tasks: {model.task_names}")
    return {k: v.detach().to("cpu").contiguous() for k, v in model.tasks[name].state_dict().items()}


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in sorted order: detects any flipped byte in a bundle."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def task_metadata(model: MemoryViT, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {
        "format": FORMAT,
        "tensors_sha256": tensors_sha256(tensors),
        "config": json.dumps(model.tasks[name].config.to_dict(), sort_keys=True),
        "backbone_fingerprint": model.backbone_fingerprint(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def export_task_bytes(model: MemoryViT, name: str) -> bytes:
    """One task as safetensors bytes; config and backbone fingerprint live in the header metadata."""
    tensors = task_tensors(model, name)
    return save(tensors, metadata=task_metadata(model, name, tensors))


def export_task(model: MemoryViT, name: str, path: str | Path) -> Path:
    path = Path(path)
    data = export_task_bytes(model, name)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)  # atomic: a crash never leaves a half-written bundle under the final name
    return path


def read_task_bytes(data: bytes, *, source: str = "task bundle") -> tuple[TaskConfig, dict[str, torch.Tensor], dict]:
    """Parse a bundle into (config, tensors, metadata) without touching any model."""
    try:
        tensors = load(data)
        meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise TaskStateError(f"{source} is not a readable safetensors file ({exc}); re-export it") from exc
    if meta.get("format") != FORMAT:
        raise TaskStateError(f"{source} is not a continual-mem task (format {meta.get('format')!r}, want {FORMAT})")
    if meta.get("tensors_sha256") != tensors_sha256(tensors):
        raise TaskStateError(f"{source} is corrupted: its tensors do not match their sha256; re-export it")
    try:
        config = TaskConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskStateError(f"{source} has an invalid task config: {exc}") from exc
    return config, tensors, meta


def build_task(model: MemoryViT, config: TaskConfig, tensors: dict[str, torch.Tensor], fingerprint: str) -> TaskModule:
    """Instantiate a task for ``model`` from stored tensors, refusing another backbone or other shapes."""
    mine = model.backbone_fingerprint()
    if fingerprint != mine:
        raise TaskStateError(
            f"task {config.name!r} was trained on backbone {fingerprint[:12]}…, this model's backbone is "
            f"{mine[:12]}…; attach it to the backbone it was trained on"
        )
    task = TaskModule(config, model.backbone, init=False)  # every tensor is loaded below (strict)
    expected = task.state_dict()
    if set(expected) != set(tensors):
        raise TaskStateError(
            f"task {config.name!r}: stored tensors {sorted(tensors)[:6]} do not match its config "
            f"{sorted(expected)[:6]}"
        )
    for key, t in tensors.items():
        if t.shape != expected[key].shape or t.dtype != expected[key].dtype:
            raise TaskStateError(
                f"task {config.name!r}: tensor {key} is {tuple(t.shape)} {t.dtype}, expected "
                f"{tuple(expected[key].shape)} {expected[key].dtype}"
            )
    task.load_state_dict(tensors, strict=True)
    for p in task.parameters():
        p.requires_grad_(False)
    return task


def import_task_bytes(model: MemoryViT, data: bytes, *, source: str = "task bundle") -> TaskModule:
    config, tensors, meta = read_task_bytes(data, source=source)
    if (problem := name_taken(config.name, model.tasks, fix="remove it or rename the bundle's task")) is not None:
        raise TaskStateError(problem)
    task = build_task(model, config, tensors, meta.get("backbone_fingerprint", ""))
    return model.attach(task)


def import_task(model: MemoryViT, path: str | Path) -> TaskModule:
    path = Path(path)
    if not path.is_file():
        raise TaskStateError(f"task file {path} does not exist")
    return import_task_bytes(model, path.read_bytes(), source=str(path))


def merge(into: MemoryViT, other: MemoryViT) -> list[str]:
    """Model concatenation (paper Fig. 3): attach every task of ``other`` to ``into``, exactly.

    Only tasks whose computation reads nothing but the backbone and themselves can move between models:
    concatenation-mode tasks and the other non-extension regimes. Nothing is attached unless all can be.
    """
    if other.backbone_fingerprint() != into.backbone_fingerprint():
        raise TaskStateError("cannot merge models with different backbones (fingerprints differ)")
    blocked = [n for n, t in other.tasks.items() if t.config.mode == "extension"]
    if blocked:
        raise TaskStateError(f"cannot merge extension-mode tasks {blocked}: they depend on their original model")
    clash = [n for n in other.tasks if n in into.tasks]
    if clash:
        raise TaskStateError(f"both models have tasks named {clash}; rename one side before merging")
    bundles = [export_task_bytes(other, n) for n in other.tasks]
    return [import_task_bytes(into, b).name for b in bundles]
