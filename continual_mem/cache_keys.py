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
    ``layer`` -1)."""

    kind: Literal["task", "group", "stack", "routed"]
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

    @property
    def outgrown(self) -> bool:
        """Whether an added task can leave this entry unread for good: a stack or routed key lists every group or
        task of a shape, so a new task of that shape gives the shape a new key."""
        return self.kind in ("stack", "routed")

    def reads(self, name: str) -> bool:
        """Whether the cached value holds ``name``'s memory (it goes when that task is removed)."""
        groups = self.names if self.kind == "stack" else (self.names,)
        return any(name in g for g in groups)
