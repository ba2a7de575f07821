"""Task-agnostic answers inside a served pass (``/predict?task_agnostic=true``): one answer per image over every
task's classes, from the class statistics and the backbone's features of the same pass.

A request asks with the pseudo-task :data:`AGNOSTIC`; its image runs the backbone alone (a routed pass with no task
for it), and its answer holds one entry, ``AGNOSTIC: [task index, class index]``. The statistics score every row of
the bucket (fixed shapes, so an image's answer does not depend on its neighbours).
"""
from __future__ import annotations

import torch

from continual_mem.class_stats import combine, pooled_features
from continual_mem.forward_plan import ORIGINAL

AGNOSTIC = "@task-agnostic"


def split(asked: list[tuple[str, ...] | None]) -> tuple[list[tuple[str, ...] | None], list[bool]]:
    """Each image's tasks with a task-agnostic ask turned into "no task" (the backbone's features are all it
    needs), and which images asked (policy, pure)."""
    wants = [a is not None and AGNOSTIC in a for a in asked]
    return [() if w else a for a, w in zip(asked, wants)], wants


def routed_answers(served, x: torch.Tensor, rows: list[dict[str, torch.Tensor]],
                   wants: list[bool]) -> dict[int, torch.Tensor]:
    """For each asking row ``b``, ``(2,)`` float32 (task index, class), from the statistics' scores of every row
    of the bucket (``rows[b][ORIGINAL]``: the backbone's own output, its pooled features when it has no
    classifier, as the registry's backbones; else one more backbone pass)."""
    agnostic = served.agnostic
    feats = pooled_features(served.net, x, torch.stack([r[ORIGINAL] for r in rows]))
    task, cls = combine(agnostic, agnostic.scores(feats), mode="stats")
    return {b: torch.stack([task[b], cls[b]]).float() for b, want in enumerate(wants) if want}
