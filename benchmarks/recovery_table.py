"""The domain-shifted suite's table: per dataset, test accuracy of `head`, full-attention `memory` and a preserving
configuration over seeds (mean ± std), the share of the head -> memory gain the preserving one recovers with its
standard error, and each configuration's measured cost per task.

Reads the run files the screens write (`accuracy_tables.py`: ``runs`` lists; `default_recipe_runs.py`: one run
per file) and `accuracy_tables.py --timing` files; prints JSON and a markdown table.

    python benchmarks/recovery_table.py benchmarks/results/h200_2026-12-02 --pick head=1.0 --pick memory-m10=0.03 \
        --preserving default --timing-config default=fork-k8-s96-ft
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path


def dataset_name(spec: str) -> str:
    """``packed:dir/fashion-mnist.npz`` and ``fashion-mnist`` name the same dataset."""
    return Path(spec.split(":", 1)[-1]).stem if ":" in spec else spec


def collect(paths: list[Path], picks: dict[str, float], steps: int, *,
            partials_steps: int | None = None) -> dict[tuple[str, str], dict[int, float]]:
    """Test accuracy per (dataset, config) and seed, from every run file under ``paths`` trained for ``steps`` steps.
    A config in ``picks`` keeps only runs at that rate. A final file's run wins over the same run in a partial.
    Partial files that do not record their steps (written before they did) count as ``partials_steps``."""
    files = sorted((f for p in paths for f in ([p] if p.is_file() else p.rglob("*.json"))),
                   key=lambda f: f.name.endswith(".partial.json"), reverse=True)
    out: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:  # other outputs in the same folders (e.g. bits checks with a trailing line)
            continue
        if not isinstance(data, dict):
            continue
        runs = data.get("runs") if "runs" in data else [data] if "test_accuracy" in data else []
        run_steps = data.get("steps", partials_steps if f.name.endswith(".partial.json") else None)
        for r in runs:
            if not isinstance(r, dict) or "config" not in r or r.get("steps", run_steps) != steps:
                continue
            if r["config"] in picks and not math.isclose(r["lr"], picks[r["config"]]):
                continue
            out[(dataset_name(r["dataset"]), r["config"])][r["seed"]] = r["test_accuracy"]
    return dict(out)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def recovery(head: list[float], memory: list[float], kept: list[float]) -> tuple[float, float]:
    """Share of the head -> memory gain that ``kept`` recovers, ``(d - h) / (m - h)`` of the seed means, and its
    standard error by the delta method (the three means independent, each with SE std / sqrt(n))."""
    if min(len(head), len(memory), len(kept)) < 1:
        raise ValueError("every configuration needs at least one run")
    (h, sh), (m, sm), (d, sd) = mean_std(head), mean_std(memory), mean_std(kept)
    a, b = d - h, m - h
    if b == 0:
        raise ValueError("memory does not beat head: no gain to recover")
    se = (sd / math.sqrt(len(kept)), sm / math.sqrt(len(memory)), sh / math.sqrt(len(head)))
    grad = (1 / b, -a / b**2, (a - b) / b**2)
    return a / b, math.sqrt(sum((g * s) ** 2 for g, s in zip(grad, se)))


def costs(paths: list[Path]) -> dict[str, list[float]]:
    """Measured cost per task over the backbone, per config, one value per ``--timing`` run file."""
    out: dict[str, list[float]] = defaultdict(list)
    for p in paths:
        for f in [p] if p.is_file() else p.rglob("timing*.json"):
            for row in json.loads(f.read_text()).get("timing", {}).get("rows", []):
                out[row["config"]].append(row["measured_cost_ratio"])
    return dict(out)


def table(runs, cost, *, head: str, memory: str, preserving: str, timing_config: dict[str, str]) -> dict:
    rows = []
    for ds in sorted({d for d, _ in runs}):
        got = {c: sorted(runs.get((ds, c), {}).items()) for c in (head, memory, preserving)}
        if not all(got.values()):
            continue
        acc = {c: [v for _, v in got[c]] for c in got}
        rec, se = recovery(acc[head], acc[memory], acc[preserving])
        rows.append({"dataset": ds, **{c: {"seeds": [s for s, _ in got[c]], "mean": mean_std(acc[c])[0],
                                            "std": mean_std(acc[c])[1], "runs": acc[c]} for c in got},
                     "gain": mean_std(acc[memory])[0] - mean_std(acc[head])[0], "recovered": rec, "recovered_se": se})
    cost_rows = {c: (statistics.median(cost[timing_config.get(c, c)]), min(cost[timing_config.get(c, c)]),
                     max(cost[timing_config.get(c, c)]))
                 for c in (head, memory, preserving) if cost.get(timing_config.get(c, c))}
    return {"rows": rows, "cost": cost_rows}


def markdown(res: dict, *, head: str, memory: str, preserving: str) -> str:
    def cell(r, c):
        n = len(r[c]["runs"])
        return f"{100 * r[c]['mean']:.2f} ± {100 * r[c]['std']:.2f} ({n})"

    lines = [f"| dataset | {head} | {memory} | gain | {preserving} | recovered (± SE) |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['dataset']} | {cell(r, head)} | {cell(r, memory)} | {100 * r['gain']:+.1f} | "
                     f"{cell(r, preserving)} | {100 * r['recovered']:.0f}% ± {100 * r['recovered_se']:.0f} |")
    if res["cost"]:
        lines.append("\n| measured cost per task × backbone | median | min | max |\n|---|---|---|---|")
        lines += [f"| {c} | {m:.3f} | {lo:.3f} | {hi:.3f} |" for c, (m, lo, hi) in res["cost"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path, help="run files or folders of them")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--partials-steps", type=int, default=None,
                   help="steps of the partial run files that do not record them (older accuracy_tables.py)")
    p.add_argument("--head", default="head")
    p.add_argument("--memory", default="memory-m10")
    p.add_argument("--preserving", default="default")
    p.add_argument("--pick", action="append", default=[], help="CONFIG=LR: only that config's runs at that rate")
    p.add_argument("--timing-config", action="append", default=[],
                   help="CONFIG=TIMED: the timing rows of TIMED give CONFIG's cost")
    args = p.parse_args(argv)
    try:
        picks = {k: float(v) for k, v in (s.split("=", 1) for s in args.pick)}
        timed = dict(s.split("=", 1) for s in args.timing_config)
    except ValueError:
        p.error("--pick takes CONFIG=LR and --timing-config CONFIG=TIMED")
    res = table(collect(args.paths, picks, args.steps, partials_steps=args.partials_steps), costs(args.paths), head=args.head, memory=args.memory,
                preserving=args.preserving, timing_config=timed)
    print(json.dumps(res, indent=1))
    print(markdown(res, head=args.head, memory=args.memory, preserving=args.preserving))
    return res


if __name__ == "__main__":
    main()
