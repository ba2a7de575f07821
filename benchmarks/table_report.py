"""Markdown tables from ``accuracy_tables.py`` results: one dataset's table, and one combined table over result
folders (mean over datasets, the share of the head -> memory-m10 gain each configuration recovers, timing)."""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

from table_configs import CONFIGS


def result_stem(dataset: str) -> str:
    """A dataset's result file name: its name with anything but letters, digits, ``_.-`` replaced by ``_`` (a spec
    like ``imagefolder:/data/x`` has slashes and a colon)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", dataset).strip("_") or "dataset"


def markdown(result: dict) -> str:
    lines = [f"### {result['dataset']} ({result['train_images']} train / {result['test_images']} test)", "",
             "| config | test acc (mean ± std) | lr | FLOPs / backbone | params |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        mark = f" (diverged seeds: {r['diverged_seeds']})" if r.get("diverged_seeds") else ""
        lines.append(f"| {r['config']} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f}{mark} | {r['lr']} | "
                     f"{r['flop_ratio']:.3f} | {r['trainable_params']:,} |")
    return "\n".join(lines)


def report(folders: list[Path]) -> str:
    """One markdown table over datasets from result folders: per dataset the mean ± std over seeds (runs of the same
    seed in several folders count once: they are the same run), the mean over datasets, the share of the head ->
    memory-m10 gain it recovers (± one standard error over seeds), and the timing columns."""
    acc: dict[tuple[str, str], dict[str, float]] = {}
    flops: dict[str, float] = {}
    names: list[str] = []
    timing_rows: dict[str, dict] = {}
    env = {}
    for folder in folders:
        for path in sorted(folder.glob("*.json")):
            d = json.loads(path.read_text())
            if "timing" in d:
                timing_rows.update({r["config"]: r for r in d["timing"]["rows"]})
            elif "rows" in d and "dataset" in d:
                env = {k: d[k] for k in ("device", "img_size", "steps", "batch_size", "date") if k in d}
                if d["dataset"] not in names:
                    names.append(d["dataset"])
                for r in d["rows"]:
                    seeds = str(d["seeds"]).split(",")
                    acc.setdefault((r["config"], d["dataset"]), {}).update(zip(seeds, r["test_accuracy"]))
                    flops[r["config"]] = r["flop_ratio"]

    def stats(config: str) -> tuple[float, float] | None:
        """Mean over datasets and its standard error (seed spread within each dataset)."""
        cells = [list(acc[(config, n)].values()) for n in names if (config, n) in acc]
        if len(cells) != len(names):
            return None
        mean = statistics.mean(statistics.mean(c) for c in cells)
        se = math.sqrt(sum((statistics.stdev(c) / math.sqrt(len(c))) ** 2 if len(c) > 1 else 0.0 for c in cells))
        return mean, se / len(cells)

    base, top = stats("head"), stats("memory-m10")
    head = ("| config | " + " | ".join(names) + " | mean | gain recovered | seeds | FLOPs / backbone | "
            "measured cost / backbone | train img/s |")
    lines = [f"{env}", "", head, "|" + "---|" * (len(names) + 7)]
    for c in [c for c in CONFIGS if any(k[0] == c for k in acc)]:
        cells = []
        for n in names:
            v = list(acc.get((c, n), {}).values())
            cells.append(f"{100 * statistics.mean(v):.2f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.2f}"
                         if v else "-")
        m = stats(c)
        gain = "-"
        if m and base and top and top[0] > base[0]:
            span = top[0] - base[0]
            r = (m[0] - base[0]) / span
            se = math.sqrt((m[1] / span) ** 2 + (base[1] * (m[0] - top[0]) / span ** 2) ** 2
                           + (top[1] * (m[0] - base[0]) / span ** 2) ** 2)
            gain = f"{100 * r:.0f}% ± {100 * se:.0f}"
        seeds = sorted({s for n in names for s in acc.get((c, n), {})}, key=int)
        t = timing_rows.get(c, {})
        cost = f"{t['measured_cost_ratio']:.3f}" if t else "-"
        ips = f"{t['train_images_per_s']:,.0f}" if t else "-"
        mean = f"{100 * m[0]:.2f}" if m else "-"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {mean} | {gain} | {','.join(seeds)} | {flops[c]:.3f} | "
                     f"{cost} | {ips} |")
    lines += ["", "Share of the head -> memory-m10 gain recovered, per dataset (the goal asks for every one):", "",
              "| config | " + " | ".join(names) + " | worst |", "|" + "---|" * (len(names) + 2)]
    for c in [c for c in CONFIGS if any(k[0] == c for k in acc)]:
        shares = [gain_share(acc, c, n) for n in names]
        worst = min((v for v in shares if v is not None), default=None)
        lines.append(f"| {c} | " + " | ".join("-" if v is None else f"{100 * v:.0f}%" for v in shares)
                     + f" | {'-' if worst is None else f'{100 * worst:.0f}%'} |")
    return "\n".join(lines)


def gain_share(acc: dict, config: str, dataset: str) -> float | None:
    """``(config - head) / (memory-m10 - head)`` on one dataset's seed means; None without all three or gain."""
    means = {c: statistics.mean(acc[(c, dataset)].values()) for c in (config, "head", "memory-m10")
             if acc.get((c, dataset))}
    if len(means) < 3 or means["memory-m10"] <= means["head"]:
        return None
    return (means[config] - means["head"]) / (means["memory-m10"] - means["head"])
