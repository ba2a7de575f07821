"""Class-incremental streams: one dataset's classes split into experiences of disjoint classes (Avalanche's
``class_incremental_benchmark``); at test time an image is scored against every class seen so far, its experience
not given. Learners, all through Avalanche strategies and metrics:

- ``ours``: each experience trains a new task of its classes (``--regime``; earlier tasks frozen, bit-exact) and
  stores its class statistics; prediction is task-agnostic (:mod:`continual_mem.class_stats`: the statistics pick
  the task, its own head the class);
- ``prototype``: SimpleCIL, class means of the frozen backbone's features and cosine, nothing trained;
- ``naive``, ``lwf``, ``ewc``, ``replay``: Avalanche's strategies fine-tuning a copy of the backbone with an
  ``IncrementalClassifier``.

    python -m scenarios.class_incremental --dataset mnist-5k --experiences 5 --budget tiny --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from avalanche.core import SupervisedPlugin
from avalanche.models import DynamicModule, IncrementalClassifier
from avalanche.training import EWC, LwF, Naive, Replay
from avalanche.training.templates import SupervisedTemplate
from torch.utils.data import DataLoader

from continual_mem import MemoryViT
from continual_mem.class_stats import TaskAgnostic, backbone_features, collect, predict

from . import datasets
from .compare import BUDGETS, CompareConfig, add_run_options, budget_backbone, evaluator
from .pipeline import Preprocess
from .recipes import prepare_task
from .stream import PaperRecipePlugin, PreprocessedImages, cap

log = logging.getLogger(__name__)
BASELINES = ("naive", "lwf", "ewc", "replay")
LEARNERS = ("ours", "prototype", *BASELINES)


def class_stream(dataset: str | datasets.TaskData, *, experiences: int, seed: int, backbone, root: str = "data",
                 max_train: int | None = None, max_test: int | None = None, cache_dir: str | None = None):
    """``dataset``'s classes (a catalog name or loaded data) in a seeded order, split into ``experiences``
    experiences; returns the benchmark (train and test streams) and the data."""
    data = dataset if isinstance(dataset, datasets.TaskData) else datasets.load(dataset, root=root)
    dataset = data.name
    if not isinstance(data.train, datasets.ImageSet):
        data = prepare_task(data, cache_dir=cache_dir)
    if not 1 <= experiences <= data.num_classes:
        raise ValueError(f"--experiences must be between 1 and {data.num_classes} (the classes of {dataset}), "
                         f"got {experiences}")
    pre = Preprocess.for_backbone(backbone, data.augment)
    sets = {split: _make_taskaware_classification_dataset(
        PreprocessedImages(cap(part, limit, seed=0), pre), task_labels=0)
        for split, part, limit in (("train", data.train, max_train), ("test", data.test, max_test))}
    return class_incremental_benchmark(sets, num_experiences=experiences, seed=seed), data


class AgnosticLearner(DynamicModule):
    """A growing :class:`MemoryViT` as an Avalanche class-incremental model: each experience adds a task of its
    classes (``task_kwargs``; ``train=False``: no task, statistics only, i.e. SimpleCIL with ``method="prototype"``).
    Training gives the current task's logits at its classes' global columns (-inf elsewhere); evaluation gives a
    one-hot score at the task-agnostic answer's global class."""

    def __init__(self, model: MemoryViT, num_classes: int, *, method: str = "gaussian", train: bool = True,
                 mode: str = "stats", task_kwargs: dict | None = None) -> None:
        super().__init__()
        self.model, self.num_classes, self.method, self.train_tasks = model, num_classes, method, train
        self.mode = mode if train else "stats"  # combine's mode: the class from the statistics or the task's head
        self.task_kwargs = task_kwargs or {}
        self.classes: list[list[int]] = []  # per experience: its global classes, in local order
        self.stats: list = []
        self._agnostic: TaskAgnostic | None = None

    @property
    def names(self) -> list[str]:
        return [f"exp{i}" for i in range(len(self.classes))]

    def adaptation(self, experience) -> None:
        """A new experience (while training): a task of its classes, the only trainable parameters."""
        if not self.training:
            return
        classes = sorted(experience.classes_in_this_experience)
        self.classes.append(classes)
        if self.train_tasks:
            device = next(self.model.parameters()).device
            self.model.add_task(self.names[-1], len(classes), **self.task_kwargs).to(device)
            self.model.trainable_parameters(self.names[-1])

    def finish(self, dataset, *, batch_size: int, device: str) -> None:
        """After an experience's training: its class statistics from its training images."""
        local = {c: i for i, c in enumerate(self.classes[-1])}
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)

        def batches():
            for x, y, *_ in loader:
                yield backbone_features(self.model, x.to(device)), torch.tensor([local[int(c)] for c in y])

        self.model.eval()
        self.stats.append(collect(self.names[-1], batches(), len(local)))

    def forward(self, x: torch.Tensor, task_labels=None) -> torch.Tensor:
        out = x.new_full((x.shape[0], self.num_classes), float("-inf"))
        if self.training:
            name = self.names[-1]
            out[:, self.classes[-1]] = self.model(x, tasks=[name], original=False)[name]
            return out
        if not self.stats:  # nothing learnt yet: every class alike
            return out.fill_(0.0)
        if self._agnostic is None or len(self._agnostic.tasks) != len(self.stats):
            self._agnostic = TaskAgnostic(self.stats, method=self.method)  # one factorisation per experience
        agnostic = self._agnostic
        task, cls = predict(self.model, agnostic, x, mode=self.mode)
        glob = torch.tensor([c for classes in self.classes[: len(self.stats)] for c in classes], device=x.device)
        starts = torch.tensor([a for a, _ in agnostic.bounds], device=x.device)
        out[torch.arange(len(x), device=x.device), glob[starts[task.to(x.device)] + cls.to(x.device)]] = 0.0
        return out


