"""Accuracy against learning rate per regime (the paper's Fig. 4) from ``accuracy_tables.py`` results.

Every run of the learning-rate sweep (the first seed of each configuration, every rate of its grid) gives a
held-out point (dashed) and a test point (solid); one PNG per dataset, log-x, plus a JSON of the plotted points.

    python benchmarks/lr_curves.py benchmarks/results/h100_2026-11-22/tables --out benchmarks/results/h100_2026-11-22/lr_curves
    python benchmarks/lr_curves.py DIR --configs head,masked-m5,memory-m10,full   # a subset of the regimes
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def sweep_points(folders: list[Path], configs: list[str] | None = None) -> dict[str, dict[str, list[dict]]]:
    """``{dataset: {config: [{lr, heldout, test}, ...]}}`` from the sweep runs (first seed of each config) of every
    ``*.json`` result in ``folders`` (partial shards included; a rate seen twice keeps its first run)."""
    points: dict[str, dict[str, dict[float, dict]]] = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            data = json.loads(path.read_text())
            runs = data.get("runs", [])
            first_seed = {}
            for run in runs:
                first_seed.setdefault(run["config"], run["seed"])
            for run in runs:
                if run["seed"] != first_seed[run["config"]] or (configs and run["config"] not in configs):
                    continue
                points[run["dataset"]][run["config"]].setdefault(
                    float(run["lr"]), {"lr": float(run["lr"]), "heldout": run["heldout_accuracy"],
                                       "test": run["test_accuracy"]})
    return {d: {c: sorted(v.values(), key=lambda p: p["lr"]) for c, v in cs.items() if len(v) > 1}
            for d, cs in points.items()}


def plot(dataset: str, curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (config, pts) in enumerate(sorted(curves.items())):
        color = plt.cm.tab20(i % 20)
        lrs = [p["lr"] for p in pts]
        ax.plot(lrs, [100 * p["test"] for p in pts], "-o", color=color, label=config, markersize=4)
        ax.plot(lrs, [100 * p["heldout"] for p in pts], "--", color=color, alpha=0.6, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("accuracy (%)  —  solid: test, dashed: held-out")
    ax.set_title(f"{dataset}: accuracy against learning rate (first seed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", help="comma list of accuracy_tables.py output folders")
    p.add_argument("--configs", default="", help="comma list of configurations to draw [default: all swept]")
    p.add_argument("--out", type=Path, default=Path("lr_curves"))
    args = p.parse_args(argv)
    folders = [Path(f) for f in args.folders.split(",")]
    missing = [f for f in folders if not f.is_dir()]
    if missing:
        raise SystemExit(f"error: {missing[0]} is not a folder of accuracy_tables.py results")
    points = sweep_points(folders, [c for c in args.configs.split(",") if c] or None)
    if not points:
        raise SystemExit("error: no learning-rate sweep (several rates of one configuration) in those results")
    args.out.mkdir(parents=True, exist_ok=True)
    for dataset, curves in points.items():
        plot(dataset, curves, args.out / f"{dataset}.png")
    (args.out / "lr_curves.json").write_text(json.dumps(points, indent=1))
    for dataset, curves in points.items():
        print(f"{dataset}: " + "; ".join(f"{c} " + " ".join(f"{p['lr']:g}:{100 * p['test']:.1f}" for p in pts)
                                         for c, pts in sorted(curves.items())))
    return points


if __name__ == "__main__":
    main()
