"""Pack catalog datasets into compact ``.npz`` files (uint8) to carry to a GPU machine.

    python benchmarks/pack_data.py --datasets fashion-mnist,mnist-5k,digits --max-train fashion-mnist=20000 --out .device
"""
from __future__ import annotations

import argparse
from pathlib import Path

from scenarios import datasets
from scenarios.splits import stratified_split


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="fashion-mnist,mnist-5k,digits")
    p.add_argument("--max-train", default="", help="NAME=N,... caps a train split (class-stratified, seed 0)")
    p.add_argument("--out", type=Path, default=Path(".device"))
    args = p.parse_args(argv)
    caps = {k: int(v) for k, v in (item.split("=") for item in args.max_train.split(",") if item)}
    for name in args.datasets.split(","):
        data = datasets.load(name)
        if name in caps and len(data.train) > caps[name]:
            _, keep = stratified_split(data.train.labels, holdout=caps[name] / len(data.train), seed=0)
            data.train = data.train.subset(keep)
        path = datasets.save_packed(data, args.out / f"{name}.npz")
        print(f"{name}: {len(data.train)} train / {len(data.test)} test -> {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
