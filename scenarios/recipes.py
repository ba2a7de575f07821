"""Recipes: from a catalog dataset to a trained task (the paper's protocol), shared by the CLI and scripts."""
from __future__ import annotations

import torch

from continual_mem import MemoryViT
from continual_mem.train import TrainConfig, evaluate, fit
from continual_mem.train import lr_sweep as sweep

from . import datasets
from .datasets import ImageSet, _Subset, _targets
from .pipeline import Preprocess, batches
from .splits import stratified_split


def sources(
    data: datasets.TaskData,
    split: str,
    pre: Preprocess,
    device: str,
    *,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    max_heldout: int | None = None,
):
    """Training, held-out (5%, stratified; capped at ``max_heldout``) and evaluation batch sources."""
    train = data.train
    labels = train.labels if isinstance(train, ImageSet) else _targets(train)
    keep, held = stratified_split(labels, holdout=0.05, seed=seed)
    if max_train and len(keep) > max_train:
        keep = keep[stratified_split(labels[keep], holdout=max_train / len(keep), seed=seed)[1]]
    if max_heldout and len(held) > max_heldout:
        held = held[stratified_split(labels[held], holdout=max_heldout / len(held), seed=seed)[1]]
    sub = (lambda d, i: d.subset(i)) if isinstance(train, ImageSet) else (lambda d, i: _Subset(d, i))
    evaluation = data.test if split == "test" else sub(train, held)
    if max_test and len(evaluation) > max_test:
        ev_labels = evaluation.labels if isinstance(evaluation, ImageSet) else _targets(evaluation)
        evaluation = sub(evaluation, stratified_split(ev_labels, holdout=max_test / len(evaluation), seed=seed)[1])
    return (batches(sub(train, keep), pre, device), batches(sub(train, held), pre, device),
            batches(evaluation, pre, device))


def train_on_dataset(
    net: MemoryViT,
    dataset: str,
    name: str,
    *,
    regime: str,
    mode: str,
    memory: int | None,
    layers: str,
    task_tokens: int,
    steps: int,
    batch_size: int,
    lr: float,
    lr_sweep: str,
    data_root: str,
    download: bool,
    device: str,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    max_heldout: int | None = None,
    progress: bool = False,
    fork_layers: int = 0,
    fork_pool: int | tuple[int, int] = 1,
    cuda_graph: bool = False,
) -> dict:
    """Load ``dataset``, add task ``name`` to ``net``, train it on 95% of the train split (best state on the
    held-out 5%), evaluate it on the test split; return its metrics. ``net`` ends on the CPU."""
    data = datasets.load(dataset, root=data_root, download=download)
    with torch.random.fork_rng(devices=[]):  # the task's initial state follows ``seed`` (the same on every rank)
        torch.manual_seed(seed)
        net.add_task(name, data.num_classes, regime=regime, mode=mode, memory=memory, layers=layers,
                     task_tokens=task_tokens, fork_layers=fork_layers, fork_pool=fork_pool, class_names=data.class_names, dataset=dataset)
    net.to(device)
    pre = Preprocess.for_backbone(net.backbone, data.augment)
    train, held, test = sources(data, "test", pre, device, seed=seed, max_train=max_train, max_test=max_test,
                                 max_heldout=max_heldout)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_every=max(1, steps // 4),
                      cuda_graph=cuda_graph)
    if lr_sweep:
        lrs = [float(v) for v in lr_sweep.split(",")]
        result, _ = sweep(net, name, train, held, cfg, lrs, progress=progress)
    else:
        result = fit(net, name, train, held, cfg, progress=progress)
    test_acc = evaluate(net, test, [name], batch_size=max(batch_size, 128))[name]
    net.to("cpu")  # the registry stores and verifies on the CPU
    return {"task": name, "dataset": dataset, "classes": data.num_classes, "heldout_accuracy": result.best_val_accuracy,
            "test_accuracy": test_acc, "steps": result.steps, "lr": result.lr, "wall_time_s": result.wall_time_s,
            "train_images_per_s": result.images_per_s, "device": device}
