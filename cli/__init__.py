"""continual-mem command line (Typer), one module per command group; ``app`` is the entry point."""
from . import data, records, serving, studies, tasks  # noqa: F401 - registers the commands
from .app import app

__all__ = ["app"]
