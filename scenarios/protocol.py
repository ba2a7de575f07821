"""The evaluation protocol's policy, as pure functions: how much to hold out, which learning rates to try, when a
run has diverged, and which learning rate a sweep picks.

Small natural-image sets made the old protocol fragile: 5% of 1,400 images is 70 held-out images, so one image
moved the choice of learning rate, and a rate that diverged for one seed could still be picked. Here the held-out
part has a floor in images, rates come from a log-spaced grid, the choice averages several seeds, and a rate with
any diverged run is never chosen.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence


def heldout_fraction(n_train: int, *, min_images: int = 500, base: float = 0.05, cap: float = 0.2) -> float:
    """The share of the train split held out for early stopping and the learning rate: ``base``, raised so that
    at least ``min_images`` are held out, never above ``cap``."""
    if n_train < 2:
        raise ValueError(f"need at least 2 training images, got {n_train}")
    if not 0 < base <= cap < 1:
        raise ValueError(f"need 0 < base <= cap < 1, got base={base}, cap={cap}")
    return min(cap, max(base, min_images / n_train))


def log_grid(lo: float, hi: float, n: int) -> tuple[float, ...]:
    """``n`` learning rates from ``lo`` to ``hi``, evenly spaced in log, rounded to 2 significant digits."""
    if not 0 < lo <= hi or n < 1:
        raise ValueError(f"need 0 < lo <= hi and n >= 1, got lo={lo}, hi={hi}, n={n}")
    if n == 1:
        return (float(f"{lo:.2g}"),)
    step = (math.log(hi) - math.log(lo)) / (n - 1)
    return tuple(float(f"{math.exp(math.log(lo) + i * step):.2g}") for i in range(n))


def parse_grid(text: str) -> tuple[float, ...]:
    """``LO:HI:N`` (log-spaced) or a comma list of rates."""
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"grid {text!r}: give LO:HI:N, e.g. 0.01:1:5, or a comma list")
        return log_grid(float(parts[0]), float(parts[1]), int(parts[2]))
    rates = tuple(float(v) for v in text.split(",") if v)
    if not rates or min(rates) <= 0:
        raise ValueError(f"grid {text!r}: learning rates must be > 0")
    return rates


def diverged(run: dict, num_classes: int, *, margin: float = 0.02) -> bool:
    """A run that did not learn: a non-finite final loss, or held-out accuracy within ``margin`` of chance."""
    loss = run.get("final_loss")
    if loss is not None and not math.isfinite(loss):
        return True
    return run["heldout_accuracy"] <= 1.0 / num_classes + margin


def choose_lr(sweep: Sequence[dict], num_classes: int, *, exclude: Sequence[float] = ()) -> float:
    """The rate with the best mean held-out accuracy over the sweep's seeds, among rates none of whose runs
    diverged (and not in ``exclude``); ties go to the smaller rate. Falls back to the best mean if every rate
    diverged somewhere."""
    by_lr: dict[float, list[dict]] = defaultdict(list)
    for run in sweep:
        if run["lr"] not in exclude:
            by_lr[run["lr"]].append(run)
    if not by_lr:
        raise ValueError("no learning rate left to choose from")
    stable = {lr: runs for lr, runs in by_lr.items() if not any(diverged(r, num_classes) for r in runs)}
    pool = stable or by_lr
    return max(sorted(pool), key=lambda lr: statistics.mean(r["heldout_accuracy"] for r in pool[lr]))


def final_runs(sweep: Sequence[dict], seeds: Sequence[int], num_classes: int,
               get_run: Callable[[int, float], dict]) -> tuple[float, dict[int, dict], list[float]]:
    """The chosen rate, its run for every final seed, and the rates rejected on the way: :func:`choose_lr` picks a
    rate; if a final seed diverges there, the next rate is taken (never a diverged seed as a result unless every
    rate diverged). ``get_run(seed, lr)`` returns that run (a sweep run, a new one trained on demand, or one read
    from a shard)."""
    grid_size = len({r["lr"] for r in sweep})
    tried: list[float] = []
    while True:
        lr = choose_lr(sweep, num_classes, exclude=tried)
        finals = {seed: get_run(seed, lr) for seed in seeds}
        if not any(diverged(r, num_classes) for r in finals.values()) or len(tried) + 1 >= grid_size:
            return lr, finals, tried
        tried.append(lr)
