"""A task's own parameters: class token(s), per-layer memory, input memory, head (and a backbone copy for
``full``). Everything a task owns lives in its ``TaskModule``, so a task's state is selected structurally
(``task.state_dict()``), never by name prefix."""
from __future__ import annotations

import copy

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .backbone import block0_class_token
from .config import TaskConfig
from .row_linear import RowLinear

MEMORY_INIT_STD = 0.02  # paper: memory initialised N(0, 0.02)
HEAD_INIT_STD = 0.01


class TaskModule(nn.Module):
    """Parameters of one task.

    Attributes:
        tokens: ``(1, n, D)`` task class tokens, in block-0 input space (after position embedding), or None.
        memory: ``(len(layers), m, D)`` per-layer memory tokens (keys/values only), or None.
        input_memory: ``(1, m_in, D)`` memory injected once at the input and propagated, or None.
        adapters: Two :class:`Adapter` per adapted block (after attention, after the MLP), or None; every block
            for the adapter regimes, the late-fork branch's blocks for a forked token task.
        blocks: Trainable copy of the backbone's last ``fork_layers`` blocks, run by the late-fork branch
            (``fork_finetune``), or None.
        controllers: Trainable copy of every block that updates the propagated memory (``mem-ctrl``), or None.
        backbone: Trainable copy of the backbone (``full`` regime only), or None.
        side: The regime's own network (``RegimeSpec.modules``; e.g. the ladder side network), or None.
        head: Linear classifier on the pooled final token state.
    """

    def __init__(self, config: TaskConfig, backbone: VisionTransformer, *, init: bool = True) -> None:
        """``init=False``: the parameters' shapes only (zeros), for a task whose stored tensors are loaded next;
        building a thousand tasks from a registry would otherwise run the backbone's embedding once each."""
        super().__init__()
        self.config = config
        dim = backbone.embed_dim
        ref = backbone.cls_token
        factory = {"device": ref.device, "dtype": ref.dtype}
        self.layer_to_slot: dict[int, int] = {layer: s for s, layer in enumerate(config.layers)}
        spec = config.spec

        self.tokens: nn.Parameter | None = None
        if spec.class_tokens and not init:
            self.tokens = nn.Parameter(torch.zeros(1, config.task_tokens, dim, **factory))
        elif spec.class_tokens:
            cls0 = block0_class_token(backbone)  # (1, D)
            tokens = cls0.repeat(config.task_tokens, 1)
            if config.task_tokens > 1:  # break the symmetry between otherwise identical tokens
                tokens[1:] += torch.randn_like(tokens[1:]) * MEMORY_INIT_STD
            self.tokens = nn.Parameter(tokens.unsqueeze(0))
        draw = torch.randn if init else torch.zeros
        self.memory: nn.Parameter | None = None
        if spec.layer_memory:
            self.memory = nn.Parameter(draw(len(config.layers), config.memory, dim, **factory) * MEMORY_INIT_STD)
        self.input_memory: nn.Parameter | None = None
        if spec.input_memory:
            self.input_memory = nn.Parameter(draw(1, config.input_memory, dim, **factory) * MEMORY_INIT_STD)
        self.adapters: nn.ModuleList | None = None
        depth = len(backbone.blocks)
        # after attention and after the MLP: in every block (adapter regimes) or in the late-fork branch's blocks
        first = 0 if spec.adapters else depth - config.fork_layers
        self.adapter_to_slot: dict[int, int] = {i: s for s, i in enumerate(range(first, depth))} \
            if config.adapter_dim else {}
        if self.adapter_to_slot:
            self.adapters = nn.ModuleList(Adapter(dim, config.adapter_dim, **factory)
                                          for _ in range(2 * len(self.adapter_to_slot)))
        self.blocks: nn.ModuleList | None = None
        if config.fork_finetune:
            self.blocks = nn.ModuleList(copy.deepcopy(backbone.blocks[depth - config.fork_layers:]))
        self.controllers: nn.ModuleList | None = None
        if spec.controllers:  # one trainable copy of each block updates the memory (MemCtrl)
            self.controllers = nn.ModuleList(copy.deepcopy(backbone.blocks))
        self.backbone: VisionTransformer | None = None
        if spec.backbone_copy:
            self.backbone = copy.deepcopy(backbone)
        self.side: nn.Module | None = spec.modules(config, backbone) if spec.modules is not None else None
        self.head = RowLinear(backbone.num_features, config.num_classes, **factory)
        if init:
            nn.init.trunc_normal_(self.head.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(self.head.bias)

    @property
    def name(self) -> str:
        return self.config.name

    def pretrained_copies(self) -> list[nn.Module]:
        """The task's copies of pretrained backbone weights (fine-tuned fork blocks, MemCtrl controllers, the
        ``full`` regime's backbone): they train at a smaller rate than the task's new parameters."""
        return [m for m in (self.blocks, self.controllers, self.backbone) if m is not None]

    def block_at(self, layer: int, backbone: VisionTransformer) -> nn.Module:
        """The block the task's branch runs at ``layer``: its own fine-tuned copy, else the backbone's."""
        if self.blocks is None:
            return backbone.blocks[layer]
        return self.blocks[layer - (len(backbone.blocks) - len(self.blocks))]

    def adapters_at(self, layer: int) -> tuple[nn.Module, nn.Module] | None:
        """The adapters after attention and after the MLP at block ``layer``, or None."""
        slot = self.adapter_to_slot.get(layer)
        return None if slot is None else (self.adapters[2 * slot], self.adapters[2 * slot + 1])

    def memory_at(self, layer: int) -> torch.Tensor | None:
        """Memory tokens ``(1, m, D)`` used at block ``layer``, or None."""
        slot = self.layer_to_slot.get(layer)
        return None if slot is None else self.memory[slot].unsqueeze(0)

    def extra_repr(self) -> str:
        c = self.config
        return f"name={c.name!r}, regime={c.regime}, mode={c.mode}, m={c.memory}, layers={list(c.layers)}"


class Adapter(nn.Module):
    """Houlsby et al.'s bottleneck adapter, ``y + up(gelu(down(y)))``. ``up`` starts at zero, so a new adapter is
    the identity (bit for bit: it adds exact zeros)."""

    def __init__(self, dim: int, bottleneck: int, **factory) -> None:
        super().__init__()
        self.down = RowLinear(dim, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, dim, **factory)
        nn.init.trunc_normal_(self.down.weight, std=MEMORY_INIT_STD)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(nn.functional.gelu(self.down(y)))
