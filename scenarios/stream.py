"""Avalanche integration: task-incremental streams from catalog datasets, the MemoryViT as an Avalanche
``MultiTaskModule`` (a new task per new task label, all tasks in one pass), and the baselines' model.

Avalanche is imported here and nowhere else in the core (extra ``avalanche``).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from avalanche.benchmarks.scenarios import CLScenario
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from torch.utils.data import Dataset

from continual_mem import MemoryViT
from continual_mem.train import TrainConfig, clip_grad_norm_per_group, lr_at

from .compact import prepared_images
from .datasets import ImageSet, TaskData, load
from .pipeline import DeviceImages, Preprocess
from .prepared import PreparedSet
from .recipes import prepare_task
from .splits import stratified_split


class PreprocessedImages(Dataset):
    """An :class:`ImageSet` or a :class:`PreparedSet` (image files, decoded once) as model-ready tensors, one
    sample at a time, through the same evaluation preprocessing as training batches (on the CPU)."""

    def __init__(self, data: ImageSet | PreparedSet, pre: Preprocess) -> None:
        self.source = DeviceImages(data, pre, "cpu") if isinstance(data, ImageSet) else \
            prepared_images(data, pre, "cpu", decoder="device", prefetch=0)  # one image at a time: no workers
        self.targets = data.labels.tolist()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if isinstance(self.source, DeviceImages):
            x, _ = self.source.batch(torch.tensor([i]), train=False)
        else:
            x, _ = self.source.eval_one(i)
        return x[0], self.targets[i]


def cap(data: ImageSet | PreparedSet, limit: int | None, seed: int) -> ImageSet | PreparedSet:
    if limit is None or len(data) <= limit:
        return data
    _, keep = stratified_split(data.labels, holdout=limit / len(data), seed=seed)
    return data.subset(keep)


@dataclass
class Stream:
    """A task-incremental Avalanche benchmark plus what each experience is."""

    benchmark: CLScenario
    tasks: list[TaskData]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]


def task_stream(
    names: Sequence[str | TaskData],
    *,
    backbone,
    root: str = "data",
    download: bool = False,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Stream:
    """One experience per dataset (catalog name or loaded :class:`TaskData`), task label = its position.
    ``max_train``/``max_test`` cap each split (class-stratified, seeded) for quick runs. File-backed datasets
    (image folders, WebDataset shards, torchvision's file datasets) are read from prepared copies (built on first
    use under ``cache_dir``)."""
    if not names:
        raise ValueError("a stream needs at least one dataset")
    tasks, train, test = [], [], []
    for name in names:
        data = name if isinstance(name, TaskData) else load(name, root=root, download=download)
        name = data.name
        if not isinstance(data.train, ImageSet):  # image files: decoded once into prepared copies
            data = prepare_task(data, cache_dir=cache_dir)
        pre = Preprocess.for_backbone(backbone, data.augment)
        tasks.append(data)
        label = len(tasks) - 1
        # task-aware datasets (task_set etc.): what LwF/EWC and multi-head models read
        train.append(_make_taskaware_classification_dataset(
            PreprocessedImages(cap(data.train, max_train, seed), pre), task_labels=label))
        test.append(_make_taskaware_classification_dataset(
            PreprocessedImages(cap(data.test, max_test, seed), pre), task_labels=label))
    bm = with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train, test=test)))
    for stream in bm.streams.values():  # avalanche 0.6 gives sets here; MultiHeadClassifier indexes with them
        for exp in stream:
            exp.classes_in_this_experience = sorted(exp.classes_in_this_experience)
    return Stream(bm, tasks)


def _route(module: MultiTaskModule, x: torch.Tensor, task_labels, outputs) -> torch.Tensor:
    """Per-sample task routing without Avalanche's zero padding (a padded 0 can out-score real logits):
    absent classes get -inf."""
    if task_labels is None:
        return module.forward_all_tasks(x)
    if isinstance(task_labels, int):
        return module.forward_single_task(x, task_labels)
    unique = torch.unique(task_labels)
    if len(unique) == 1:
        return module.forward_single_task(x, int(unique))
    outs = outputs(x, [int(t) for t in unique])
    width = max(o.shape[1] for o in outs.values())
    out = x.new_full((x.shape[0], width), float("-inf"))
    for t, o in outs.items():
        mask = task_labels == t
        out[mask, : o.shape[1]] = o[mask]
    return out


class AvalancheMemoryViT(MultiTaskModule):
    """``MemoryViT`` for Avalanche: a new task label adds a task (``regime``/``mode``/``memory``/``layers``/
    ``fork_layers``/``fork_pool`` as given), only the current task's parameters train, and ``forward_all_tasks`` is the single pass.

    Use it with Avalanche's ``Naive`` strategy (plain SGD on the current experience): since earlier tasks are
    frozen and bit-exact, that is the paper's continual learner.
    """

    def __init__(
        self,
        model: MemoryViT,
        *,
        regime: str = "masked-memory",
        mode: str = "concatenation",
        memory: int | None = None,
        layers: str = "all",
        fork_layers: int = 0,
        fork_pool: int | tuple[int, int] = 1,
        task_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.task_kwargs = {"regime": regime, "mode": mode, "memory": memory, "layers": layers,
                            "fork_layers": fork_layers, "fork_pool": fork_pool}
        self.task_names = list(task_names)
        self.names: dict[int, str] = {}

    def adaptation(self, experience) -> None:
        """Add a task for each new task label (in eval too, as Avalanche's multi-head classifier does, so an
        unseen experience can be evaluated: its fresh task changes nothing that exists)."""
        super().adaptation(experience)
        device = next(self.model.parameters()).device
        for t in experience.task_labels:
            if t not in self.names:
                name = self.task_names[t] if t < len(self.task_names) else f"task{t}"
                classes = max(experience.classes_in_this_experience) + 1
                kwargs = {k: v for k, v in self.task_kwargs.items() if v is not None}  # add_task reads layers only
                # for regimes with per-layer memory
                self.model.add_task(name, classes, **kwargs).to(device)
                self.names[t] = name
        if self.training:
            self.model.trainable_parameters(self.names[experience.task_labels[0]])

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        name = self.names[task_label]
        return self.model(x, tasks=[name], original=False)[name]

    def forward_all_tasks(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        out = self.model(x, tasks=[self.names[t] for t in sorted(self.names)], original=False)
        return {t: out[n] for t, n in self.names.items()}

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        return _route(self, x, task_labels, lambda xs, ts: {
            t: v for t, v in self.forward_all_tasks(xs).items() if t in ts})


class ViTMultiHead(MultiTaskModule):
    """The baselines' model: a trainable copy of the backbone with Avalanche's multi-head classifier."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.features = copy.deepcopy(backbone)
        for p in self.features.parameters():
            p.requires_grad_(True)
        self.classifier = MultiHeadClassifier(self.features.num_features, initial_out_features=2)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        f = self.features.forward_head(self.features.forward_features(x), pre_logits=True)
        return self.classifier(f, task_label)

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        return _route(self, x, task_labels, lambda xs, ts: {t: self.forward_single_task(xs, t) for t in ts})


