"""Task-agnostic answers inside a served pass (``/predict?task_agnostic=true``): one answer per image over every
task's classes, from the backbone's features in the same pass and every task's logits.

A request asks with the pseudo-task :data:`AGNOSTIC`; its image runs every task (as a request without ``tasks=``
does), and its answer gets one more entry, ``AGNOSTIC: [task index, class index]``. The statistics' scores are
computed for every row of the bucket (fixed shapes, so an image's choice does not depend on its neighbours).
"""
from __future__ import annotations

import torch

from continual_mem.class_stats import backbone_features, combine
from continual_mem.forward_plan import ORIGINAL

AGNOSTIC = "@task-agnostic"


def split(asked: list[tuple[str, ...] | None]) -> tuple[list[tuple[str, ...] | None], list[bool]]:
    """Each image's tasks with a task-agnostic ask turned into "every task", and which images asked (policy, pure)."""
    wants = [a is not None and AGNOSTIC in a for a in asked]
    return [None if w else a for a, w in zip(asked, wants)], wants


def features(served, x: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features of the pass: its own output when it has no classifier (the registry's
    backbones), else one more backbone pass."""
    return original if served.net.backbone.num_classes == 0 else backbone_features(served.net, x)


def all_task_answers(served, x: torch.Tensor, out: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 2)`` float32: each row's (task index, class) from an all-task pass's outputs (``ORIGINAL`` included)."""
    agnostic = served.agnostic
    scores = agnostic.scores(features(served, x, out[ORIGINAL]))
    task, cls = combine(agnostic, scores, {n: out[n] for n in agnostic.tasks}, mode="head")
    return torch.stack([task, cls], 1).float()


def routed_answers(served, x: torch.Tensor, rows: list[dict[str, torch.Tensor]],
                   wants: list[bool]) -> dict[int, torch.Tensor]:
    """For each asking row ``b``, ``(2,)`` float32 (task index, class): the statistics score every row of the
    bucket (``rows[b][ORIGINAL]``), the chosen task's own logits (the row ran every task) pick the class."""
    agnostic = served.agnostic
    scores = agnostic.scores(features(served, x, torch.stack([r[ORIGINAL] for r in rows])))
    task = agnostic.task_of(scores.argmax(1))
    out = {}
    for b, want in enumerate(wants):
        if want:
            name = agnostic.tasks[int(task[b])]
            out[b] = torch.stack([task[b].float(), rows[b][name].argmax().float()])
    return out
