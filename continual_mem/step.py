"""One training step and what defines it: the config, the optimizer built from a task's parameters (the one
place where "only this task trains" is decided), the rate schedule, per-group gradient clipping and autocast."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from .model import MemoryViT
from .regimes import get_regime
from .task import TaskModule

class BatchSource(Protocol):
    """What ``fit`` reads: deterministic training batches by step, and evaluation batches."""

    def train_batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


# Sources used in multi-process jobs also take ``shard=`` (a :class:`~continual_mem.distributed.Shard`) in both
# methods: ``train_batch`` then returns the rank's part of the global batch, ``eval_batches`` the rank's part of the
# set (scenarios.pipeline's sources do).


@dataclass
class TrainConfig:
    """Args:
        steps: Optimizer steps.
        batch_size: Images per step.
        lr: Peak learning rate (after warm-up).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_steps: Linear warm-up steps (default 5% of ``steps``).
        max_grad_norm: Gradient clipping norm, per optimizer group (None: off).
        label_smoothing: Cross-entropy label smoothing (off by default, as the paper).
        eval_every: Evaluate on the held-out split every this many steps (and at the end).
        patience: Stop after this many evaluations without improvement (None: never).
        seed: Seeds data order, augmentation and the task's initialisation-independent randomness.
        amp: ``auto`` (bf16 autocast on CUDA), ``bf16`` or ``off``.
        checkpoint_every: Save a resumable checkpoint every this many steps (0: never).
        checkpoint_dir: Where checkpoints go (required when ``checkpoint_every > 0``).
        cuda_graph: Capture the training step as a CUDA graph and replay it (one GPU, fixed batch shape; see
            :class:`~continual_mem.graphs.GraphedTrainStep`). Same maths as the eager step.
        finetune_lr_scale: A task's copies of pretrained weights (``full``, fine-tuned forks, MemCtrl controllers)
            train at this times the rate.
        probe_fraction: LP-FT (Kumar et al., ICLR 2022): the first this fraction of the steps trains only the task's
            new parameters (head, tokens, memory); its copies of pretrained weights start after, with their own
            warm-up and cosine decay over the steps left. A copy fine-tuned under a freshly initialised head is
            pulled by that head's noise.
        layer_decay: Layer-wise rate decay for the copies (timm's ``layer_decay``): block ``i`` of ``D`` trains at
            ``layer_decay ** (D - i)`` times their rate, the patch embedding least. None: the regime's default
            (:func:`default_layer_decay`); 1.0: off.
        deterministic: Train with deterministic algorithms only (``torch.use_deterministic_algorithms``, cuDNN
            deterministic, cuBLAS's fixed workspace): the same command, seed and GPU give bit-identical task
            weights. Our Triton kernels use no atomics, so they need no change.
        decoder_sms: SMs held back from the training step for a GPU JPEG decoder beside it (the step runs on a CUDA
            green context of the others, :mod:`continual_mem.sm_partition`). None: 8 when the training source
            decodes on the GPU (``gpu_decoding``), else 0.
    """

    steps: int = 1000
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    max_grad_norm: float | None = 1.0
    label_smoothing: float = 0.0
    eval_every: int = 100
    patience: int | None = None
    seed: int = 0
    amp: Literal["auto", "bf16", "off"] = "auto"
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    cuda_graph: bool = False
    finetune_lr_scale: float = 0.03
    probe_fraction: float = 0.0
    layer_decay: float | None = None
    deterministic: bool = False
    decoder_sms: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.finetune_lr_scale <= 0:
            raise ValueError(f"finetune_lr_scale must be > 0, got {self.finetune_lr_scale}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.probe_fraction < 1.0:
            raise ValueError(f"probe_fraction must be in [0, 1), got {self.probe_fraction}")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 20)
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in 0..steps, got {self.warmup_steps}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir")
        if self.decoder_sms is not None and self.decoder_sms < 0:
            raise ValueError(f"decoder_sms must be >= 0 or None (auto), got {self.decoder_sms}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass
class TrainResult:
    task: str
    steps: int
    best_step: int
    best_val_accuracy: float
    wall_time_s: float
    images_per_s: float
    history: list[dict] = field(default_factory=list)
    lr: float = 0.0


def build_optimizer(
    model: MemoryViT,
    task: str,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    cuda_graph: bool = False,
    finetune_lr_scale: float = 0.03,
    layer_decay: float | None = None,
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's optimizer) over ``task``'s parameters only.

    Everything else in the model (backbone, other tasks) is set to ``requires_grad=False``. The task's copies of
    pretrained weights (:meth:`TaskModule.pretrained_copies`) are their own parameter group at
    ``finetune_lr_scale`` times the rate: pretrained weights need far smaller steps than a new head or new tokens,
    and one rate for both either leaves the head untrained or wrecks the backbone (each group's ``lr_scale`` says
    which). With ``layer_decay`` the copies' rate also shrinks by that factor per layer below the top, timm's
    layer-wise decay (:func:`layer_decay_scales`). With ``cuda_graph`` each group's learning rate is a tensor on the
    parameters' device and the update is the fused kernel, so a captured step can be replayed at any scheduled
    learning rate. Each group's ``kind`` (``new`` or ``pretrained``) decides its clipping budget and probe phase.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = model.trainable_parameters(task)
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    module = model.tasks[task]
    slow = {id(p) for m in module.pretrained_copies() for p in m.parameters()}
    groups = [{"params": [p for p in params if id(p) not in slow], "lr_scale": 1.0, "kind": "new"}]
    scales = (layer_decay_scales(module, model.depth, layer_decay) if layer_decay is not None
              else dict.fromkeys(slow, 1.0))
    for scale in sorted({scales[i] for i in slow}, reverse=True):
        groups.append({"params": [p for p in params if id(p) in slow and scales[id(p)] == scale],
                       "lr_scale": finetune_lr_scale * scale, "kind": "pretrained"})
    for g in groups:
        g["lr"] = (torch.tensor(lr * g["lr_scale"], dtype=torch.float32, device=params[0].device) if cuda_graph
                   else lr * g["lr_scale"])
    if cuda_graph:
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def optimizer_params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def train_step(
    model: MemoryViT,
    task: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None = 1.0,
    label_smoothing: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    zero_grad: bool = True,
) -> torch.Tensor:
    """One SGD step on ``task``: forward only that task (and what it reads), cross-entropy, backward, clipping,
    step. The one step used by ``fit`` (eager), :class:`~continual_mem.graphs.GraphedTrainStep` (captured) and the
    benchmarks.

    Args:
        model: The model, or a ``DistributedDataParallel`` wrapper of it.
        autocast_dtype: Run the forward under autocast with this dtype (None: as the caller's context is).
        zero_grad: Clear gradients first (a CUDA graph capture clears them outside instead).
    """
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    cast = contextlib.nullcontext() if autocast_dtype is None else torch.autocast(
        images.device.type, dtype=autocast_dtype,
        # autocast's cast cache does not survive CUDA-graph capture
        cache_enabled=not (images.is_cuda and torch.cuda.is_current_stream_capturing()))
    with cast:
        logits = model(images, tasks=[task], original=False)[task]
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    loss.backward()
    if max_grad_norm is not None:
        clip_grad_norm_per_group(optimizer, max_grad_norm)
    optimizer.step()
    return loss.detach()


def default_layer_decay(regime: str) -> float | None:
    """The regime's default (``RegimeSpec.layer_decay``): 0.75 for ``full`` (a whole backbone copy, patch embedding
    included: without decay SGD wrecks it and full fine-tuning lands 4-10 points below head-only on the
    natural-image suite; with it, 1.4-5.6 points above); off for copies of the top blocks only (fine-tuned forks,
    measured without it)."""
    return get_regime(regime).layer_decay


def layer_decay_scales(task: TaskModule, depth: int, decay: float) -> dict[int, float]:
    """``id(parameter) -> decay ** (depth + 1 - layer)`` for a task's copies of pretrained weights, layers counted
    as timm's layer-wise decay counts them (0 the patch embedding, ``i + 1`` block ``i``; the final norm goes with
    the last block), so the embedding moves least. SGD's step is not normalised per parameter, and DINOv2 S/14's
    patch embedding carries most of the gradient norm (26 of 30) on a weight of norm 3: without decay it is the
    first thing fine-tuning wrecks."""
    from timm.optim import param_groups_layer_decay

    scales: dict[int, float] = {}
    if task.backbone is not None:  # full: a whole timm ViT, timm's own layer map
        for group in param_groups_layer_decay(task.backbone, weight_decay=0.0, layer_decay=decay):
            scales.update(dict.fromkeys((id(p) for p in group["params"]), group["lr_scale"]))
    for blocks in (task.blocks, task.controllers):  # the last len(blocks) blocks of the backbone
        if blocks is not None:
            for j, block in enumerate(blocks):
                layer = depth - len(blocks) + j + 1
                scales.update(dict.fromkeys((id(p) for p in block.parameters()), decay ** (depth + 1 - layer)))
    return scales


def group_lr(step: int, config: TrainConfig, *, pretrained: bool) -> float:
    """The schedule of one kind of optimizer group at ``step`` (each group runs at its ``lr_scale`` times it):
    :func:`lr_at`; for copies of pretrained weights (``pretrained``) it starts at the end of the probe phase
    (``config.probe_fraction``) instead, with a warm-up and decay of its own over the steps left."""
    probe = int(config.probe_fraction * config.steps)
    if not pretrained or probe == 0:
        return lr_at(step, config)
    if step < probe:
        return 0.0
    rest = config.steps - probe
    tail = replace(config, steps=rest, probe_fraction=0.0, warmup_steps=max(1, rest // 20))
    return lr_at(step - probe, tail)


def clip_grad_norm_per_group(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip each optimizer group's gradient norm (groups of the same ``kind`` together) to ``max_norm`` on its
    own. One global norm would couple the groups:
    a copy of pretrained blocks has a gradient norm 3-6x a new head's (DINOv2 S/14, measured), so a global clip
    shrinks the head's step by as much and full fine-tuning ends up with a head trained far less than head-only at
    the same rate. With one group (every token regime) this is the usual global clip."""
    clip: dict[object, list[torch.Tensor]] = {}
    for i, group in enumerate(optimizer.param_groups):
        clip.setdefault(group.get("kind", i), []).extend(group["params"])
    for params in clip.values():
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to 0 (``step`` counts from 0)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    use = config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda")
    return torch.bfloat16 if use else None


def autocast(config: TrainConfig, device: torch.device):
    dtype = autocast_dtype(config, device)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Deterministic algorithms inside the block, the previous settings restored after. cuBLAS needs a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``) before its first use in the process; it is set here if unset (a
    process that used cuBLAS before keeps its workspace, and PyTorch then raises naming the variable)."""
    if not enabled:
        yield
        return
    import os

    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]
