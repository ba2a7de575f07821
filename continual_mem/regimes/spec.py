"""What a regime is: one frozen record of its parameters, config rules, path, accounting and oracle.

A regime family module (``shared``, ``own_pass``, ``memory_transformer``, ``full``; PEFT's tuners are the model)
builds :class:`RegimeSpec` records and hands them to :func:`continual_mem.regimes.register`. Everything else reads
the record (``TaskConfig.spec``): config validation, ``TaskModule``'s parameters, ``add_task``'s defaults, the
forward's path, the FLOP accounting, the training recipe and the test oracle. Adding a regime is one module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

Path = Literal["head", "token", "side", "own"]
# (model, task, images) -> logits: the fast own pass. ``model`` has ``backbone``, ``depth`` and ``embed``.
OwnPass = Callable[[Any, Any, torch.Tensor], torch.Tensor]
# (model, task, state) -> logits: a side network on the shared pass's states (``state.block_inputs`` of every block,
# ``state.features``: the final normed states, ``state.pre_logits``), computed under no_grad and read only.
SidePass = Callable[[Any, Any, Any], torch.Tensor]
# (config, backbone) -> the regime's own trainable module (``TaskModule.side``)
Modules = Callable[[Any, Any], torch.nn.Module]
# (backbone, task, images) -> logits: the oracle, written on timm's blocks, calling nothing of the fast path.
Reference = Callable[[Any, Any, torch.Tensor], torch.Tensor]
# (model, task) -> (FLOPs per image, FLOPs per forward independent of the batch)
Flops = Callable[[Any, Any], tuple[int, int]]
# (sequence tokens, propagated memory tokens, device) -> boolean attention mask (True = may attend), or None
OwnMask = Callable[[int, int, Any], "torch.Tensor | None"]

PATHS: tuple[str, ...] = ("head", "token", "side", "own")


@dataclass(frozen=True)
class RegimeSpec:
    """One regime.

    Args:
        name: The regime's name (``TaskConfig.regime``, ``--regime``).
        path: ``head`` (a head on the backbone's pooled features, in the shared pass), ``token`` (task tokens in the
            shared pass, the attention mask keeps everything else bit-exact; also the late fork's start), ``side``
            (a private network that reads the shared pass's states at every block and writes nothing back:
            preserving by construction) or ``own`` (a pass of the task's own: not preserving, runs separately).
        summary: One line for help texts.
        class_tokens: The task owns class tokens (``TaskModule.tokens``).
        layer_memory: Per-layer memory tokens (keys/values only): ``memory >= 1`` and memory layers required.
        input_memory: Memory injected once at the input and propagated: ``input_memory >= 1`` required.
        adapters: Bottleneck adapters in every block: ``adapter_dim >= 1`` required.
        controllers: A trainable copy of every block updates the propagated memory (MemCtrl).
        backbone_copy: A trainable copy of the whole backbone (full fine-tuning).
        layer_decay: The training recipe's default layer-wise rate decay for the task's pretrained copies.
        modules: Builds the regime's own trainable module (``TaskModule.side``), if it has one.
        own_pass: The fast own pass (``path == "own"``).
        side_pass: The side network's logits from the shared pass's states (``path == "side"``).
        reference: The oracle (``path`` ``own`` or ``side``): logits from the images, on timm's blocks, calling
            nothing of the fast path.
        flops: The task's FLOPs (see :data:`Flops`).
        own_mask: The own pass's attention mask over ``[sequence, propagated memory]``, for the attention analysis;
            None: full attention.
    """

    name: str
    path: Path
    summary: str
    flops: Flops
    class_tokens: bool = False
    layer_memory: bool = False
    input_memory: bool = False
    adapters: bool = False
    controllers: bool = False
    backbone_copy: bool = False
    layer_decay: float | None = None
    modules: Modules | None = None
    own_pass: OwnPass | None = None
    side_pass: SidePass | None = None
    reference: Reference | None = None
    own_mask: OwnMask | None = None

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"regime {self.name!r}: path must be one of {', '.join(PATHS)}, got {self.path!r}")
        own, side = self.path == "own", self.path == "side"
        if own != (self.own_pass is not None) or side != (self.side_pass is not None):
            raise ValueError(f"regime {self.name!r}: an own-pass regime needs own_pass, a side regime side_pass, "
                             "and no other path takes either")
        if (own or side) != (self.reference is not None):
            raise ValueError(f"regime {self.name!r}: own-pass and side regimes need a reference (their oracle); "
                             "head and token regimes are checked by the masked shared sequence")
        if side and self.modules is None:
            raise ValueError(f"regime {self.name!r}: a side regime needs modules (its side network)")
        if self.path == "token" and not self.class_tokens:
            raise ValueError(f"regime {self.name!r}: the token path needs class_tokens")
        if self.path == "head" and (self.class_tokens or self.layer_memory or self.input_memory or self.adapters):
            raise ValueError(f"regime {self.name!r}: the head path owns a head and nothing else")

    @property
    def preserving(self) -> bool:
        """Rides in the shared pass and leaves every other output bit-exact."""
        return self.path != "own"

    @property
    def has_tokens(self) -> bool:
        """Owns task tokens in the shared pass (what the attention mask is about)."""
        return self.path == "token"
