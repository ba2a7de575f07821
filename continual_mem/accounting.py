"""Parameter and FLOP accounting from the model's shapes (paper Table 5 style); the counting rules are in
:mod:`continual_mem.flops`, each regime's count in its module."""
from __future__ import annotations

from dataclasses import dataclass

from .flops import backbone_flops
from .model import MemoryViT
from .task import TaskModule

__all__ = ["Cost", "backbone_flops", "cost_table", "task_cost"]


@dataclass(frozen=True)
class Cost:
    """Cost of one task (or the backbone).

    Attributes:
        params: Parameters the task adds.
        flops: Incremental FLOPs per image.
        batch_flops: FLOPs per forward independent of the batch size (memory keys/values).
        shared_pass: Whether the task rides in the shared single pass.
    """

    name: str
    regime: str
    params: int
    flops: int
    batch_flops: int
    shared_pass: bool


def task_cost(model: MemoryViT, name: str) -> Cost:
    """A task's added parameters and FLOPs; the count is its regime's (``RegimeSpec.flops``)."""
    task: TaskModule = model.tasks[name]
    c = task.config
    flops, batch = c.spec.flops(model, task)
    return Cost(name, c.regime, sum(p.numel() for p in task.parameters()), flops, batch, c.preserving)


def cost_table(model: MemoryViT) -> list[dict]:
    """Rows for every task plus the backbone, the empty slots of task groups (computed all the same, so that
    a group's shapes never change) and the whole multi-task pass."""
    base = backbone_flops(model)
    rows = [{"name": "backbone", "regime": "frozen", "params": sum(p.numel() for p in model.backbone.parameters()),
             "gflops": base / 1e9, "ratio_to_backbone": 1.0, "shared_pass": True}]
    total = base
    for name in model.task_names:
        cost = task_cost(model, name)
        total += cost.flops
        rows.append({"name": name, "regime": cost.regime, "params": cost.params, "gflops": cost.flops / 1e9,
                     "ratio_to_backbone": cost.flops / base, "shared_pass": cost.shared_pass})
    empty = [(u, u.names.count(None)) for u in model.plan() if u.kind == "group" and None in u.names]
    if empty:
        flops = 0
        for unit, count in empty:
            member = next(n for n in unit.names if n)  # every slot of a group has this shape; empty ones no head
            head = model.tasks[member].head
            flops += count * (task_cost(model, member).flops - 2 * head.in_features * head.out_features)
        total += flops
        rows.append({"name": f"empty group slots ({sum(c for _, c in empty)})", "regime": "-", "params": 0,
                     "gflops": flops / 1e9, "ratio_to_backbone": flops / base, "shared_pass": True})
    rows.append({"name": "all tasks, one call", "regime": "-", "params": sum(r["params"] for r in rows),
                 "gflops": total / 1e9, "ratio_to_backbone": total / base, "shared_pass": True})
    return rows
