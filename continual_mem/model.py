"""MemoryViT: a frozen timm ViT that grows one task at a time and runs every task in one pass."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .backbone import capture_block_inputs, capture_qkv, fingerprint, freeze, split_qkv, validate_backbone
from .branches import PrivatePasses
from .cache_keys import KVKey
from .checks import dependants, extension_mismatch, name_taken, removal_refused
from .config import TaskConfig, parse_layers
from .kernels import fused_task_attention, use_triton
from .layers import group_block, task_block
from .masking import visible_tasks
from .regimes import get_regime
from .task import TaskModule
from .task_paths import TaskPaths

log = logging.getLogger(__name__)

ORIGINAL = "original"  # key of the backbone's own head in every output dict
DEFAULT_SIZE = 5  # memory per layer, input memory and adapter width when a regime has them and none is given


class Unit(NamedTuple):
    """One step of the multi-task forward: a task ``group`` (fixed capacity) or a single ``task``."""

    kind: str
    names: tuple[str | None, ...]


class TaskError(ValueError):
    """A task operation cannot be done (duplicate name, unknown task, dependants, incompatible state)."""


class MemoryViT(TaskPaths, PrivatePasses, nn.Module):
    """A frozen timm ``VisionTransformer`` plus any number of tasks (paper: Sandler et al., CVPR 2022).

    ``forward(images)`` returns ``{"original": backbone logits, task_name: task logits, ...}``. The backbone
    runs once through timm's own code; each preserving task then advances only its own tokens, attending to the
    backbone's cached K/V, so the original outputs and every earlier task stay bit-exact when tasks are added.
    Non-preserving regimes (``memory``, ``full``, ``input-memory``, ``hybrid``) need a pass of their own;
    ``forward`` runs them separately (see ``separate_pass_tasks``).

    Args:
        backbone: A timm ViT; it is frozen (``requires_grad=False``) and kept in eval mode.
        group_size: Capacity of a task group: concatenation-mode tasks of the same shape run ``group_size`` at a
            time in one set of kernels whose shapes never depend on how many slots are filled. Part of the
            model's identity (a task's bits depend on it); 1 runs every task on its own.

    Attributes:
        stack_groups: On CUDA with Triton, run every group of one shape in one set of launches per block
            (:mod:`continual_mem.stacked`; default True). Set False for the per-group path. Either way a task's
            bits never depend on the other tasks; the two paths' bits differ from each other.
    """

    def __init__(self, backbone: VisionTransformer, *, group_size: int = 4) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.backbone = freeze(validate_backbone(backbone))
        self._group_block = group_block  # swapped for compiled versions by compile_task_path()
        self._task_block = task_block
        self.tasks = nn.ModuleDict()
        self._kv_cache: dict[KVKey, tuple] = {}
        self._fingerprint: str | None = None
        self.generation = 0  # bumped by invalidate_cache(): writes that version counters do not see
        self.stack_groups = True

    # ------------------------------------------------------------------ structure
    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks.keys())

    @property
    def token_task_names(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.config.has_tokens]

    @property
    def separate_pass_tasks(self) -> list[str]:
        """Tasks that cannot share the single pass (their patches attend to task parameters)."""
        return [n for n, t in self.tasks.items() if not t.config.preserving]

    def backbone_fingerprint(self) -> str:
        """sha256 of the frozen backbone's state (cached; the backbone never changes)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.backbone)
        return self._fingerprint

    def train(self, mode: bool = True) -> "MemoryViT":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout / drop-path, ever
        return self

    def add_task(
        self,
        name: str,
        num_classes: int,
        *,
        regime: str = "masked-memory",
        mode: str = "concatenation",
        memory: int | None = None,
        layers: str | Sequence[int] = "all",
        input_memory: int | None = None,
        task_tokens: int = 1,
        fork_layers: int = 0,
        fork_pool: int | tuple[int, int] = 1,
        fork_select: int = 0,
        fork_finetune: bool = False,
        adapter_dim: int | None = None,
        class_names: Sequence[str] = (),
        dataset: str = "",
    ) -> TaskModule:
        """Grow the model by one task; nothing that exists changes.

        Args:
            name: Unique task name.
            num_classes: Number of classes of the task's head.
            regime: ``head``, ``head+cls``, ``masked-memory`` (preserving, single pass), ``memory`` (full
                attention to memory, paper's best accuracy, own pass), ``full`` (fine-tuned copy),
                ``input-memory`` / ``hybrid`` (memory propagated from the input, Burtsev et al.), ``adapters`` /
                ``memory+adapters`` (Houlsby bottleneck adapters in every block, alone or with memory; own pass),
                ``mem-ctrl`` / ``mem-bottleneck`` (the Memory Transformer's ablations on propagated memory; own
                pass).
            mode: ``concatenation`` or ``extension`` (token regimes only).
            memory: Memory tokens per layer (default 5 for memory regimes, 0 otherwise).
            layers: Which blocks get memory: ``all``, ``last:k``, ``first:k`` or indices.
            input_memory: Input memory tokens (default 5 for ``input-memory``/``hybrid``).
            task_tokens: Class tokens owned by the task.
            fork_layers: Late fork ``k``: the last ``k`` blocks run on a private copy of the token stream with
                full attention to the task's memory (token regimes; see :class:`TaskConfig`).
            fork_pool: Average-pool the patch grid where the fork starts, ``p`` or ``(rows, cols)`` (cheaper, deeper
                forks).
            fork_select: Keep only this many patches in the fork branch, those the class token attends to most.
            fork_finetune: The fork branch runs the task's own trainable copy of the last ``fork_layers`` blocks.
            adapter_dim: Adapter bottleneck width (``adapters`` / ``memory+adapters``; default 5, the paper's).
            class_names: Optional class names.
            dataset: Optional dataset name.
        """
        spec = get_regime(regime)  # unknown names fail here, naming the known ones
        memory = (DEFAULT_SIZE if spec.layer_memory else 0) if memory is None else memory
        layer_idx = parse_layers(layers, self.depth) if spec.layer_memory else ()
        input_memory = (DEFAULT_SIZE if spec.input_memory else 0) if input_memory is None else input_memory
        adapter_dim = (DEFAULT_SIZE if spec.adapters else 0) if adapter_dim is None else adapter_dim
        sees: tuple[str, ...] = ()
        if mode == "extension":
            tokens = self.token_task_names
            modes = [self.tasks[n].config.mode for n in tokens] + ["extension"]
            sees = tuple(tokens[i] for i in visible_tasks(len(tokens), modes)[:-1])
        config = TaskConfig(
            name=name,
            num_classes=num_classes,
            regime=regime,  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            memory=memory,
            layers=layer_idx,
            input_memory=input_memory,
            task_tokens=task_tokens,
            fork_layers=fork_layers,
            fork_pool=fork_pool,
            fork_select=fork_select,
            fork_finetune=fork_finetune,
            adapter_dim=adapter_dim,
            sees=sees,
            class_names=tuple(class_names),
            dataset=dataset,
        )
        return self.attach(TaskModule(config, self.backbone))

    def attach(self, task: TaskModule) -> TaskModule:
        """Append an already-built task (from :func:`add_task` or an imported state)."""
        c = task.config
        if (problem := name_taken(c.name, self.tasks)) is not None:
            raise TaskError(problem)
        if max(c.layers, default=-1) >= self.depth:
            raise TaskError(f"task {c.name!r} uses layer {max(c.layers)} but the backbone has {self.depth} blocks")
        if c.fork_layers > self.depth:
            raise TaskError(f"task {c.name!r} forks {c.fork_layers} layers but the backbone has {self.depth} blocks")
        if c.fork_select > self.backbone.patch_embed.num_patches:
            raise TaskError(f"task {c.name!r}: fork_select {c.fork_select} is more than the backbone's "
                            f"{self.backbone.patch_embed.num_patches} patches")
        grid = tuple(self.backbone.patch_embed.grid_size)
        if grid[0] % c.fork_pool[0] or grid[1] % c.fork_pool[1]:
            raise TaskError(f"task {c.name!r}: fork_pool {c.fork_pool[0]}x{c.fork_pool[1]} does not divide the "
                            f"{grid[0]}x{grid[1]} patch grid; pick divisors of the grid")
        forked = [s for s in c.sees if self.tasks[s].config.fork_layers] if set(c.sees) <= set(self.tasks) else []
        if forked:
            raise TaskError(
                f"extension task {c.name!r} would read late-fork tasks {forked}, whose tokens live in private "
                "branches; use concatenation mode, or add the extension task to a model without late-fork tasks"
            )
        if (problem := extension_mismatch(c, self.token_task_names)) is not None:
            raise TaskError(problem)
        self.tasks[c.name] = task
        log.info("added task %s (%s, %s)", c.name, c.regime, c.mode)
        return task

    def dependants(self, name: str) -> list[str]:
        """Later tasks whose computation reads ``name`` (extension mode)."""
        return dependants(name, {n: t.config.sees for n, t in self.tasks.items()})

    def remove_task(self, name: str) -> TaskModule:
        if name not in self.tasks:
            raise TaskError(f"no task named {name!r}; known tasks: {self.task_names}")
        if (problem := removal_refused(name, self.dependants(name))) is not None:
            raise TaskError(problem)
        task = self.tasks[name]
        del self.tasks[name]
        # the task's own keys, and its groups' and stacks' (they re-pack)
        self._kv_cache = {k: v for k, v in self._kv_cache.items() if not k.reads(name)}
        return task

    def invalidate_cache(self) -> None:
        """Forget cached memory K/V. Needed after parameters were written behind autograd's version counters (a
        CUDA-graph replay); ordinary in-place updates are detected on their own."""
        self._kv_cache.clear()
        self.generation += 1

    def compile_task_path(self, **compile_kwargs) -> "MemoryViT":
        """``torch.compile`` the per-block task computations (fused elementwise work, fewer kernels).

        Shapes are fixed per block and group, so each compiled kernel always sees the same shapes and a task's
        bits still never depend on other tasks; they do differ from the eager path's (compare like with like).
        """
        import torch._dynamo

        limit = torch._dynamo.config.cache_size_limit
        torch._dynamo.config.cache_size_limit = max(limit, 4 * self.depth)  # one specialisation per block
        self._group_block = torch.compile(group_block, dynamic=False, **compile_kwargs)
        self._task_block = torch.compile(task_block, dynamic=False, **compile_kwargs)
        return self

    # ------------------------------------------------------------------ training support
    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """Make ``name``'s parameters (and only those) require grad; return them for the optimizer."""
        if name not in self.tasks:
            raise TaskError(f"no task named {name!r}; known tasks: {self.task_names}")
        for p in self.parameters():
            p.requires_grad_(False)
        params = list(self.tasks[name].parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # ------------------------------------------------------------------ forward
    def _closure(self, names: Sequence[str]) -> list[str]:
        """``names`` plus the earlier tasks they read, in insertion order."""
        want = set(names)
        for n in list(names):
            want.update(self.tasks[n].config.sees)
        return [n for n in self.tasks if n in want]

    def plan(self) -> list[Unit]:
        """Execution units in order: a fixed-capacity ``group`` (``group_size`` names, ``None`` for empty
        slots) for concatenation-mode token tasks of the same shape, or a single ``task`` for any other.

        Slots are filled in insertion order, so an existing task never moves when tasks are added; only a
        removal re-packs later tasks (each slot's result does not depend on its position). Groups are for
        inference: while one of a group's tasks trains, the requested tasks run on the per-task path (same
        function, other kernels, so equal to float tolerance, not bit for bit)."""
        units: list[tuple[str, list[str | None]]] = []
        open_groups: dict[tuple, list[str | None]] = {}
        for name, task in self.tasks.items():
            c = task.config
            if c.has_tokens and c.mode == "concatenation" and not c.fork_layers:
                sig = c.group_shape
                group = open_groups.get(sig)
                if group is None or None not in group:
                    group = [None] * self.group_size
                    open_groups[sig] = group
                    units.append(("group", group))
                group[group.index(None)] = name
            else:
                units.append(("task", [name]))
        return [Unit(kind, tuple(names)) for kind, names in units]

    def _units(self, wanted: set[str]) -> list[tuple[Unit, list[TaskModule]]]:
        """The plan's units that hold a wanted task, each with its tasks."""
        return [(u, [self.tasks[n] for n in u.names if n is not None]) for u in self.plan()
                if wanted.intersection(u.names)]

    @staticmethod
    def _trains(members: Sequence[TaskModule]) -> bool:
        """Whether this call trains one of a unit's tasks (a group then runs them on the per-task path)."""
        return torch.is_grad_enabled() and any(p.requires_grad for t in members for p in t.parameters())

    def _kv_in_place(self, device: torch.device, units: Sequence[tuple[Unit, list[TaskModule]]]) -> bool:
        """Whether the backbone's K/V may stay views of timm's qkv output: when the fused kernels read every one
        of them (in place, any stride: groups, and the per-task path where :func:`fused_task_attention` holds).
        The PyTorch expression (CPU, or a compiled per-task path) wants one contiguous copy
        per layer, shared by every task, not a copy per task inside each matmul. ``units``: the plan's units this
        call runs, each with its tasks."""
        if not use_triton(device):
            return False
        if self._task_block is task_block and fused_task_attention(device):
            return True
        return all(unit.kind == "group" and not self._trains(members)
                   for unit, members in units if any(t.config.has_tokens for t in members))

    def embed(self, x: torch.Tensor, backbone: VisionTransformer | None = None) -> torch.Tensor:
        """Block-0 input tokens ``(B, N, D)`` through timm's own embedding steps."""
        bb = backbone or self.backbone
        return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))

    def forward(
        self,
        x: torch.Tensor,
        tasks: Sequence[str] | None = None,
        *,
        original: bool = True,
    ) -> dict[str, torch.Tensor]:
        """All tasks' logits from one backbone pass.

        Args:
            x: Images ``(B, 3, H, W)``, normalised as the backbone expects.
            tasks: Which tasks to return (default all). Earlier tasks an extension task reads are computed too.
            original: Also return the backbone's own head output under ``"original"``.
        """
        names = self.task_names if tasks is None else list(tasks)
        names_wanted = set(names)
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise TaskError(f"unknown tasks {unknown}; known tasks: {self.task_names}")
        needed = self._closure(names)
        shared = [n for n in needed if self.tasks[n].config.preserving]
        wanted = set(needed)
        units = self._units(wanted)
        out: dict[str, torch.Tensor] = {}
        bb = self.backbone
        backbone_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        pre_logits = None
        forks = {self.depth - self.tasks[n].config.fork_layers for n in shared if self.tasks[n].config.fork_layers}
        block_inputs: dict[int, torch.Tensor] = {}
        in_place = self._kv_in_place(x.device, units)  # here: it asks whether grad is on, off in the block below
        if original or shared:
            # Patches never attend to task tokens, so the shared backbone needs no autograd graph at all.
            with torch.no_grad(), capture_qkv(bb) as qkv, capture_block_inputs(bb, forks) as block_inputs:
                feats = bb.forward_features(x)
                if original:
                    out[ORIGINAL] = bb.forward_head(feats)
                if any(self.tasks[n].config.spec.path == "head" for n in shared):
                    pre_logits = bb.forward_head(feats, pre_logits=True)
                if any(self.tasks[n].config.has_tokens for n in shared):
                    for blk, t in zip(bb.blocks, qkv):
                        _, k, v = split_qkv(blk.attn, t)
                        # else one contiguous copy per layer, shared by every task (not one per task)
                        backbone_kv.append((k, v) if in_place else (k.contiguous(), v.contiguous()))
        readers = {s for n in needed for s in self.tasks[n].config.sees}
        token_kv: dict[str, list] = {}
        mem_kv: dict = {}
        stacks = self._stacks(units, x) if backbone_kv else {}
        for names in stacks.values():  # groups read nothing but the backbone: they may run first
            out.update({k: v for k, v in self._stack(names, backbone_kv, token_kv, mem_kv, readers).items()
                        if k in names_wanted})
        stacked_names = {n for group in stacks.values() for names in group for n in names}
        for unit, members in units:
            training = self._trains(members)
            if unit.kind == "group" and stacked_names.intersection(unit.names):
                continue
            if unit.kind == "group" and not training:
                results = self._group(unit.names, backbone_kv, token_kv, mem_kv, readers)
            elif unit.kind == "group":  # a task is training: run just the requested ones, no idle slots
                results = {t.name: self._token_task(t, backbone_kv, token_kv, mem_kv, t.name in readers, block_inputs)
                           for t in members if t.name in wanted}
            else:
                task = self.tasks[unit.names[0]]
                c = task.config
                if c.spec.path == "head":
                    logits = task.head(pre_logits)
                elif c.has_tokens:
                    logits = self._token_task(task, backbone_kv, token_kv, mem_kv, task.name in readers, block_inputs)
                else:
                    logits = self.separate_pass(task, x)
                results = {task.name: logits}
            out.update({k: v for k, v in results.items() if k in names_wanted})
        if stacks:  # the stacked groups ran first: back to the model's order
            out = {k: out[k] for k in (ORIGINAL, *self.tasks) if k in out}
        return out
