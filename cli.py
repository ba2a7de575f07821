"""continual-mem command line (Typer). Commands are thin: parse, call the library, render."""
from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Grow a frozen timm ViT task by task with learnable memory, never changing old outputs.",
                  no_args_is_help=True)
err = Console(stderr=True)


@app.callback()
def main() -> None:
    """continual-mem: learnable-memory continual learning on a frozen timm ViT."""


@app.command()
def cost(
    backbone: Annotated[str, typer.Option(help="timm ViT name (random weights: only shapes matter)")] = "vit_base_patch32_224",
    tasks: Annotated[int, typer.Option(min=0, help="number of masked-memory tasks to add")] = 10,
    memory: Annotated[int, typer.Option(min=1, help="memory tokens per layer")] = 5,
    classes: Annotated[int, typer.Option(min=1, help="classes per task")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Parameters and FLOPs per task and for the whole single pass (paper Table 5 style)."""
    import timm

    from continual_mem import BackboneError, MemoryViT, cost_table

    try:
        if backbone not in timm.list_models():
            raise BackboneError(f"unknown timm model {backbone!r}; try vit_base_patch32_224")
        model = MemoryViT(timm.create_model(backbone))
        for i in range(tasks):
            model.add_task(f"task{i}", classes, memory=memory)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    rows = cost_table(model)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"{backbone}, {tasks} masked-memory tasks (m={memory})")
    for col in ("task", "regime", "params", "GFLOPs/img", "x backbone", "shared pass"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["regime"], f"{r['params']:,}", f"{r['gflops']:.3f}",
                      f"{r['ratio_to_backbone']:.3f}", "yes" if r["shared_pass"] else "own pass")
    Console().print(table)


if __name__ == "__main__":
    app()