class StatsPlugin(SupervisedPlugin):
    """After each experience's training, the learner's class statistics of it."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def after_training_exp(self, strategy, *args, **kwargs) -> None:
        strategy.model.finish(strategy.experience.dataset.eval(), batch_size=self.batch_size, device=strategy.device)


class StatisticsOnly(SupervisedTemplate):
    """A strategy that trains nothing (SimpleCIL): the experience only adapts the model and its plugins run."""

    def training_epoch(self, **kwargs) -> None:
        return None


class ViTIncremental(torch.nn.Module):
    """The baselines' model: a trainable copy of the backbone and Avalanche's ``IncrementalClassifier``."""

    def __init__(self, backbone) -> None:
        super().__init__()
        self.features = copy.deepcopy(backbone)
        for p in self.features.parameters():
            p.requires_grad_(True)
        self.classifier = IncrementalClassifier(self.features.num_features, initial_out_features=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features.forward_head(self.features.forward_features(x), pre_logits=True))


@dataclass
class LearnerResult:
    learner: str
    seed: int
    accuracy_matrix: list[list[float]] = field(default_factory=list)  # [after experience i][on experience j]
    final_average_accuracy: float = float("nan")  # Avalanche's stream accuracy after the last experience
    forgetting: float = float("nan")
    bwt: float = float("nan")
    train_time_s: float = 0.0


def run_learner(name: str, bm, backbone, cfg: CompareConfig, *, seed: int, num_classes: int,
                regime: str = "masked-memory", replay_size: int = 200) -> LearnerResult:
    """Train ``name`` on every experience in order, evaluating the whole test stream after each."""
    torch.manual_seed(seed)
    result = LearnerResult(name, seed)
    plugins = [PaperRecipePlugin()] if cfg.recipe == "paper" else []
    if name in ("ours", "prototype"):
        model = AgnosticLearner(MemoryViT(backbone), num_classes, method="gaussian" if name == "ours" else "prototype",
                                train=name == "ours", task_kwargs={"regime": regime})
        plugins.append(StatsPlugin(max(64, cfg.batch_size)))
        lr = cfg.lr
    elif name in BASELINES:
        model, lr = ViTIncremental(backbone), cfg.baseline_lr
    else:
        raise ValueError(f"unknown learner {name!r}; choose from {', '.join(LEARNERS)}")
    model.to(cfg.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    common = dict(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=cfg.batch_size,
                  train_epochs=cfg.epochs, eval_mb_size=max(64, cfg.batch_size), device=cfg.device,
                  evaluator=evaluator(), plugins=plugins or None)
    strategy = {"ours": Naive, "prototype": StatisticsOnly, "naive": Naive}.get(name)
    if name == "lwf":
        strategy = LwF(alpha=cfg.lwf_alpha, temperature=cfg.lwf_temperature, **common)
    elif name == "ewc":
        strategy = EWC(ewc_lambda=cfg.ewc_lambda, **common)
    elif name == "replay":
        strategy = Replay(mem_size=replay_size, **common)
    else:
        strategy = strategy(**common)
    n = len(bm.train_stream)
    metrics: dict = {}
    for exp in bm.train_stream:
        t0 = time.perf_counter()
        strategy.train(exp, num_workers=cfg.num_workers)
        result.train_time_s += time.perf_counter() - t0
        metrics = strategy.eval(bm.test_stream, num_workers=cfg.num_workers)
        log.debug("metrics: %s", sorted(metrics))
        result.accuracy_matrix.append([metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]
                                       for j in range(n)])
    result.final_average_accuracy = metrics["Top1_Acc_Stream/eval_phase/test_stream"]
    result.forgetting = metrics.get("StreamForgetting/eval_phase/test_stream", float("nan"))
    result.bwt = metrics.get("StreamBWT/eval_phase/test_stream", float("nan"))
    return result


def summary(results: list[LearnerResult]) -> list[dict]:
    """Per learner: mean and spread over seeds of final accuracy and forgetting."""
    out = []
    for name in dict.fromkeys(r.learner for r in results):
        rs = [r for r in results if r.learner == name]
        acc, fgt = [r.final_average_accuracy for r in rs], [r.forgetting for r in rs]
        out.append({"learner": name, "seeds": [r.seed for r in rs], "final_accuracy": statistics.mean(acc),
                    "final_accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "forgetting": statistics.mean(fgt), "train_time_s": sum(r.train_time_s for r in rs)})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--experiences", type=int, default=5)
    p.add_argument("--learners", default=",".join(LEARNERS))
    p.add_argument("--seeds", default="0", help="comma list: class orders and initialisations")
    p.add_argument("--regime", default="masked-memory", help="our tasks' regime")
    add_run_options(p)
    p.add_argument("--out", type=Path, default=Path("class_incremental_results"))
    args = p.parse_args(argv)
    unknown = [s for s in args.learners.split(",") if s not in LEARNERS]
    if unknown:
        raise ValueError(f"unknown learners {unknown}; choose from {', '.join(LEARNERS)}")
    max_train, max_test, epochs, size = BUDGETS[args.budget]
    backbone = budget_backbone(args)
    cfg = CompareConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, baseline_lr=args.baseline_lr,
                        device=args.device, num_workers=args.num_workers, recipe=args.recipe)
    payload = {"dataset": args.dataset, "experiences": args.experiences, "budget": args.budget, "image_size": size,
               "regime": args.regime, "config": asdict(cfg), "date": time.strftime("%Y-%m-%d"),
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "results": []}
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        bm, data = class_stream(args.dataset, experiences=args.experiences, seed=seed, backbone=backbone,
                             root=args.data_root, max_train=max_train, max_test=max_test)
        for name in args.learners.split(","):
            log.info("seed %d: %s", seed, name)
            results.append(run_learner(name, bm, backbone, cfg, seed=seed, num_classes=data.num_classes,
                                       regime=args.regime))
            payload["results"] = [asdict(r) for r in results]
            payload["summary"] = summary(results)
            (args.out / "results.json").write_text(json.dumps(payload, indent=2))  # a cut run keeps what finished
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
