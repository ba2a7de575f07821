"""Recipes: from a catalog dataset to a trained task (the paper's protocol), shared by the CLI and scripts."""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from continual_mem import MemoryViT
from continual_mem.class_stats import collect_from_source
from continual_mem.regimes import get_regime
from continual_mem.train import TrainConfig, evaluate, fit
from continual_mem.train import lr_sweep as sweep

from . import datasets, default_recipe, prepared
from .types import ImageSet, IndexSubset, targets_of
from .decode import SubsetReader, is_reader, reader_for
from .pipeline import Preprocess, batches
from .prepared import PrepareOptions, PreparedSet
from .protocol import choose_lr
from .splits import stratified_split
from .task_recipe import OnBad, Pipeline, TaskRecipe

log = logging.getLogger(__name__)


PIPELINES = ("auto", "prepared", "decode", "loader")


def choose_pipeline(pipeline: str, *, file_backed: bool, prepared_exists: bool, fits_on_disk: bool = True) -> str:
    """Which input path a dataset takes: ``device`` (decoded sets live on the device), ``prepared`` (a decoded,
    memory-mapped copy, built first if missing), ``decode`` (files decoded on the fly by worker processes) or
    ``loader`` (PIL and timm's transforms, the reference path).

    ``auto`` picks the prepared copy (the path that keeps the GPU busy, see ``benchmarks/data_throughput.py``),
    building it on first use when it takes at most half the free disk, else decodes on the fly."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; use one of {', '.join(PIPELINES)}")
    if not file_backed:
        return "device"
    if pipeline == "auto":
        return "prepared" if prepared_exists or fits_on_disk else "decode"
    return pipeline


def fits_on_disk(reader, opts: PrepareOptions, cache_dir: str | None) -> tuple[bool, float]:
    """Whether a prepared copy of ``reader`` (estimated at 4:3 images; a compact copy at a tenth of raw pixels)
    takes at most half the free disk there, and its estimated gigabytes."""
    estimate = len(reader) * opts.short_side * opts.short_side * 4 / 3 * 3 / (10 if opts.encoding == "jpeg" else 1)
    where = Path(cache_dir) if cache_dir else prepared.default_root()
    while not where.exists() and where != where.parent:
        where = where.parent
    return estimate <= 0.5 * shutil.disk_usage(where).free, estimate / 1e9


def encoding_for(reader, opts: PrepareOptions, encoding: str, cache_dir: str | None) -> str:
    """The encoding a prepared copy of ``reader`` takes (:func:`~scenarios.prepared.choose_encoding`, given
    whether raw pixels fit on the disk)."""
    raw_fits = encoding != "auto" or fits_on_disk(reader, dataclasses.replace(opts, encoding="raw"), cache_dir)[0]
    return prepared.choose_encoding(encoding, raw_fits=raw_fits)


def _stage(part, *, data: datasets.TaskData, split: str, pipeline: str, opts: PrepareOptions, encoding: str,
           cache_dir: str | None, progress: bool):
    """One split as what its pipeline reads: an ImageSet, a PreparedSet, a reader or a PIL dataset. With
    ``encoding="auto"`` a finished copy of either encoding is used as it is."""
    if isinstance(part, ImageSet) or pipeline == "loader":
        return part
    reader = reader_for(part)
    found = next((ps for e in (prepared.ENCODINGS if encoding == "auto" else (encoding,))
                  if (ps := prepared.find(reader, name=data.name, split=split,
                                          opts=dataclasses.replace(opts, encoding=e), root=cache_dir)) is not None),
                 None)
    if found is None:
        opts = dataclasses.replace(opts, encoding=encoding_for(reader, opts, encoding, cache_dir))
    fits, gigabytes = fits_on_disk(reader, opts, cache_dir) if found is None else (True, 0.0)
    kind = choose_pipeline(pipeline, file_backed=True, prepared_exists=found is not None, fits_on_disk=fits)
    if kind == "prepared":
        if found is None:
            log.info("%s (%s): decoding %d images once into a prepared copy (%s, about %.1f GB; --pipeline decode "
                     "skips it)", data.name, split, len(reader), opts.encoding, gigabytes)
        return found or prepared.prepare(reader, name=data.name, split=split, class_names=data.class_names,
                                         opts=opts, root=cache_dir, progress=progress)
    if pipeline == "auto":
        log.warning("%s (%s): a prepared copy (about %.1f GB) would take over half the free disk; decoding on "
                    "the fly (slower). `continual-mem prepare --cache-dir DIR` puts it elsewhere", data.name,
                    split, gigabytes)
    return reader


def prepare_task(data: datasets.TaskData, *, cache_dir: str | None = None, on_bad_image: OnBad = "skip",
                 progress: bool = False) -> datasets.TaskData:
    """``data`` with its file-backed splits replaced by prepared copies (built if missing)."""
    stage = dict(data=data, pipeline="prepared", opts=PrepareOptions(on_bad=on_bad_image), encoding="auto",
                 cache_dir=cache_dir, progress=progress)
    return dataclasses.replace(data, train=_stage(data.train, split="train", **stage),
                               test=_stage(data.test, split="test", **stage))


def _labels(d) -> torch.Tensor:
    if isinstance(d, (ImageSet, PreparedSet)):
        return d.labels
    if is_reader(d):
        return torch.from_numpy(np.asarray(d.labels, dtype=np.int64))
    return targets_of(d)


def _sub(d, idx: torch.Tensor):
    if isinstance(d, (ImageSet, PreparedSet)):
        return d.subset(idx)
    if is_reader(d):
        return SubsetReader(d, idx.numpy())
    return IndexSubset(d, idx)


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
    pipeline: Pipeline = "auto",
    on_bad_image: OnBad = "skip",
    cache_dir: str | None = None,
    progress: bool = False,
    heldout: float = 0.05,
    encoding: str = "auto",
    decoder: str = "auto",
):
    """Training, held-out (``heldout`` of the train split, 5% by default, stratified; capped at ``max_heldout``)
    and evaluation batch sources.

    File-backed datasets take the input path :func:`choose_pipeline` picks; ``pipeline="prepared"`` builds the
    prepared copy first if there is none (under ``cache_dir``, default ``$CONTINUAL_MEM_HOME/prepared``), encoded
    as ``encoding`` says (``auto``: :func:`encoding_for`; a finished copy of either encoding is used as it is).
    ``decoder``: where JPEGs are decoded (:func:`~scenarios.gpu_jpeg.choose_decoder`)."""
    stage = dict(data=data, pipeline=pipeline, opts=PrepareOptions(on_bad=on_bad_image), encoding=encoding,
                 cache_dir=cache_dir, progress=progress)
    train = _stage(data.train, split="train", **stage)
    labels = _labels(train)
    keep, held = stratified_split(labels, holdout=heldout, seed=seed)
    if max_train and len(keep) > max_train:
        keep = keep[stratified_split(labels[keep], holdout=max_train / len(keep), seed=seed)[1]]
    if max_heldout and len(held) > max_heldout:
        held = held[stratified_split(labels[held], holdout=max_heldout / len(held), seed=seed)[1]]
    evaluation = _stage(data.test, split="test", **stage) if split == "test" else _sub(train, held)
    if max_test and len(evaluation) > max_test:
        evaluation = _sub(evaluation, stratified_split(_labels(evaluation), holdout=max_test / len(evaluation),
                                                       seed=seed)[1])
    make = dict(on_bad=on_bad_image, name=data.name, decoder=decoder)
    return (batches(_sub(train, keep), pre, device, **make), batches(_sub(train, held), pre, device, **make),
            batches(evaluation, pre, device, **make))


def train_on_dataset(
    net: MemoryViT,
    dataset: str,
    name: str,
    recipe: TaskRecipe = TaskRecipe(),
    *,
    device: str,
    progress: bool = False,
    class_stats: bool = False,
) -> dict:
    """Load ``dataset``, add task ``name`` to ``net`` as ``recipe`` says, train it (best state on the held-out
    split), evaluate it on the test split; return its metrics (``class_stats``: also the task's class statistics
    from its training images, under ``"class_stats"``, a :class:`~continual_mem.class_stats.ClassStats`). ``net``
    ends on the CPU."""
    r = recipe
    data = datasets.load(dataset, root=r.data_root, download=r.download)
    bb = net.backbone
    fork = default_recipe.resolve_fork(depth=len(bb.blocks), patches=bb.patch_embed.num_patches,
                                       has_tokens=get_regime(r.regime).has_tokens, mode=r.mode,
                                       layers=r.fork_layers, select=r.fork_select, finetune=r.fork_finetune,
                                       pooled=tuple(r.fork_pool) != (1, 1))
    with torch.random.fork_rng(devices=[]):  # the task's initial state follows ``seed`` (the same on every rank)
        torch.manual_seed(r.seed)
        net.add_task(name, data.num_classes, regime=r.regime, mode=r.mode, memory=r.memory, layers=r.layers,
                     adapter_dim=r.adapter_dim, fork_select=fork.select, fork_finetune=fork.finetune,
                     task_tokens=r.task_tokens, fork_layers=fork.layers, fork_pool=r.fork_pool,
                     class_names=data.class_names, dataset=dataset)
    net.to(device)
    pre = Preprocess.for_backbone(net.backbone, data.augment)
    train, held, test = sources(data, "test", pre, device, seed=r.seed, max_train=r.max_train, max_test=r.max_test,
                                max_heldout=r.max_heldout, pipeline=r.pipeline, on_bad_image=r.on_bad_image,
                                cache_dir=r.cache_dir, progress=progress, decoder=r.decoder)
    lr = default_recipe.SHORT_RATES[0] if r.lr is None else r.lr  # a placeholder until the short sweep picks one
    steps = default_recipe.training_steps(train_images=len(train), batch_size=r.batch_size, steps=r.steps,
                                          epochs=r.epochs)
    cfg = TrainConfig(steps=steps, batch_size=r.batch_size, lr=lr, seed=r.seed, eval_every=max(1, steps // 4),
                      cuda_graph=r.cuda_graph, finetune_lr_scale=r.finetune_lr_scale, layer_decay=r.layer_decay,
                      probe_fraction=r.probe_fraction, deterministic=r.deterministic, decoder_sms=r.decoder_sms)
    short: list[dict] = []
    if r.sweep_rates:
        result, _ = sweep(net, name, train, held, cfg, r.sweep_rates, progress=progress)
    else:
        if r.lr is None:
            cfg, short = _short_sweep(net, name, train, held, cfg, data.num_classes, progress=progress)
        result = fit(net, name, train, held, cfg, progress=progress)
    test_acc = evaluate(net, test, [name], batch_size=max(r.batch_size, 128))[name]
    extra = {"class_stats": collect_from_source(net, name, train, data.num_classes,
                                                batch_size=max(r.batch_size, 128))} if class_stats else {}
    net.to("cpu")  # the registry stores and verifies on the CPU
    return {"task": name, "dataset": dataset, "classes": data.num_classes, "heldout_accuracy": result.best_val_accuracy,
            "test_accuracy": test_acc, "train_images": len(train), "steps": result.steps, "lr": result.lr, "wall_time_s": result.wall_time_s,
            "train_images_per_s": result.images_per_s, "device": device,
            "fork": dataclasses.asdict(fork), "short_sweep": short, **extra}


def _short_sweep(net: MemoryViT, name: str, train, held, cfg: TrainConfig, num_classes: int, *,
                 progress: bool) -> tuple[TrainConfig, list[dict]]:
    """The default recipe's rate: a short run per rate from the task's initial state, one picked on the held-out
    split (:func:`~scenarios.protocol.choose_lr`). Returns the full run's config and the short runs; the task is
    back in its initial state."""
    initial = {k: v.detach().clone() for k, v in net.tasks[name].state_dict().items()}
    steps = default_recipe.short_steps(cfg.steps)
    short_cfg = dataclasses.replace(cfg, steps=steps, eval_every=steps)
    _, results = sweep(net, name, train, held, short_cfg, default_recipe.SHORT_RATES, progress=progress)
    runs = [{"lr": res.lr, "heldout_accuracy": res.best_val_accuracy,
             "final_loss": res.history[-1]["loss"] if res.history else None} for res in results]
    lr = choose_lr(runs, num_classes)
    net.tasks[name].load_state_dict(initial)
    log.info("%s: short sweep %s -> lr %g", name, runs, lr)
    return dataclasses.replace(cfg, lr=lr), runs
