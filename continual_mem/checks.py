"""The rules a task must meet to join or leave a model, as pure functions over names and configs. The model, a
bundle import, the registry and the CLI all ask here, and each raises its own error type with the message."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from .config import TaskConfig


def name_taken(name: str, existing: Iterable[str], *, owner: str = "the model",
               fix: str = "choose another name or remove it first") -> str | None:
    """The message if ``name`` is already one of ``existing`` tasks, else None."""
    return f"{owner} already has a task named {name!r}; {fix}" if name in set(existing) else None


def extension_mismatch(config: TaskConfig, token_tasks: Sequence[str], *, owner: str = "this model",
                       fix: str = "attach it to a model with exactly those earlier tasks") -> str | None:
    """The message if an extension task was trained on top of other token tasks than ``token_tasks`` (the
    model's, in order), else None: it reads them, so it only joins a model with exactly those."""
    if config.mode != "extension" or list(config.sees) == list(token_tasks):
        return None
    return (f"extension task {config.name!r} was trained on top of tasks {list(config.sees)}, but {owner} has "
            f"token tasks {list(token_tasks)}; {fix}")


def dependants(name: str, sees: Mapping[str, Sequence[str]]) -> list[str]:
    """The tasks whose computation reads ``name`` (``sees``: each task's earlier tasks it attends to)."""
    return [other for other, seen in sees.items() if name in seen]


def removal_refused(name: str, readers: Sequence[str]) -> str | None:
    """The message if extension tasks ``readers`` attend to ``name``, else None."""
    return f"cannot remove {name!r}: extension tasks {list(readers)} attend to it; remove them first" if readers \
        else None
