"""What training one task on a dataset takes: the task's shape, the training schedule and the data options, in one
validated dataclass. ``add-task`` reads its defaults from here and :func:`scenarios.recipes.train_on_dataset`
takes it, so the CLI and the library never disagree on a default. No torch import: the CLI reads it at start-up."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

Pipeline = Literal["auto", "prepared", "decode", "loader"]
OnBad = Literal["skip", "fail"]
Decoder = Literal["auto", "device", "host"]  # where JPEGs are decoded (scenarios.gpu_jpeg.choose_decoder)
DECODERS: tuple[str, ...] = get_args(Decoder)


@dataclass(frozen=True)
class TaskRecipe:
    """Args:
        regime: What the task trains (see the README's recipe table).
        mode: ``concatenation`` or ``extension`` (token regimes).
        memory: Memory tokens per layer (None: the regime's default).
        layers: Blocks with memory: ``all``, ``last:K``, ``first:K`` or a list.
        task_tokens: Class tokens of the task.
        adapter_dim: Adapter bottleneck width (None: the regime's default).
        fork_layers: Late fork over the last K blocks (0: none; None: the default fork of
            :mod:`scenarios.default_recipe`, 2/3 of the blocks, for concatenation-mode token regimes).
        fork_pool: Average-pool the patch grid entering the fork, ``(rows, cols)``.
        fork_select: Keep the N patches the class token attends to most in the fork (0: all; None: 3/8 of the
            patches with the default fork, else all).
        fork_finetune: The fork runs the task's own trainable copy of its blocks (None: with the default fork).
        finetune_lr_scale: Rate of the task's copies of pretrained weights over ``lr``.
        layer_decay: timm's layer-wise rate decay for those copies (None: the regime's default).
        probe_fraction: LP-FT: the share of the steps that trains only the new parameters first.
        steps: Optimizer steps (None: from the data, :func:`scenarios.default_recipe.training_steps`).
        epochs: Passes over the training split instead of ``steps``.
        batch_size: Global batch size.
        lr: Learning rate (ignored when ``lr_sweep`` is given; None: a short sweep on the held-out split picks it,
            :mod:`scenarios.default_recipe`).
        lr_sweep: Comma list of rates; the best on the held-out split is kept.
        seed: Seed of the task's initial state, the split and the batches.
        cuda_graph: Replay the training step as a CUDA graph (one GPU).
        deterministic: Deterministic algorithms only: the same command, seed and GPU give bit-identical weights.
        data_root: Folder of torchvision datasets.
        download: Let torchvision download missing data.
        max_train: Cap on training images (stratified); None: all.
        max_test: Cap on test images (stratified); None: all.
        max_heldout: Cap on held-out images (stratified); None: all.
        pipeline: Input path for image files.
        decoder: Where JPEGs are decoded: auto, device (nvJPEG) or host (worker processes); see
            :func:`scenarios.gpu_jpeg.choose_decoder`.
        decoder_sms: SMs held back from training for a GPU JPEG decoder (``TrainConfig.decoder_sms``; None: 8
            when JPEGs are decoded on the GPU).
        on_bad_image: Skip an undecodable image or stop.
        cache_dir: Folder of prepared copies (None: the default).
    """

    regime: str = "masked-memory"
    mode: str = "concatenation"
    memory: int | None = None
    layers: str = "all"
    task_tokens: int = 1
    adapter_dim: int | None = None
    fork_layers: int | None = None
    fork_pool: tuple[int, int] = (1, 1)
    fork_select: int | None = None
    fork_finetune: bool | None = None
    finetune_lr_scale: float = 0.03
    layer_decay: float | None = None
    probe_fraction: float = 0.0
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128
    lr: float | None = None
    lr_sweep: str = ""
    seed: int = 0
    cuda_graph: bool = False
    deterministic: bool = False
    data_root: str = "data"
    download: bool = False
    max_train: int | None = None
    max_test: int | None = None
    max_heldout: int | None = 2000
    pipeline: Pipeline = "auto"
    decoder: Decoder = "auto"
    decoder_sms: int | None = None
    on_bad_image: OnBad = "skip"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fork_pool", tuple(self.fork_pool))
        if (self.steps is not None and self.steps < 1) or self.batch_size < 1 or self.task_tokens < 1:
            raise ValueError(f"steps, batch_size and task_tokens must be >= 1, got {self.steps}, {self.batch_size}, "
                             f"{self.task_tokens}")
        if self.decoder_sms is not None and self.decoder_sms < 0:
            raise ValueError(f"decoder_sms must be >= 0, got {self.decoder_sms}; pass --decoder-sms 0 or more")
        if self.epochs is not None and (self.steps is not None or self.epochs <= 0):
            raise ValueError(f"epochs must be > 0 and steps not given with it, got epochs {self.epochs}, steps "
                             f"{self.steps}; give --steps or --epochs")
        if (self.lr is not None and self.lr < 0) or self.finetune_lr_scale < 0:
            raise ValueError(f"lr and finetune_lr_scale must be >= 0, got {self.lr}, {self.finetune_lr_scale}")
        if self.lr_sweep:
            try:
                rates = self.sweep_rates
            except ValueError:
                rates = []
            if not rates or min(rates) <= 0:
                raise ValueError(f"lr_sweep {self.lr_sweep!r}: give a comma list of rates > 0, e.g. 0.01,0.05,0.1")
        if not 0.0 <= self.probe_fraction < 1.0:
            raise ValueError(f"probe_fraction must be in [0, 1), got {self.probe_fraction}")
        if self.pipeline not in ("auto", "prepared", "decode", "loader"):
            raise ValueError(f"pipeline must be auto, prepared, decode or loader, got {self.pipeline!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be auto, device or host, got {self.decoder!r}")
        if self.on_bad_image not in ("skip", "fail"):
            raise ValueError(f"on_bad_image must be skip or fail, got {self.on_bad_image!r}")
        for name in ("max_train", "max_test", "max_heldout"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")

    @property
    def sweep_rates(self) -> list[float]:
        """The rates of ``lr_sweep`` (empty: train at ``lr``)."""
        return [float(v) for v in self.lr_sweep.split(",")] if self.lr_sweep else []

    def to_dict(self) -> dict:
        """Plain values (for a job spec handed to other processes); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TaskRecipe":
        return cls(**data)


DEFAULT = TaskRecipe()
