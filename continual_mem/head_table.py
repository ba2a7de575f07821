"""Gathered heads: each row's linear head picked from a table, one batched product per head width.

A routed pass on CUDA runs heads this way (:func:`continual_mem.routed.gathered_heads`): a launch per task would
cost more than the heads' arithmetic, and a captured graph could hold only a few heads. Every task's head, padded
to :func:`~continual_mem.row_linear.head_width`, is a row of its width's table (row 0 the zero head, for rows
whose task there has another width or none); a product runs on every row of the batch, so a row's bits depend on
the batch size, the width and its own head, never on which heads its neighbours asked for or how many tasks exist.

Routed groups gather their heads from their shape's table (:mod:`continual_mem.routed`); linear-head tasks (the
``head`` path) from :func:`head_task_table`, on the backbone's pooled features.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import task_paths
from .cache_keys import KVKey
from .row_linear import head_width

HEAD_SLOTS = 4  # linear-head tasks one row of a routed graph answers per replay (each slot: a product per width)


@dataclass(frozen=True)
class HeadTable:
    """``heads``: width -> weights ``(1 + T_w, width, D)``, biases ``(1 + T_w, width)``; ``head_at``: task ->
    (width, its row in that width's table)."""

    heads: dict[int, tuple[torch.Tensor, torch.Tensor]]
    head_at: dict[str, tuple[int, int]]


def head_rows(tasks: Sequence, dim: int) -> HeadTable:
    """The tables of ``tasks``' heads (in order), each zero-padded to its width."""
    rows: dict[int, list] = {}
    head_at = {}
    for t in tasks:
        w = head_width(t.config.num_classes)
        weight = t.head.weight.new_zeros(w, dim)
        weight[:t.config.num_classes] = t.head.weight
        bias = weight.new_zeros(w)
        if t.head.bias is not None:
            bias[:t.config.num_classes] = t.head.bias
        rows.setdefault(w, [(weight.new_zeros(w, dim), bias.new_zeros(w))]).append((weight, bias))
        head_at[t.name] = (w, len(rows[w]) - 1)
    heads = {w: (torch.stack([a for a, _ in r]), torch.stack([b for _, b in r])) for w, r in rows.items()}
    return HeadTable(heads, head_at)


def gathered_product(heads: tuple[torch.Tensor, torch.Tensor], features: torch.Tensor,
                     at: torch.Tensor) -> torch.Tensor:
    """Every row's head of one width in one batched product, ``(B, width)``: row ``b`` of ``features`` ``(B, D)``
    through row ``at[b]`` of ``heads`` (weights, biases)."""
    weights, biases = heads
    return torch.baddbmm(biases[at].unsqueeze(1), features.unsqueeze(1), weights[at].transpose(1, 2)).squeeze(1)


def head_task_names(model) -> list[str]:
    """The model's linear-head tasks (the ``head`` path), in its order."""
    return [name for name in model.task_names if model.tasks[name].config.spec.path == "head"]


def head_task_table(model, local: dict) -> HeadTable | None:
    """The table of every linear-head task of ``model`` (None if it has none): built once, cached with the model's
    memory K/V (rebuilt when a head trains or changes, or a task comes or goes)."""
    names = tuple(head_task_names(model))
    if not names:
        return None
    members = [model.tasks[n] for n in names]
    params = task_paths.watched_params(model, ("heads",), names, members, lambda t: (t.head.weight, t.head.bias))
    return task_paths.cached(model, KVKey.heads(names), params,
                             lambda: head_rows(members, model.backbone.embed_dim), local)


def head_slots(routes: Sequence[Sequence[str]], table: HeadTable, capacity: int) -> dict[tuple[int, int], list[int]]:
    """Per (slot, width), each row's row in that width's table (policy, pure): row ``b``'s ``s``-th linear-head
    task (in its order) sits in slot ``s`` (0 in every other width's index). None of a row's tasks may be
    missing from ``table``; ``capacity`` caps the slots (a ``ValueError`` past it: split the row first)."""
    out: dict[tuple[int, int], list[int]] = {}
    for b, route in enumerate(routes):
        mine = row_heads(route, table)
        if len(mine) > capacity:
            raise ValueError(f"a row asks for {len(mine)} linear-head tasks, more than {capacity}; split it")
        for s, name in enumerate(mine):
            w, row = table.head_at[name]
            out.setdefault((s, w), [0] * len(routes))[b] = row
    return out


def row_heads(route: Sequence[str], table: HeadTable) -> list[str]:
    """The linear-head tasks of one row's ``route``, in its order: the ``s``-th sits in slot ``s``."""
    return [n for n in route if n in table.head_at]
