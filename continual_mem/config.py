"""Task configuration: what a task is, validated once at construction."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from .regimes import RegimeSpec, get_regime, regime_names

Regime = str  # a registered regime's name: see continual_mem.regimes
Mode = Literal["concatenation", "extension"]

REGIMES: tuple[str, ...] = regime_names()  # the built-in ones; regime_names() also lists plug-ins
MODES: tuple[str, ...] = get_args(Mode)


def _token_regimes() -> str:
    """The token regimes' names for messages, e.g. ``head+cls or masked-memory``."""
    return " or ".join(n for n in regime_names() if get_regime(n).has_tokens)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
RESERVED_NAMES: frozenset[str] = frozenset({"original"})


def _module_attribute(name: str) -> bool:
    """Names ``nn.ModuleDict.add_module`` refuses (methods and attributes such as ``half``, ``cuda``, ``training``)."""
    from torch import nn

    return hasattr(nn.ModuleDict(), name)


def parse_layers(spec: str | int | list[int] | tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Resolve a layer choice to sorted block indices.

    Args:
        spec: ``"all"``, ``"last:k"``, ``"first:k"``, ``"none"``, a comma list ``"0,3,11"`` or a sequence of ints.
        depth: Number of transformer blocks of the backbone.
    """
    if isinstance(spec, (list, tuple)):
        layers = tuple(int(i) for i in spec)
    elif isinstance(spec, int):
        layers = (spec,)
    else:
        text = spec.strip().lower()
        if text == "all":
            layers = tuple(range(depth))
        elif text == "none":
            layers = ()
        elif m := re.fullmatch(r"(first|last):(\d+)", text):
            k = int(m.group(2))
            if not 1 <= k <= depth:
                raise ValueError(f"layers {spec!r}: k must be in 1..{depth} for a {depth}-block backbone")
            layers = tuple(range(k)) if m.group(1) == "first" else tuple(range(depth - k, depth))
        elif re.fullmatch(r"\d+(,\d+)*", text):
            layers = tuple(int(t) for t in text.split(","))
        else:
            raise ValueError(f"layers {spec!r} not understood: use all, none, first:K, last:K or a list like 0,5,11")
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {depth}-block backbone (valid 0..{depth - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(layers)} has duplicates")
    return tuple(sorted(layers))


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines a task's computation (not its weights).

    Args:
        name: Unique task name (letters, digits, ``_.-``; ``original`` is reserved for the backbone head).
        num_classes: Size of the task's linear head.
        regime: What is trained; see README. Preserving regimes: ``head``, ``head+cls``, ``masked-memory``.
        mode: ``concatenation`` (sees backbone + itself) or ``extension`` (also sees earlier tasks' tokens and
            memory). Only meaningful for token regimes (``head+cls``, ``masked-memory``).
        memory: Memory tokens per layer (``m``); 0 for regimes without per-layer memory.
        layers: Block indices that get memory.
        input_memory: Memory tokens injected at the input (``input-memory`` / ``hybrid`` regimes).
        task_tokens: Number of class tokens the task owns; their final states are averaged for the head.
        fork_layers: Late fork ``k`` (token regimes, concatenation mode): for the last ``k`` blocks the task runs
            a private copy of the token stream (its tokens + the backbone's patches and registers at block
            ``depth - k``) with full attention, its memory as extra keys/values. Preserving by construction (the
            branch is the task's own); costs about ``k / depth`` of a backbone pass. 0 is the paper's masked
            memory; ``depth`` is the paper's full-attention ``memory`` (or unmasked ``head+cls``) regime.
        fork_select: Keep only this many patches in the late-fork branch, those the backbone's class token attends
            to most at the fork block (mean over heads; EViT-style token selection), in their grid order; 0: all.
            An alternative to ``fork_pool``.
        adapter_dim: Bottleneck width of the adapters: every block for the ``adapters`` / ``memory+adapters``
            regimes (the paper's Table 4 uses 5); the blocks of the private branch for a late-fork token task
            (preserving: the branch is the task's own); 0: none.
        fork_finetune: Give the late-fork branch its own trainable copy of the backbone's last ``fork_layers``
            blocks (surgical fine-tuning of the top blocks). Preserving: the branch is the task's own. The copy
            trains at ``TrainConfig.finetune_lr_scale`` times the task's learning rate.
        fork_pool: Average-pool the patch grid entering the fork by ``(rows, cols)`` (an int ``p`` means
            ``(p, p)``; registers kept): the branch runs on ``rows * cols`` times fewer patch tokens, so a deeper
            fork costs what a shallow one did. ``(1, 1)``: no pooling.
        sees: Names of earlier tasks whose tokens and memory this task attends to (extension mode only). Fixed
            when the task is added so its computation never depends on tasks added later.
        class_names: Optional human-readable class names (length ``num_classes``).
        dataset: Optional dataset name the task was trained on.
    """

    name: str
    num_classes: int
    regime: Regime = "masked-memory"
    mode: Mode = "concatenation"
    memory: int = 5
    layers: tuple[int, ...] = ()
    input_memory: int = 0
    task_tokens: int = 1
    fork_layers: int = 0
    fork_pool: tuple[int, int] = (1, 1)
    fork_select: int = 0
    adapter_dim: int = 0
    fork_finetune: bool = False
    sees: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name) or self.name in RESERVED_NAMES:
            raise ValueError(
                f"task name {self.name!r} is invalid: use 1-64 letters, digits, '_', '.', '-' (not 'original')"
            )
        if _module_attribute(self.name):
            raise ValueError(f"task name {self.name!r} is the name of a torch module attribute (tasks live in an "
                             f"nn.ModuleDict); choose another name, e.g. {self.name}-task")
        if self.num_classes < 1:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        try:
            spec = get_regime(self.regime)
        except ValueError as exc:  # the registry names the known regimes
            raise ValueError(f"task {self.name!r}: {exc}") from None
        if self.mode not in MODES:
            raise ValueError(f"task {self.name!r}: unknown mode {self.mode!r}; choose concatenation or extension")
        if self.mode == "extension" and not spec.has_tokens:
            raise ValueError(
                f"task {self.name!r}: extension mode needs a token regime ({_token_regimes()}), not {self.regime!r}"
            )
        if self.sees and self.mode != "extension":
            raise ValueError(f"task {self.name!r}: only extension-mode tasks see earlier tasks")
        if self.memory < 0 or self.input_memory < 0:
            raise ValueError(f"task {self.name!r}: memory sizes must be >= 0")
        if spec.layer_memory:
            if self.memory < 1 or not self.layers:
                raise ValueError(
                    f"task {self.name!r}: regime {self.regime!r} needs memory >= 1 and at least one memory layer"
                )
        elif self.memory or self.layers:
            raise ValueError(f"task {self.name!r}: regime {self.regime!r} has no per-layer memory; set memory=0")
        if spec.input_memory:
            if self.input_memory < 1:
                raise ValueError(f"task {self.name!r}: regime {self.regime!r} needs input_memory >= 1")
        elif self.input_memory:
            raise ValueError(f"task {self.name!r}: regime {self.regime!r} has no input memory; set input_memory=0")
        if self.adapter_dim < 0:
            raise ValueError(f"task {self.name!r}: adapter_dim must be >= 0, got {self.adapter_dim}")
        if spec.adapters:
            if self.adapter_dim < 1:
                raise ValueError(f"task {self.name!r}: regime {self.regime!r} needs adapter_dim >= 1 (the paper uses 5)")
        elif self.adapter_dim and not (spec.has_tokens and self.fork_layers):
            adapter_regimes = " / ".join(r for r in regime_names() if get_regime(r).adapters)
            raise ValueError(f"task {self.name!r}: regime {self.regime!r} has adapters only inside a late-fork branch "
                             f"(add --fork-layers K) or as an adapter regime ({adapter_regimes}); else drop "
                             "--adapter-dim")
        if self.task_tokens < 1:
            raise ValueError(f"task {self.name!r}: task_tokens must be >= 1")
        if self.task_tokens > 1 and not spec.has_tokens:
            raise ValueError(f"task {self.name!r}: several task tokens need a token regime ({_token_regimes()})")
        if self.fork_layers < 0:
            raise ValueError(f"task {self.name!r}: fork_layers must be >= 0, got {self.fork_layers}")
        if self.fork_layers and not spec.has_tokens:
            raise ValueError(
                f"task {self.name!r}: a late fork needs a token regime ({_token_regimes()}), not {self.regime!r}"
            )
        if self.fork_layers and self.mode != "concatenation":
            raise ValueError(f"task {self.name!r}: a late fork runs in concatenation mode; drop --mode extension")
        pool = self.fork_pool
        if isinstance(pool, int):
            pool = (pool, pool)
        pool = tuple(pool)
        if len(pool) != 2 or not all(isinstance(v, int) for v in pool):
            raise ValueError(f"task {self.name!r}: fork_pool must be an int or (rows, cols), got {self.fork_pool!r}")
        object.__setattr__(self, "fork_pool", pool)
        if min(pool) < 1:
            raise ValueError(f"task {self.name!r}: fork_pool must be >= 1, got {self.fork_pool}")
        if self.fork_select < 0:
            raise ValueError(f"task {self.name!r}: fork_select must be >= 0, got {self.fork_select}")
        if self.fork_select and not self.fork_layers:
            raise ValueError(f"task {self.name!r}: fork_select picks patches for the late-fork branch; it needs "
                             "fork_layers >= 1")
        if self.fork_select and pool != (1, 1):
            raise ValueError(f"task {self.name!r}: use fork_select or fork_pool, not both")
        if pool != (1, 1) and not self.fork_layers:
            raise ValueError(f"task {self.name!r}: fork_pool pools the late-fork branch; it needs fork_layers >= 1")
        if self.fork_finetune and not self.fork_layers:
            raise ValueError(f"task {self.name!r}: fork_finetune trains a copy of the late-fork branch's blocks; it "
                             "needs fork_layers >= 1")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"task {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    @property
    def spec(self) -> RegimeSpec:
        """The task's regime (its family module's record: parameters, path, accounting, oracle)."""
        return get_regime(self.regime)

    @property
    def preserving(self) -> bool:
        """True if adding this task leaves every other output bit-exact and it runs in the shared pass."""
        return self.spec.preserving

    @property
    def class_labels(self) -> tuple[str, ...]:
        """The class names, or ``"0" .. "K-1"`` when the task has none."""
        return self.class_names or tuple(str(i) for i in range(self.num_classes))

    @property
    def has_tokens(self) -> bool:
        return self.spec.has_tokens

    @property
    def group_shape(self) -> tuple:
        """What tasks sharing a group (and a stacked launch) must agree on: memory per layer, layers, tokens."""
        return (self.memory, self.layers, self.task_tokens)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["sees"] = list(self.sees)
        d["class_names"] = list(self.class_names)
        d["fork_pool"] = list(self.fork_pool)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"task config has unknown fields {sorted(unknown)}; written by a newer continual-mem?")
        d = dict(d)
        for key in ("layers", "sees", "class_names", "fork_pool"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
