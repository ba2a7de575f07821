"""Pack catalog datasets into compact ``.npz`` files (uint8) to carry to a GPU machine.

    python benchmarks/pack_data.py --datasets fashion-mnist,mnist-5k,digits --max-train fashion-mnist=20000 --out .device
    python benchmarks/pack_data.py --datasets mnist-5k,fashion-mnist,animal-mnist \
        --max-train mnist-5k=5000,fashion-mnist=5000,animal-mnist=5000 \
        --max-test mnist-5k=2000,fashion-mnist=2000,animal-mnist=2000 --out .carry/ci
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
    p.add_argument("--max-test", default="", help="NAME=N,... caps a test split likewise")
    p.add_argument("--out", type=Path, default=Path(".device"))
    args = p.parse_args(argv)
    caps = {split: {k: int(v) for k, v in (item.split("=") for item in spec.split(",") if item)}
            for split, spec in (("train", args.max_train), ("test", args.max_test))}
    for name in args.datasets.split(","):
        data = datasets.load(name)
        for split, limits in caps.items():  # the subset scenarios.stream.cap takes (stratified, seed 0)
            part = getattr(data, split)
            if name in limits and len(part) > limits[name]:
                _, keep = stratified_split(part.labels, holdout=limits[name] / len(part), seed=0)
                setattr(data, split, part.subset(keep))
        path = datasets.save_packed(data, args.out / f"{name}.npz")
        print(f"{name}: {len(data.train)} train / {len(data.test)} test -> {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