class PaperRecipePlugin(SupervisedPlugin):
    """The paper's optimisation inside any Avalanche strategy's loop: per experience, a linear warm-up then cosine
    decay of every parameter group's learning rate over that experience's iterations (``continual_mem.train.lr_at``,
    the schedule ``fit`` uses), and gradient-norm clipping after each backward pass.

    Args:
        warmup_fraction: Share of an experience's iterations spent warming up.
        max_grad_norm: Clip the gradient norm of the optimizer's parameters to this (None: no clipping).
    """

    def __init__(self, *, warmup_fraction: float = 0.05, max_grad_norm: float | None = 1.0) -> None:
        super().__init__()
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.warmup_fraction, self.max_grad_norm = warmup_fraction, max_grad_norm
        self.base_lrs: list[float] | None = None
        self.schedule: TrainConfig | None = None
        self.iteration = 0

    def before_training_exp(self, strategy, *args, **kwargs) -> None:
        groups = strategy.optimizer.param_groups
        if self.base_lrs is None or len(self.base_lrs) != len(groups):  # the strategy's lr is the peak
            self.base_lrs = [float(g["lr"]) for g in groups]
        steps = max(1, strategy.train_epochs * len(strategy.dataloader))
        self.schedule = TrainConfig(steps=steps, lr=1.0, warmup_steps=max(1, int(steps * self.warmup_fraction)))
        self.iteration = 0

    def before_training_iteration(self, strategy, *args, **kwargs) -> None:
        factor = lr_at(min(self.iteration, self.schedule.steps - 1), self.schedule)
        for group, base in zip(strategy.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def after_backward(self, strategy, *args, **kwargs) -> None:
        if self.max_grad_norm is not None:
            clip_grad_norm_per_group(strategy.optimizer, self.max_grad_norm)

    def after_training_iteration(self, strategy, *args, **kwargs) -> None:
        self.iteration += 1
