"""What the registry holds: ``tasks``, ``show``, ``verify``, ``predict``, ``stats``; bundles: ``export``, ``import``,
``remove``; and what it can hold: ``regimes``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from .app import JsonOpt, app, command, emit, out, pick_device, registry, state, table


# ----------------------------------------------------------------------------------------------- read-only
@app.command()
@command
def tasks(as_json: JsonOpt = False) -> None:
    """List the tasks in order."""
    rows = registry().tasks(name=state.model)

    def render(rs):
        def acc(r):
            return next((f"{m['accuracy']:.4f}" for m in r["metrics"] if m["split"] == "test"), "-")

        out.print(table(f"tasks of model '{state.model}'", ["#", "task", "dataset", "regime", "mode", "m", "classes",
                                                            "params", "test acc"],
                        [[r["position"], r["name"], r["dataset"], r["regime"], r["mode"], r["memory"],
                          r["num_classes"], f"{r['param_count']:,}", acc(r)] for r in rs]))

    emit(rows, as_json, render)


@app.command()
@command
def regimes(as_json: JsonOpt = False) -> None:
    """The regimes add-task knows: path, whether old outputs stay bit-exact, and what each trains."""
    from continual_mem.regimes import get_regime, regime_names

    rows = [{"regime": n, "path": (s := get_regime(n)).path, "preserving": s.preserving, "summary": s.summary}
            for n in regime_names()]
    emit(rows, as_json, lambda rs: out.print(table("regimes (--regime)", ["regime", "path", "preserving", "what"], [
        [r["regime"], r["path"], "yes" if r["preserving"] else "no", r["summary"]] for r in rs])))


@app.command()
@command
def show(task: Annotated[str, typer.Argument()], as_json: JsonOpt = False) -> None:
    """One task: config, parameters, FLOPs, metrics, verification history."""
    from continual_mem import backbone_flops, task_cost

    reg = registry()
    everything = reg.tasks(name=state.model)
    info = next((t for t in everything if t["name"] == task), None)
    if info is None:
        raise ValueError(f"no task named {task!r}; see `continual-mem tasks`")
    t0 = time.perf_counter()
    net = reg.load(state.model)
    load_s = time.perf_counter() - t0
    cost = task_cost(net, task)
    info = {**info, "config": net.tasks[task].config.to_dict(), "gflops_per_image": cost.flops / 1e9,
            "ratio_to_backbone": cost.flops / backbone_flops(net), "shared_pass": cost.shared_pass,
            "verification": [{"trigger": r["trigger"], "finished_at": r["finished_at"], "status": r["results"][task]}
                             for r in reg.verification_history(name=state.model) if task in r["results"]],
            "registry": {"tasks": len(everything), "params_bytes": sum(t["params_bytes"] for t in everything),
                         "load_seconds": load_s}}

    def render(i):
        c = i["config"]
        out.print(table(f"task {task}", ["field", "value"], [
            ["dataset", i["dataset"]], ["regime / mode", f"{c['regime']} / {c['mode']}"],
            ["memory x layers", f"{c['memory']} x {c['layers']}"], ["classes", c["num_classes"]],
            ["parameters", f"{i['param_count']:,}"],
            ["GFLOPs / image", f"{i['gflops_per_image']:.4f} ({i['ratio_to_backbone']:.3f}x backbone)"],
            ["pass", "shared" if i["shared_pass"] else "own"],
            *[[f"{m['split']} accuracy", f"{m['accuracy']:.4f}"] for m in i["metrics"]],
            *[[f"verify {v['finished_at'][:19]}", f"{v['status']} ({v['trigger']})"] for v in i["verification"]],
            ["model", f"{i['registry']['tasks']} tasks, {i['registry']['params_bytes']:,} bytes of task weights, "
                      f"loaded in {i['registry']['load_seconds']:.2f} s"]]))

    emit(info, as_json, render)


@app.command()
@command
def verify(
    task: Annotated[list[str] | None, typer.Option(help="only this task (repeatable), with the tasks it reads")] = None,
    since: Annotated[int | None, typer.Option(help="only the tasks added or imported after this model version "
                                                   "(`model_version` of an earlier `verify --json`)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="processes sharing the tasks (the same bits; for hosts with "
                                                     "cores to spare)")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the tasks on the probe batch and compare bytes with their stored references (exit 1 on any
    mismatch). Default: every task."""
    reg = registry()
    version = reg.model_version(state.model)
    report = reg.verify(name=state.model, tasks=task or None, since=since, workers=workers)
    rows = [{"task": c.name, "status": c.status, "max_abs_diff": c.max_abs_diff, "detail": c.detail}
            for c in report.tasks]
    checked = "every task" if not task and since is None else f"{len(rows)} of the tasks"
    emit({"ok": report.ok, "model_version": version, "build": report.build, "tasks": rows}, as_json,
         lambda d: out.print(table(
        f"verification: {('OK, ' + checked + ' bit-exact') if d['ok'] else 'FAILED'} (CPU float32, torch "
        f"{d['build']['torch']})", ["task", "status", "detail"],
        [[r["task"], r["status"], r["detail"]] for r in d["tasks"]])))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@command
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files (JPEG, PNG, WebP, GIF; others through PIL)")],
    top_k: Annotated[int, typer.Option(min=1)] = 3,
    device: Annotated[str, typer.Option()] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="images per pass")] = 256,
    task: Annotated[list[str] | None, typer.Option(help="only this task (repeatable): only these tasks (and the "
                                                       "earlier tasks an extension task reads) are loaded and run")]
    = None,
    task_agnostic: Annotated[bool, typer.Option(
        "--task-agnostic", help="one answer per image over every task's classes (or the --task ones'), with the "
        "task it came from; needs their class statistics")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Every task's top-k predictions for each image (or the ``--task`` ones'), all in one pass per batch (files
    decoded on every core, cropped on the device as in eval); ``--task-agnostic``: one answer per image."""
    import numpy as np
    import torch

    from scenarios.datasets import DatasetError
    from scenarios.decode import FilesReader
    from scenarios.pipeline import Preprocess
    from scenarios.streaming import DecodedImages

    for path in images:
        if not path.is_file():
            raise ValueError(f"image {path} does not exist")
    reg = registry()
    agnostic = None
    if task_agnostic:  # before any pass: a task without statistics is refused, named, with the fix
        from continual_mem.class_stats import TaskAgnostic, predict as predict_agnostic

        agnostic = TaskAgnostic(reg.class_stats(task or None, name=state.model))
    net = reg.load(state.model, tasks=task or None)
    dev = pick_device(device)
    net.to(dev).eval()
    reader = FilesReader([str(p) for p in images], np.zeros(len(images), dtype=np.int64))
    source = DecodedImages(reader, Preprocess.for_backbone(net.backbone, "inception"), dev, on_bad="fail",
                           name="predict", workers=0 if len(images) < 64 else None)
    logits: dict[str, list[torch.Tensor]] = {}
    try:
        with torch.no_grad():
            for x, _ in source.eval_batches(batch_size):
                if agnostic is not None:
                    t, c = predict_agnostic(net, agnostic, x)
                    logits.setdefault("task", []).append(t.cpu())
                    logits.setdefault("class", []).append(c.cpu())
                    continue
                for name, lg in net(x, task or None, original=False).items():
                    logits.setdefault(name, []).append(lg.float().cpu())
    except DatasetError as exc:
        raise ValueError(f"{str(exc).split('; remove')[0].removeprefix('predict: ')}; give a .jpg/.png/.webp "
                         "file") from None
    merged = {name: torch.cat(parts) for name, parts in logits.items()}
    if agnostic is not None:
        result = [{"image": str(path), "task": agnostic.tasks[int(t)], "index": int(c),
                   "class": net.tasks[agnostic.tasks[int(t)]].config.class_labels[int(c)]}
                  for path, t, c in zip(images, merged["task"].tolist(), merged["class"].tolist())]
        emit(result, as_json, lambda rs: out.print(table(
            f"task-agnostic answers over {agnostic.num_classes} classes of {len(agnostic.tasks)} tasks",
            ["image", "task", "class"], [[r["image"], r["task"], r["class"]] for r in rs])))
        return
    result = []
    for i, path in enumerate(images):
        entry = {"image": str(path), "tasks": {}}
        for name, lg in merged.items():
            probs = lg[i].softmax(-1)
            k = min(top_k, probs.numel())
            p, idx = probs.topk(k)
            names = net.tasks[name].config.class_labels
            entry["tasks"][name] = [{"class": names[j], "index": int(j), "prob": float(q)}
                                    for q, j in zip(p.tolist(), idx.tolist())]
        result.append(entry)
    emit(result, as_json, lambda rs: [out.print(table(
        str(r["image"]), ["task", "top predictions"],
        [[t, ", ".join(f"{c['class']} ({c['prob']:.2f})" for c in cs)] for t, cs in r["tasks"].items()]))
        for r in rs])


@app.command()
@command
def stats(
    task: Annotated[str, typer.Argument(help="a task that has no class statistics yet")],
    device: Annotated[str, typer.Option()] = "auto",
    data_root: Annotated[str, typer.Option(help="folder of torchvision datasets")] = "data",
    max_train: Annotated[int | None, typer.Option(help="cap training images (stratified), as add-task did")] = None,
    seed: Annotated[int, typer.Option(help="the seed add-task used (its held-out split)")] = 0,
) -> None:
    """Compute and store TASK's class statistics from its recorded dataset's training split (once: they never
    change). Tasks added by ``add-task`` have them already."""
    from scenarios.agnostic import stats_on_dataset
    from scenarios.task_recipe import TaskRecipe

    reg = registry()
    row = {t["name"]: t for t in reg.tasks(name=state.model)}.get(task)
    if row is None:
        raise ValueError(f"no task named {task!r}; see `continual-mem tasks`")
    if row["class_stats"]:
        raise ValueError(f"task {task!r} already has class statistics; they are written once and never change")
    if not row["dataset"]:
        raise ValueError(f"task {task!r} records no dataset; compute its statistics from Python "
                         "(continual_mem.class_stats.collect) and store them with Registry.set_class_stats")
    net = reg.load(state.model, tasks=[])  # the statistics read the backbone only
    dev = pick_device(device)
    stats_ = stats_on_dataset(net.to(dev), task, row["dataset"], TaskRecipe(data_root=data_root, seed=seed,
                                                                             max_train=max_train), device=dev)
    reg.set_class_stats(task, stats_, name=state.model)
    out.print(f"stored class statistics of task {task} ({stats_.num_classes} classes, "
              f"{int(stats_.counts.sum())} images)")


# ----------------------------------------------------------------------------------------------- bundles
@app.command("export")
@command
def export(task: Annotated[str, typer.Argument()], file: Annotated[Path, typer.Argument()]) -> None:
    """Write TASK as a bundle (safetensors + JSON config + backbone fingerprint), and its class statistics beside
    it (FILE with suffix .stats.safetensors), which `import` reads back."""
    reg = registry()
    data = reg.export_bundle(task, file, name=state.model)
    extra = ""
    if task in reg.tasks_with_class_stats(name=state.model):
        path = _stats_path(file)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(reg.class_stats([task], name=state.model)[0].to_bytes())
        tmp.replace(path)
        extra = f" and its class statistics to {path}"
    out.print(f"exported {task} to {file} ({len(data):,} bytes){extra}")


def _stats_path(bundle: Path) -> Path:
    """Where a bundle's class statistics travel: beside it, ``NAME.stats.safetensors``."""
    return bundle.with_name(bundle.name.removesuffix(".safetensors") + ".stats.safetensors")


