"""Attention policy (paper Table 1) as pure functions.

Who may attend to whom is decided here and nowhere else; layers only apply a mask or a key layout that this
module describes. Tokens are identified by kind and owning task index (insertion order, 0-based).

Policy:
  * backbone tokens (original CLS, registers, patches) attend to backbone tokens only;
  * task j's tokens attend to backbone tokens, task j's tokens and task j's memory;
  * in extension mode task j also attends to the tokens and memory of the earlier tasks it sees
    (all earlier token tasks when it was added);
  * late fork: from its fork layer on, task j owns a private copy of the patches (kind ``private``); its tokens
    and that copy attend to each other and to task j's memory only, never to the shared backbone tokens;
  * memory is never a query: its row only lets it see itself so a full-sequence softmax stays finite, and its
    output is dropped by the caller.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

TokenKind = Literal["backbone", "task", "memory", "private"]


@dataclass(frozen=True)
class TokenSpec:
    """One position of a sequence: its kind and, for task tokens and memory, the owning task index."""

    kind: TokenKind
    task: int = -1


def visible_tasks(task: int, modes: Sequence[str]) -> tuple[int, ...]:
    """Indices of the tasks whose tokens and memory ``task`` attends to (itself included).

    Args:
        task: Index of the querying task.
        modes: Mode of every token task, in insertion order (``concatenation`` or ``extension``).
    """
    if not 0 <= task < len(modes):
        raise ValueError(f"task index {task} out of range for {len(modes)} tasks")
    if modes[task] == "extension":
        return tuple(range(task + 1))
    if modes[task] == "concatenation":
        return (task,)
    raise ValueError(f"unknown mode {modes[task]!r}")


def may_attend(query: TokenSpec, key: TokenSpec, modes: Sequence[str], forked: frozenset[int] = frozenset()) -> bool:
    """One cell of Table 1 (extended by the late fork).

    Args:
        query: The attending token.
        key: The attended token.
        modes: Mode of every token task, in insertion order.
        forked: Tasks whose private branch is active at this layer (late fork).
    """
    if query.kind == "backbone":
        return key.kind == "backbone"
    if query.kind == "memory":
        return key == query
    if query.kind == "private" or query.task in forked:  # inside a private branch: only the task's own tokens
        return key.kind in ("task", "private", "memory") and key.task == query.task
    if key.kind == "backbone":
        return True
    if key.kind == "private":
        return False
    return key.task in visible_tasks(query.task, modes)


def build_attention_mask(
    layout: Sequence[TokenSpec], modes: Sequence[str], forked: frozenset[int] = frozenset()
) -> torch.Tensor:
    """Boolean mask (True = may attend), shape ``(len(layout), len(layout))``, rows are queries."""
    for tok in layout:
        if tok.kind != "backbone" and not 0 <= tok.task < len(modes):
            raise ValueError(f"token {tok} names a task outside 0..{len(modes) - 1}")
    for j in forked:
        if modes[j] != "concatenation":
            raise ValueError(f"task {j} is forked but in {modes[j]} mode; a late fork needs concatenation mode")
    n = len(layout)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, q in enumerate(layout):
        for j, k in enumerate(layout):
            mask[i, j] = may_attend(q, k, modes, forked)
    return mask
