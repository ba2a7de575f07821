"""Training: the loop (the paper's recipe): SGD with momentum, linear warm-up then cosine decay, gradient clipping,
bf16 autocast on GPU, early stopping / best state on a held-out split, deterministic seeding, resumable checkpoints
(:mod:`continual_mem.checkpoints`), a learning-rate sweep, and single-pass evaluation. One step and its config live
in :mod:`continual_mem.step` (re-exported here)."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict

import torch

from . import distributed
from .checkpoints import load_checkpoint, save_checkpoint
from .model import MemoryViT
from .sm_partition import decoder_sms, partition, sm_count
from .step import (BatchSource, TrainConfig, TrainResult, autocast, autocast_dtype, build_optimizer,  # noqa: F401
                   clip_grad_norm_per_group, default_layer_decay, deterministic_algorithms, group_lr,
                   layer_decay_scales, lr_at, optimizer_params, train_step)

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model: MemoryViT, source: BatchSource, tasks: Sequence[str], *, batch_size: int = 256, amp: str = "auto"
) -> dict[str, float]:
    """Top-1 accuracy of each task on ``source``'s labels, all tasks from one pass per batch.

    In a multi-process job every rank evaluates its part of the set and the counts are summed over ranks. A pass
    that decodes JPEGs on the GPU (the source's ``eval_gpu_decoding``) leaves the decoder SMs of its own, as ``fit``
    does.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # counts stay on the device until the end: no sync per batch, so the next batch's input work overlaps this one
    correct = {t: torch.zeros((), dtype=torch.int64, device=device) for t in tasks}
    total = 0
    shard = distributed.current()
    part = {} if shard.world == 1 else {"shard": shard}  # single-process sources need not take shard=
    decodes = getattr(source, "eval_gpu_decoding", None)  # a GPU JPEG decoder gets SMs of its own, as in fit
    hold = decoder_sms(None, gpu_decoding=bool(decodes) and decodes(batch_size, **part), sm_count=sm_count(device))
    batches = source.eval_batches(batch_size, **part)
    with autocast(TrainConfig(amp=amp), device), partition(device, hold, required=False):
        for x, y in batches:
            out = model(x, tasks=list(tasks), original=False)
            for t in tasks:
                correct[t] += (out[t].argmax(-1) == y.to(device)).sum()
            total += len(y)
    model.train(was_training)
    *counts, total = distributed.all_sum([*(int(c) for c in correct.values()), total], device)  # each rank saw its part
    return {t: c / max(1, total) for t, c in zip(tasks, counts)}


def fit(
    model: MemoryViT,
    task: str,
    train: BatchSource,
    val: BatchSource | None,
    config: TrainConfig,
    *,
    progress: bool = True,
) -> TrainResult:
    """Train ``task`` (only its parameters) and leave it at its best held-out state.

    Resumes from ``config.checkpoint_dir`` when a checkpoint for this task is there. Inside a ``torchrun`` job
    (process group initialised, see :mod:`continual_mem.distributed`) the model is wrapped in
    ``DistributedDataParallel``: ``config.batch_size`` is the global batch, each rank trains on its part, and only
    rank 0 writes checkpoints and shows progress. ``config.deterministic``: deterministic algorithms throughout.
    A source that decodes JPEGs on the GPU (its ``gpu_decoding`` is true) gets SMs the step leaves alone
    (``config.decoder_sms``, :mod:`continual_mem.sm_partition`).
    """
    device = next(model.parameters()).device
    reserve = decoder_sms(config.decoder_sms, gpu_decoding=getattr(train, "gpu_decoding", False),
                          sm_count=sm_count(device))
    with deterministic_algorithms(config.deterministic), \
            partition(device, reserve, required=config.decoder_sms is not None):
        return _fit(model, task, train, val, config, progress=progress)


def _fit(model: MemoryViT, task: str, train: BatchSource, val: BatchSource | None, config: TrainConfig, *,
         progress: bool) -> TrainResult:
    device = next(model.parameters()).device
    shard = distributed.current()
    if config.batch_size % shard.world:
        raise ValueError(f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                         f"{shard.world} processes; pick a multiple of {shard.world}")
    if config.cuda_graph and (device.type != "cuda" or shard.world > 1):
        raise ValueError("cuda_graph needs one CUDA device and a single process (not DDP); turn it off")
    opt = build_optimizer(model, task, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                          cuda_graph=config.cuda_graph, finetune_lr_scale=config.finetune_lr_scale,
                          layer_decay=(config.layer_decay if config.layer_decay is not None
                                       else default_layer_decay(model.tasks[task].config.regime)))
    params = optimizer_params(opt)
    graphed = None
    forward = model
    if shard.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # only the task's parameters require grad, so DDP reduces exactly those; the frozen backbone is broadcast
        # from rank 0 once here, which leaves it as it was (every rank loaded the same weights)
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    batch_args = {} if shard.world == 1 else {"shard": shard}
    best = {"step": -1, "acc": -1.0, "state": None}
    history: list[dict] = []
    start = 0
    if config.checkpoint_every:
        resumed = load_checkpoint(model, task, opt, config)
        if resumed is not None:
            start, best, history = resumed
    model.train()
    stale = 0
    t0, seen = time.perf_counter(), 0
    bar = _progress(progress and shard.main, task, config.steps, start)
    loss_value = float("nan")
    done = start
    probe_end = int(config.probe_fraction * config.steps)
    for step in range(start, config.steps):
        if step == probe_end > 0:  # the copies start from rest, not from momentum gathered under the probe's head
            for group in opt.param_groups:
                if group["kind"] == "pretrained":
                    for p in group["params"]:
                        buf = opt.state.get(p, {}).get("momentum_buffer")
                        if buf is not None:
                            buf.zero_()
        x, y = train.train_batch(step, config.batch_size, config.seed, **batch_args)
        # one schedule per kind of parameter, each group at its own scale of it
        rates = {kind: group_lr(step, config, pretrained=kind == "pretrained") for kind in ("new", "pretrained")}
        if config.cuda_graph:
            if graphed is None:
                from .graphs import GraphedTrainStep

                graphed = GraphedTrainStep(model, task, opt, x, y, autocast_dtype=autocast_dtype(config, device),
                                           max_grad_norm=config.max_grad_norm, label_smoothing=config.label_smoothing)
            loss = graphed(x, y, [rates[g["kind"]] * g["lr_scale"] for g in opt.param_groups])
        else:
            for group in opt.param_groups:
                group["lr"] = rates[group["kind"]] * group["lr_scale"]
            loss = train_step(forward, task, x, y, opt, max_grad_norm=config.max_grad_norm,
                              label_smoothing=config.label_smoothing, autocast_dtype=autocast_dtype(config, device))
        seen += len(y) * shard.world
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            loss_value = float(loss.detach())
            acc = evaluate(model, val, [task], batch_size=config.batch_size, amp=config.amp)[task] if val else float("nan")
            history.append({"step": done, "loss": loss_value, "val_accuracy": acc, "lr": lr_at(step, config)})
            if val is None or acc > best["acc"]:
                best = {"step": done, "acc": acc,
                        "state": {k: v.detach().cpu().clone() for k, v in model.tasks[task].state_dict().items()}}
                stale = 0
            else:
                stale += 1
            model.train()
        if config.checkpoint_every and done % config.checkpoint_every == 0 and shard.main:
            save_checkpoint(model, task, opt, done, best, history, config)
        if bar is not None:
            bar[0].update(bar[1], completed=done, loss=loss_value, acc=best["acc"],
                          ips=seen / max(1e-9, time.perf_counter() - t0))
        if config.patience is not None and stale >= config.patience:
            log.info("early stop at step %d (best %.4f at %d)", done, best["acc"], best["step"])
            break
    if bar is not None:
        bar[0].stop()
    wall = time.perf_counter() - t0
    if best["state"] is not None:
        model.tasks[task].load_state_dict(best["state"])
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return TrainResult(task, done, best["step"], best["acc"], wall, seen / max(1e-9, wall), history, config.lr)


def _progress(enabled: bool, task: str, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"[bold]{task}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}  best val {task.fields[acc]:.3f}  {task.fields[ips]:.0f} img/s"),
                   TimeRemainingColumn(), transient=False)
    tid = bar.add_task(task, total=total, completed=start, loss=float("nan"), acc=float("nan"), ips=0.0)
    bar.start()
    return bar, tid


def lr_sweep(
    model: MemoryViT,
    task: str,
    train: BatchSource,
    val: BatchSource,
    config: TrainConfig,
    lrs: Sequence[float],
    *,
    progress: bool = False,
) -> tuple[TrainResult, list[TrainResult]]:
    """Train ``task`` from the same initial state with each learning rate; keep the best on the held-out split
    (the paper picks the best lr per regime). The task ends in the winning run's best state."""
    if not lrs:
        raise ValueError("lr_sweep needs at least one learning rate")
    initial = {k: v.detach().clone() for k, v in model.tasks[task].state_dict().items()}
    results, best_state, best = [], None, None
    for lr in lrs:
        model.tasks[task].load_state_dict(initial)
        run = TrainConfig(**{**asdict(config), "lr": lr, "checkpoint_every": 0, "checkpoint_dir": None})
        result = fit(model, task, train, val, run, progress=progress)
        results.append(result)
        if best is None or result.best_val_accuracy > best.best_val_accuracy:
            best = result
            best_state = {k: v.detach().clone() for k, v in model.tasks[task].state_dict().items()}
    model.tasks[task].load_state_dict(best_state)
    return best, results
