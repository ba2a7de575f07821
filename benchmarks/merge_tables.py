"""Merge rate-sharded ``accuracy_tables.py`` runs into one result per dataset, by the same protocol.

A configuration's sweep and final seeds are 11 trainings run one after another (~45 s each for mnist-5k at 112 px
on an H100, so ~8.5 minutes for one config), about a whole device call. Sharded by rate (``--grid <one rate>``,
every seed in each shard) the runs go in parallel; this script then picks the rate from the pooled sweep with
:func:`scenarios.protocol.final_runs`, exactly as one unsharded run would, and writes ``<out>/<dataset>.json``.

    BY_RATE=1 SHARDS="memory-m5 adapters-d5" benchmarks/run_tables_on_device.sh packed:fashion-mnist.npz
    python benchmarks/merge_tables.py /tmp/tables --out benchmarks/results/.../table4_fmnist
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_tables import summary_row  # noqa: E402
from table_report import markdown, result_stem  # noqa: E402
from scenarios.protocol import final_runs  # noqa: E402

# settings every shard of one dataset must share for their runs to be pooled
SAME = ("backbone", "img_size", "steps", "batch_size", "seeds", "sweep_seeds", "min_heldout", "heldout_images",
        "test_images")


def merge(paths: list[Path]) -> list[dict]:
    """One result per dataset from shard files (``<dataset><tag>.json`` with ``runs``). Raises ``ValueError`` when
    shards disagree on a setting or a run the protocol needs is missing."""
    shards: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for path in paths:
        data = json.loads(path.read_text())
        if "runs" in data and "dataset" in data:
            shards[data["dataset"]].append((path, data))
    if not shards:
        raise ValueError(f"no shard results (JSON with 'runs') among {len(paths)} files")
    results = []
    for dataset, parts in shards.items():
        first = parts[0][1]
        for path, data in parts[1:]:
            differ = [k for k in SAME if data.get(k) != first.get(k)]
            if differ:
                raise ValueError(f"{path.name} differs from {parts[0][0].name} in {differ}: shards of one table "
                                 "must share every setting but the rate")
        runs: dict[tuple[str, int, float], dict] = {}
        meta: dict[str, dict] = {}
        for _, data in parts:
            for run in data["runs"]:
                runs.setdefault((run["config"], run["seed"], run["lr"]), run)
            for row in data["rows"]:
                meta.setdefault(row["config"], row)
        sweep_seeds = [int(s) for s in str(first["sweep_seeds"]).split(",")]
        seeds = [int(s) for s in str(first["seeds"]).split(",")]
        rows = []
        for config, row in meta.items():
            grid = sorted({lr for c, s, lr in runs if c == config})
            missing = [(s, lr) for s in sweep_seeds for lr in grid if (config, s, lr) not in runs]
            if missing:
                raise ValueError(f"{dataset} {config}: sweep runs missing for (seed, lr) {missing}; rerun those shards")
            sweep = [runs[(config, s, lr)] for s in sweep_seeds for lr in grid]

            def get_run(seed: int, lr: float, config=config) -> dict:
                if (config, seed, lr) not in runs:
                    raise ValueError(f"{dataset} {config}: no run for seed {seed} at lr {lr}; each shard must run "
                                     "every seed (--seeds) at its rate")
                return runs[(config, seed, lr)]

            lr, finals, tried = final_runs(sweep, seeds, first["classes"], get_run)
            rows.append(summary_row(config, lr=lr, grid=grid, sweep=sweep, finals=finals, tried=tried,
                                    sweep_seeds=sweep_seeds, trainable_params=row["trainable_params"],
                                    flop_ratio=row["flop_ratio"]))
        used = sorted(p.name for p, _ in parts)
        env = {k: v for k, v in first.items() if k not in ("rows", "runs", "command", "lr_grid")}
        results.append({**env, "merged_from": used, "commands": [d["command"] for _, d in parts],
                        "rows": rows, "runs": sorted(runs.values(), key=lambda r: (r["config"], r["seed"], r["lr"]))})
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="folder of shard results")
    p.add_argument("--out", type=Path, required=True, help="folder for the merged <dataset>.json (not the shards' "
                                                          "folder: report() would count the shards' rows again)")
    args = p.parse_args(argv)
    if args.out.resolve() == args.folder.resolve():
        p.error("--out must differ from the shard folder")
    try:
        results = merge(sorted(args.folder.glob("*.json")))
    except ValueError as e:
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    for res in results:
        (args.out / f"{result_stem(res['dataset'])}.json").write_text(json.dumps(res, indent=2))
        print(markdown(res), flush=True)
    return results


if __name__ == "__main__":
    main()
