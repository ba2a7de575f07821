"""Keys of the model's cache of image-independent memory K/V: small typed values, never tuples parsed back by
position (a task named ``group`` or ``stack`` is an ordinary task name)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class KVKey:
    """Memory K/V at block ``layer`` of one task (``task``), of a fixed-capacity group's slots in order (``group``;
    ``None`` for an empty slot), of several groups of one shape stacked (``stack``; one tuple of slot names per
    group), or the tables a routed pass gathers from (``routed``: every grouped task of one shape, every layer;
    ``heads``: every linear-head task's head; ``layer`` -1)."""

    kind: Literal["task", "group", "stack", "routed", "heads"]
    names: tuple
    layer: int

    @classmethod
    def task(cls, name: str, layer: int) -> "KVKey":
        return cls("task", (name,), layer)

    @classmethod
    def group(cls, names: tuple[str | None, ...], layer: int) -> "KVKey":
        return cls("group", tuple(names), layer)

    @classmethod
    def stack(cls, groups: tuple[tuple[str | None, ...], ...], layer: int) -> "KVKey":
        return cls("stack", tuple(tuple(g) for g in groups), layer)

    @classmethod
    def routed(cls, names: tuple[str, ...]) -> "KVKey":
        return cls("routed", tuple(names), -1)

    @classmethod
    def heads(cls, names: tuple[str, ...]) -> "KVKey":
        return cls("heads", tuple(names), -1)

    @property
    def outgrown(self) -> bool:
        """Whether an added task can leave this entry unread for good: a stack, routed or heads key lists every
        group or task of a shape (or path), so a new one gives it a new key."""
        return self.kind in ("stack", "routed", "heads")

    def reads(self, name: str) -> bool:
        """Whether the cached value holds ``name``'s memory or head (it goes when that task is removed)."""
        groups = self.names if self.kind == "stack" else (self.names,)
        return any(name in g for g in groups)
