"""Resumable training checkpoints: the task's tensors, the optimizer's momentum and the best state in one
safetensors file, the step and history in a JSON file beside it; each written whole, then renamed."""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from .step import TrainConfig, optimizer_params

log = logging.getLogger(__name__)


def checkpoint_paths(config: TrainConfig) -> tuple[Path, Path]:
    root = Path(config.checkpoint_dir)
    return root / "checkpoint.safetensors", root / "checkpoint.json"


def save_checkpoint(model, task, opt, step, best, history, config) -> None:
    tensors_path, meta_path = checkpoint_paths(config)
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"task.{k}": v.detach().cpu().contiguous() for k, v in model.tasks[task].state_dict().items()}
    for i, p in enumerate(optimizer_params(opt)):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf.detach().cpu().contiguous()
    if best["state"] is not None:
        tensors.update({f"best.{k}": v for k, v in best["state"].items()})
    tmp = tensors_path.with_name(tensors_path.name + ".partial")
    save_file(tensors, str(tmp))
    meta = {"task": task, "step": step, "best_step": best["step"], "best_acc": best["acc"], "history": history,
            "config": asdict(config)}
    tmp_meta = meta_path.with_name(meta_path.name + ".partial")
    tmp_meta.write_text(json.dumps(meta))
    tmp.replace(tensors_path)  # tensors first: a crash between the two leaves the older, consistent pair
    tmp_meta.replace(meta_path)


def load_checkpoint(model, task, opt, config) -> tuple[int, dict, list[dict]] | None:
    tensors_path, meta_path = checkpoint_paths(config)
    if not (tensors_path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta["task"] != task:
        raise ValueError(f"checkpoint in {config.checkpoint_dir} is for task {meta['task']!r}, not {task!r}")
    tensors = load_file(str(tensors_path))
    module = model.tasks[task]
    device = next(module.parameters()).device
    module.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("task.")})
    for i, p in enumerate(optimizer_params(opt)):
        if f"momentum.{i}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(device)
    best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    best = {"step": meta["best_step"], "acc": meta["best_acc"], "state": best_state}
    log.info("resumed task %s at step %d", task, meta["step"])
    return meta["step"], best, meta["history"]
