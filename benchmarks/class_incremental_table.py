"""The class-incremental table from shards of ``python -m scenarios.class_incremental`` (each a ``results.json``,
e.g. from ``benchmarks/run_class_incremental_on_device.sh``): per dataset and learner, final average accuracy and
forgetting over seeds (mean ± sd), and the mean over datasets.

A learner run at several settings (recipe, learning rate) is one row per setting in the JSON; the table shows, per
learner, the setting with the best mean final accuracy over the datasets. That picks the baselines' rate on test
accuracy, which can only favour them.

    python benchmarks/class_incremental_table.py benchmarks/results/h200_2026-12-03/session19/class_incremental
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

ORDER = ("ours", "prototype", "naive", "lwf", "ewc", "replay")


def setting(payload: dict, learner: str) -> str:
    cfg = payload["config"]
    lr = cfg["baseline_lr"] if learner not in ("ours", "prototype") else cfg["lr"]
    return "-" if learner == "prototype" else f"{cfg.get('recipe', 'avalanche')} lr {lr:g}"


def collect(folder: Path) -> dict:
    """{(learner, setting): {dataset: {seed: (final accuracy, forgetting)}}}; a seed run twice keeps the first."""
    runs: dict = defaultdict(lambda: defaultdict(dict))
    for path in sorted(folder.glob("*.json")):
        payload = json.loads(path.read_text())
        dataset = Path(payload["dataset"].removeprefix("packed:")).stem
        for r in payload["results"]:
            seeds = runs[(r["learner"], setting(payload, r["learner"]))][dataset]
            seeds.setdefault(r["seed"], (r["final_average_accuracy"], r["forgetting"]))
    return runs


def summarise(runs: dict, *, seeds: int) -> list[dict]:
    rows = []
    for (learner, how), per_dataset in runs.items():
        row = {"learner": learner, "setting": how, "datasets": {}}
        for dataset, by_seed in sorted(per_dataset.items()):
            acc, fgt = [v[0] for v in by_seed.values()], [v[1] for v in by_seed.values()]
            row["datasets"][dataset] = {"seeds": sorted(by_seed), "final_accuracy": statistics.mean(acc),
                                        "final_accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                                        "forgetting": statistics.mean(fgt)}
        row["complete"] = all(len(d["seeds"]) >= seeds for d in row["datasets"].values())
        row["mean_final_accuracy"] = statistics.mean(d["final_accuracy"] for d in row["datasets"].values())
        rows.append(row)
    return rows


def best(rows: list[dict], datasets: list[str]) -> list[dict]:
    """Per learner, the complete setting (every dataset, every seed) of best mean final accuracy."""
    picked = {}
    for row in rows:
        if not row["complete"] or sorted(row["datasets"]) != datasets:
            continue
        if row["learner"] not in picked or row["mean_final_accuracy"] > picked[row["learner"]]["mean_final_accuracy"]:
            picked[row["learner"]] = row
    return [picked[name] for name in ORDER if name in picked]


def markdown(rows: list[dict], datasets: list[str]) -> str:
    head = "| learner | setting | " + " | ".join(datasets) + " | mean |"
    lines = [head, "|" + "---|" * (len(datasets) + 3)]
    for row in rows:
        cells = [f"{100 * d['final_accuracy']:.1f} ± {100 * d['final_accuracy_sd']:.1f} "
                 f"({100 * d['forgetting']:.1f})" for d in (row["datasets"][n] for n in datasets)]
        lines.append(f"| {row['learner']} | {row['setting']} | " + " | ".join(cells)
                     + f" | {100 * row['mean_final_accuracy']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--seeds", type=int, default=3, help="seeds a setting needs on every dataset to be shown")
    args = p.parse_args(argv)
    rows = summarise(collect(args.folder), seeds=args.seeds)
    datasets = sorted({d for row in rows for d in row["datasets"]})
    table = best(rows, datasets)
    payload = {"datasets": datasets, "table": table, "all": rows}
    print(json.dumps(payload, indent=1))
    print("final average accuracy % ± sd over seeds (forgetting %)")
    print(markdown(table, datasets))
    return payload


if __name__ == "__main__":
    main()