@app.command("import")
@command
def import_(files: Annotated[list[Path], typer.Argument(help="one or more task bundles, in order")]) -> None:
    """Attach task bundles in one change and one verification (refuses another backbone, a duplicate name or a
    corrupted file; then nothing is stored)."""
    from continual_mem.class_stats import ClassStats

    stats = [ClassStats.from_bytes(p.read_bytes(), source=str(p)) for p in map(_stats_path, files) if p.is_file()]
    report = registry().import_bundles(files, name=state.model, class_stats=stats)
    new = [c.name for c in report.tasks if c.status == "new"]
    older = [c for c in report.tasks if c.status != "new"]
    shown = ", ".join(f"{c.name} {c.status}" for c in older[:20]) + (f" and {len(older) - 20} more" if len(older) > 20
                                                                     else "")
    out.print(f"imported {', '.join(new[:20])}{f' and {len(new) - 20} more' if len(new) > 20 else ''}; older "
              f"tasks: {shown or 'none'}")


@app.command()
@command
def remove(task: Annotated[str, typer.Argument()]) -> None:
    """Remove TASK (refused if a later extension-mode task attends to it)."""
    report = registry().remove_task(task, name=state.model)
    out.print(f"removed {task}; remaining: {', '.join(f'{c.name} {c.status}' for c in report.tasks) or 'none'}")


