"""MemoryViT: a frozen timm ViT that grows one task at a time and runs every task in one pass."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from . import branches, paging, routed
from .backbone import fingerprint, freeze, validate_backbone
from .cache_keys import KVKey
from .checks import dependants, extension_mismatch, name_taken, removal_refused
from .config import TaskConfig, parse_layers
from .forward_plan import ORIGINAL, ForwardPlan, PassState, backbone_pass, make_plan
from .layers import group_block, task_block
from .masking import visible_tasks
from .regimes import get_regime
from .task import TaskModule

log = logging.getLogger(__name__)

DEFAULT_SIZE = 5  # memory per layer, input memory and adapter width when a regime has them and none is given


class Unit(NamedTuple):
    """One step of the multi-task forward: a task ``group`` (fixed capacity) or a single ``task``."""

    kind: str
    names: tuple[str | None, ...]


class TaskError(ValueError):
    """A task operation cannot be done (duplicate name, unknown task, dependants, incompatible state)."""


class MemoryViT(nn.Module):
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
        resident_tasks: Routed passes of fine-tuned late forks hold at most this many tasks of one family on the
            device, paged in by use, least recently used out (:mod:`continual_mem.paging`); None (default): all.
    """

    def __init__(self, backbone: VisionTransformer, *, group_size: int = 4) -> None:
        super().__init__()
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.backbone = freeze(validate_backbone(backbone))
        self.group_block = group_block  # swapped for compiled versions by compile_task_path()
        self.task_block = task_block
        self.tasks = nn.ModuleDict()
        self.kv_cache: dict[KVKey, tuple] = {}  # image-independent memory K/V (task_paths.cached)
        self._fingerprint: str | None = None
        self.generation = 0  # bumped by invalidate_cache(): writes that version counters do not see
        self.stack_groups = True
        self.resident_tasks: int | None = None
        self._tasks_version = 0  # bumped by attach / remove_task: the packing cache's key
        self._packing: tuple | None = None

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
        forked = [s for s in c.sees if self.tasks[s].config.fork_layers] if all(s in self.tasks for s in c.sees) \
            else []
        if forked:
            raise TaskError(
                f"extension task {c.name!r} would read late-fork tasks {forked}, whose tokens live in private "
                "branches; use concatenation mode, or add the extension task to a model without late-fork tasks"
            )
        if c.mode == "extension" and (problem := extension_mismatch(c, self.token_task_names)) is not None:
            raise TaskError(problem)
        self.tasks[c.name] = task
        self._tasks_version += 1
        # entries listing a whole shape would stay cached, never read again, at every addition
        self.kv_cache = {k: v for k, v in self.kv_cache.items() if not k.outgrown}
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
        self._tasks_version += 1
        # the task's own keys, and its groups' and stacks' (they re-pack)
        self.kv_cache = {k: v for k, v in self.kv_cache.items() if not k.reads(name)}
        return task

    def invalidate_cache(self) -> None:
        """Forget cached memory K/V. Needed after parameters were written behind autograd's version counters (a
        CUDA-graph replay); ordinary in-place updates are detected on their own."""
        self.kv_cache.clear()
        self.generation += 1

    def compile_task_path(self, **compile_kwargs) -> "MemoryViT":
        """``torch.compile`` the per-block task computations (fused elementwise work, fewer kernels).

        Shapes are fixed per block and group, so each compiled kernel always sees the same shapes and a task's
        bits still never depend on other tasks; they do differ from the eager path's (compare like with like).
        """
        import torch._dynamo

        limit = torch._dynamo.config.cache_size_limit
        torch._dynamo.config.cache_size_limit = max(limit, 4 * self.depth)  # one specialisation per block
        self.group_block = torch.compile(group_block, dynamic=False, **compile_kwargs)
        self.task_block = torch.compile(task_block, dynamic=False, **compile_kwargs)
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
    def closure(self, names: Sequence[str]) -> list[str]:
        """``names`` plus the earlier tasks they read, in insertion order."""
        want = set(names)
        for n in list(names):
            want.update(self.tasks[n].config.sees)
        return [n for n in self.tasks if n in want]

    def plan(self) -> list[Unit]:
        """The packing (:meth:`forward_plan` adds a call's paths): a fixed-capacity ``group`` (``group_size``
        names, ``None`` for empty slots) for concatenation-mode token tasks of the same shape, or a single ``task``
        for any other.

        Slots are filled in insertion order, so an existing task never moves when tasks are added; only a
        removal re-packs later tasks (each slot's result does not depend on its position). Groups are for
        inference: while one of a group's tasks trains, the requested tasks run on the per-task path (same
        function, other kernels, so equal to float tolerance, not bit for bit)."""
        key = (self.group_size, self._tasks_version, tuple(self.tasks))  # names too: a ModuleDict edited by hand
        if self._packing is None or self._packing[0] != key:
            self._packing = (key, self._pack())
        return list(self._packing[1])

    def _pack(self) -> list[Unit]:
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

    def forward_plan(self, names: Sequence[str] | None = None, *, original: bool = True,
                     device: torch.device | str = "cpu") -> ForwardPlan:
        """The plan a forward of ``names`` (default all) on ``device`` would run, with every path decision
        (:func:`~continual_mem.forward_plan.make_plan`). Whether grad is on counts (training runs per task)."""
        names = self.task_names if names is None else list(names)
        return make_plan(self, self.closure(names), original=original, device=torch.device(device))

    def private_stream(self, task: TaskModule, hidden: torch.Tensor) -> torch.Tensor:
        """A late-fork task's private stream from the states entering its fork block
        (:func:`~continual_mem.branches.private_stream`)."""
        return branches.private_stream(self, task, hidden)

    def separate_pass(self, task: TaskModule, x: torch.Tensor) -> torch.Tensor:
        """Logits of a non-preserving task, from a pass of its own: its regime's (``RegimeSpec.own_pass``)."""
        return task.config.spec.own_pass(self, task, x)

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
        needed = self.closure(names)
        if paged := paging.paged_names(self.tasks[n] for n in needed):
            raise TaskError(f"tasks {paged} are paged to host memory: they run in routed passes "
                            "(forward_routed, the server's ?tasks=); ask for the others by name")
        plan = make_plan(self, needed, original=original, device=x.device)
        state = PassState(x, plan.paths, readers=plan.readers)
        out = backbone_pass(self, plan, state, original=original) if plan.shared else {}
        for unit in plan.units:
            out.update({k: v for k, v in unit.run(self, state).items() if k in names_wanted})
        if plan.reordered:  # the stacked groups ran first: back to the model's order
            out = {k: out[k] for k in (ORIGINAL, *self.tasks) if k in out}
        return out

    def forward_routed(self, x: torch.Tensor, routes: Sequence[Sequence[str]], *, original: bool = False,
                       tile: int = 1) -> list[dict[str, torch.Tensor]]:
        """Each image computes only its own tasks (inference; :mod:`continual_mem.routed`).

        Args:
            x: Images ``(B, 3, H, W)``.
            routes: ``B`` lists of task names: row ``b`` gets the logits of ``routes[b]``.
            original: Also give every row the backbone's own head output under ``"original"``.
            tile: Rows per tile of a per-task unit (late forks, side networks, own passes): part of a routed
                answer's identity on devices whose kernels depend on the batch size.

        Returns:
            Per row, ``{task: logits (classes,)}`` in the row's order.
        """
        unknown = sorted({n for r in routes for n in r} - set(self.tasks))
        if unknown:
            raise TaskError(f"unknown tasks {unknown}; known tasks: {self.task_names}")
        return routed.routed_forward(self, x, routes, original=original, tile=tile)
