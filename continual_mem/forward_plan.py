"""The multi-task forward as a typed plan: which task runs on which path, decided once per call.

:func:`make_plan` makes every path decision of a call in one place (as timm's ``use_fused_attn()`` does for its
attention): whether the Triton kernels run, whether the per-task path uses the fused attention, whether inference
groups of one shape run stacked, and whether the backbone's K/V stay views of timm's qkv output. The plan's units
each have a ``run`` that computes their tasks' logits from what the shared backbone pass left in
:class:`PassState`. Which kernels run decides the bits, so a task's bits are a function of the plan's decisions
and its own unit, never of the other units.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import stacked, task_paths
from .backbone import capture_block_inputs, capture_qkv, split_qkv
from .kernels import fused_task_attention, use_triton
from .layers import group_block, task_block

ORIGINAL = "original"  # key of the backbone's own head in every output dict


@dataclass(frozen=True)
class Paths:
    """Every path decision of one forward call.

    Attributes:
        triton: The Triton kernels run (:func:`~continual_mem.kernels.use_triton`: CUDA, or the interpreter when
            asked); else the PyTorch expressions.
        fused_task: The per-task path's attention is the fused Triton kernel, forward and backward (not when the
            per-task path is compiled: it traces the PyTorch expression). Tasks beyond one kernel program's tiles
            take the PyTorch expression (:data:`~continual_mem.kernels.MAX_QUERIES`).
        stacked: Inference groups of one shape run stacked, one set of launches per block
            (:func:`~continual_mem.stacked.supported`, the model's ``stack_groups``, an uncompiled group path).
        kv_in_place: The backbone's K/V stay views of timm's qkv output: when the fused kernels read every one of
            them (groups, and the per-task path when fused). The PyTorch expression wants one contiguous copy per
            layer, shared by every task.
    """

    triton: bool
    fused_task: bool
    stacked: bool
    kv_in_place: bool


@dataclass
class PassState:
    """What the shared backbone pass computed for one call, read by every unit."""

    x: torch.Tensor
    paths: Paths
    backbone_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    pre_logits: torch.Tensor | None = None
    features: torch.Tensor | None = None  # the backbone's final normed states (forward_features)
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    token_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    mem_kv: dict = field(default_factory=dict)
    readers: frozenset[str] = frozenset()  # tasks whose token K/V later extension tasks read


@dataclass(frozen=True)
class HeadUnit:
    """A ``head`` task: its linear head on the backbone's pooled features."""

    name: str

    def run(self, model, state: PassState) -> dict[str, torch.Tensor]:
        return {self.name: model.tasks[self.name].head(state.pre_logits)}


@dataclass(frozen=True)
class TokenUnit:
    """A token task on the per-task path (extension mode, late forks, and any task while it trains)."""

    name: str

    def run(self, model, state: PassState) -> dict[str, torch.Tensor]:
        return {self.name: task_paths.token_task(model, model.tasks[self.name], state)}


@dataclass(frozen=True)
class GroupUnit:
    """A fixed-capacity group of concatenation-mode token tasks (``None``: an empty slot), one set of kernels per
    block."""

    names: tuple[str | None, ...]

    def run(self, model, state: PassState) -> dict[str, torch.Tensor]:
        return task_paths.run_group(model, self.names, state)


@dataclass(frozen=True)
class StackUnit:
    """Every inference group of one shape, stacked (:mod:`continual_mem.stacked`)."""

    groups: tuple[tuple[str | None, ...], ...]

    def run(self, model, state: PassState) -> dict[str, torch.Tensor]:
        return task_paths.run_stack(model, list(self.groups), state)


@dataclass(frozen=True)
class SideUnit:
    """A side network (``side`` path): it reads the shared pass's states and writes nothing back."""

    name: str

    def run(self, model, state: PassState) -> dict[str, torch.Tensor]:
        task = model.tasks[self.name]
        return {self.name: task.config.spec.side_pass(model, task, state)}


@dataclass(frozen=True)
class OwnUnit:
    """A non-preserving task: a pass of its own (its regime's ``own_pass``)."""

    name: str

    def run(self, model, state: PassState) -> dict[str, torch.Tensor]:
        return {self.name: model.separate_pass(model.tasks[self.name], state.x)}


Unit = HeadUnit | TokenUnit | GroupUnit | StackUnit | SideUnit | OwnUnit


@dataclass(frozen=True)
class ForwardPlan:
    """One call's units in the order they run (stacks first: they read nothing but the backbone) and its paths.

    Attributes:
        units: What runs.
        paths: The call's path decisions.
        shared: The call runs the shared backbone pass (the original head or a preserving task is asked for).
        head_features: Some unit reads the backbone's pooled features.
        token_kv: Some unit reads the backbone's K/V.
        forks: Blocks whose inputs late-fork branches start from, or side networks read (every block).
        readers: Tasks whose token K/V later extension tasks read.
        reordered: Units run out of the model's order (stacks): outputs are put back in it.
    """

    units: tuple[Unit, ...]
    paths: Paths
    shared: bool
    head_features: bool
    token_kv: bool
    forks: frozenset[int]
    readers: frozenset[str]
    reordered: bool


def trains(members: Sequence) -> bool:
    """Whether this call trains one of a unit's tasks (a group then runs them on the per-task path)."""
    return torch.is_grad_enabled() and any(p.requires_grad for t in members for p in t.parameters())


def make_plan(model, needed: Sequence[str], *, original: bool, device: torch.device) -> ForwardPlan:
    """The plan of one call: ``needed`` are the tasks to compute (the wanted ones and the earlier tasks they
    read), in the model's order. Reads whether grad is on, so it is made outside the backbone's no-grad block."""
    needed_set = set(needed)
    packed = []  # (unit, its tasks, whether this call trains one of them): each asked once
    for u in model.plan():
        if needed_set.intersection(u.names):
            members = [model.tasks[n] for n in u.names if n is not None]
            packed.append((u, members, trains(members)))
    triton = use_triton(device)
    compiled_task = model.task_block is not task_block  # compile_task_path() swapped it
    fused_task = not compiled_task and fused_task_attention(device)
    kv_in_place = triton and (fused_task or all(u.kind == "group" and not training for u, m, training in packed
                                                 if any(t.config.has_tokens for t in m)))
    shared = [model.tasks[n] for n in needed if model.tasks[n].config.preserving]
    token_kv = any(t.config.has_tokens for t in shared)
    inference_groups = [m for u, m, training in packed if u.kind == "group" and not training]
    stack = (triton and token_kv and bool(inference_groups) and model.stack_groups and model.group_block is group_block
             and stacked.supported(model.backbone, inference_groups[0][0].tokens.dtype, device))
    stacks: dict[tuple, list] = {}
    units: list[Unit] = []
    for unit, members, training in packed:
        if unit.kind == "group" and stack and not training:
            stacks.setdefault(members[0].config.group_shape, []).append(unit.names)
        elif unit.kind == "group" and not training:
            units.append(GroupUnit(unit.names))
        elif unit.kind == "group":  # a task is training: run just the requested ones, no idle slots
            units += [TokenUnit(t.name) for t in members if t.name in needed_set]
        else:
            task = members[0]
            path = task.config.spec.path
            kind = {"head": HeadUnit, "token": TokenUnit, "side": SideUnit}.get(path, OwnUnit)
            units.append(kind(task.name))
    stack_units = [StackUnit(tuple(groups)) for groups in stacks.values()]
    return ForwardPlan(
        units=tuple(stack_units + units),
        paths=Paths(triton=triton, fused_task=fused_task, stacked=bool(stack_units), kv_in_place=kv_in_place),
        shared=original or bool(shared),
        head_features=any(t.config.spec.path in ("head", "side") for t in shared),
        token_kv=token_kv,
        forks=frozenset(range(model.depth)) if any(t.config.spec.path == "side" for t in shared) else
        frozenset(model.depth - t.config.fork_layers for t in shared if t.config.fork_layers),
        readers=frozenset(s for n in needed for s in model.tasks[n].config.sees),
        reordered=bool(stack_units),
    )


def backbone_pass(model, plan: ForwardPlan, state: PassState, *, original: bool) -> dict[str, torch.Tensor]:
    """The shared backbone pass through timm's own code, without an autograd graph (patches never attend to task
    tokens): it fills ``state`` (features, pooled features, each block's K/V, the blocks' inputs forks read) and
    returns the original head's output when asked. K/V stay views of timm's qkv output where the plan reads them
    in place, else one contiguous copy per layer, shared by every task (not one per task)."""
    out: dict[str, torch.Tensor] = {}
    bb = model.backbone
    with torch.no_grad(), capture_qkv(bb) as qkv, capture_block_inputs(bb, plan.forks) as block_inputs:
        state.features = bb.forward_features(state.x)
        if original:
            out[ORIGINAL] = bb.forward_head(state.features)
        if plan.head_features:
            state.pre_logits = bb.forward_head(state.features, pre_logits=True)
        if plan.token_kv:
            for blk, t in zip(bb.blocks, qkv):
                _, k, v = split_qkv(blk.attn, t)
                state.backbone_kv.append((k, v) if plan.paths.kv_in_place else (k.contiguous(), v.contiguous()))
    state.block_inputs = block_inputs
    return out
