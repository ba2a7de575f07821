"""Task-agnostic prediction on datasets: a task's class statistics from its training split, and accuracy over the
union of every task's classes (the image's task is not given)."""
from __future__ import annotations

import logging
from dataclasses import dataclass


from continual_mem import MemoryViT
from continual_mem.class_stats import ClassStats, TaskAgnostic, collect_from_source, predict

from . import datasets
from .pipeline import Preprocess
from .recipes import sources
from .task_recipe import TaskRecipe

log = logging.getLogger(__name__)


def stats_on_dataset(net: MemoryViT, task: str, dataset: str, recipe: TaskRecipe = TaskRecipe(), *,
                     device: str, batch_size: int = 256) -> ClassStats:
    """``task``'s class statistics from the training images it was (or will be) trained on: ``recipe``'s split,
    seed and caps, evaluation preprocessing (no augmentation)."""
    r = recipe
    data = datasets.load(dataset, root=r.data_root, download=r.download)
    pre = Preprocess.for_backbone(net.backbone, data.augment)
    train, _, _ = sources(data, "test", pre, device, seed=r.seed, max_train=r.max_train, max_test=r.max_test,
                          max_heldout=r.max_heldout, pipeline=r.pipeline, on_bad_image=r.on_bad_image,
                          cache_dir=r.cache_dir, decoder=r.decoder)
    stats = collect_from_source(net, task, train, data.num_classes, batch_size=batch_size)
    log.info("%s: class statistics of %d classes from %d images", task, stats.num_classes, int(stats.counts.sum()))
    return stats


@dataclass(frozen=True)
class AgnosticResult:
    """Accuracy over the union of classes (``accuracy``), how often the right task won (``task_accuracy``), and
    per task the accuracy on its own test images (``per_task``)."""

    accuracy: float
    task_accuracy: float
    per_task: dict[str, float]
    images: int


def evaluate_agnostic(net: MemoryViT, agnostic: TaskAgnostic, *, split: str = "test", data_root: str = "data",
                      device: str, batch_size: int = 256, max_test: int | None = None, mode: str = "stats",
                      pipeline: str = "auto", on_bad_image: str = "skip", cache_dir: str | None = None,
                      decoder: str = "auto") -> AgnosticResult:
    """Every task's evaluation images, each scored against every task's classes: right if both the winning task
    and its class are the image's."""
    if split not in ("test", "heldout"):
        raise ValueError(f"split must be test or heldout, got {split!r}")
    net.to(device).eval()
    right = tasks_right = total = 0
    per_task: dict[str, float] = {}
    for i, name in enumerate(agnostic.tasks):
        cfg = net.tasks[name].config
        if not cfg.dataset:
            raise ValueError(f"task {name!r} records no dataset; evaluate it from Python")
        data = datasets.load(cfg.dataset, root=data_root)
        pre = Preprocess.for_backbone(net.backbone, data.augment)
        _, _, source = sources(data, split, pre, device, seed=0, max_train=None, max_test=max_test,
                               pipeline=pipeline, on_bad_image=on_bad_image, cache_dir=cache_dir, decoder=decoder)
        mine = n = 0
        for x, y in source.eval_batches(batch_size):
            task, cls = predict(net, agnostic, x, mode=mode)
            hit = (task == i) & (cls == y.to(task.device))
            mine += int(hit.sum())
            tasks_right += int((task == i).sum())
            n += len(y)
        per_task[name] = mine / max(1, n)
        right += mine
        total += n
    return AgnosticResult(right / max(1, total), tasks_right / max(1, total), per_task, total)
