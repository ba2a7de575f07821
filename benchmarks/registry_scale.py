"""The registry at many tasks: how long importing, loading, verifying and adding a task take as K grows.

For each K it builds a registry (random-weight backbone, K masked-memory tasks made and imported in one change:
``serve_load.build_registry``), then times
``load`` (every task, and one task), ``verify`` (every task, and one task), and ``continual-mem add-task`` (a
fresh process, the same dataset and steps at every K), and reports the registry's size.

    python benchmarks/registry_scale.py --tasks 1,100,1000 --steps 20                      # CPU, tiny ViT
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from serve_load import build_registry  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="1,100,1000", help="comma list of K")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm ViT name (random weights)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--memory", type=int, default=5)
    p.add_argument("--fork-layers", type=int, default=0, help="fine-tuned fork depth of every task (0: masked memory)")
    p.add_argument("--head-tasks", action="store_true", help="the stored tasks are linear heads (regime head)")
    p.add_argument("--dataset", default="digits", help="what add-task trains on")
    p.add_argument("--steps", type=int, default=20, help="add-task's steps")
    p.add_argument("--json-out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    from registry import Registry

    rows, results = [], []
    for k in [int(v) for v in args.tasks.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reg.db"
            import_s, _ = timed(lambda: build_registry(path, args, k))  # K tasks made, then one bulk import
            reg = Registry(path)
            load_all, _ = timed(reg.load)
            load_one, _ = timed(lambda: reg.load(tasks=["task0"]))
            verify_all, report = timed(reg.verify)
            verify_one, _ = timed(lambda: reg.verify(tasks=["task0"]))
            cmd = [sys.executable, "-m", "cli", "--registry", str(path), "add-task", args.dataset, "--steps",
                   str(args.steps), "--device", "cpu", "--name", "new"]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            add_s, done = timed(lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True))
            if done.returncode != 0:
                raise SystemExit(f"add-task failed at K = {k}: {done.stderr.strip()[-400:]}")
            r = {"tasks": k, "bulk_import_s": import_s, "load_all_s": load_all, "load_one_s": load_one,
                 "verify_all_s": verify_all, "verify_one_s": verify_one, "verify_ok": report.ok,
                 "add_task_s": add_s, "registry_mib": path.stat().st_size / 2**20}
        results.append(r)
        rows.append([str(k), f"{import_s:.1f}", f"{load_all:.2f} / {load_one:.2f}",
                     f"{verify_all:.2f} / {verify_one:.2f}", f"{add_s:.1f}", f"{r['registry_mib']:.1f}"])
        print(f"K={k}: add-task {add_s:.1f} s", file=sys.stderr, flush=True)
    env = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "model": args.model,
           "img_size": args.img_size, "dataset": args.dataset, "steps": args.steps}
    for r in results:
        r["add_task_over_k1"] = r["add_task_s"] / results[0]["add_task_s"]
    result = {"benchmark": "registry_scale", "environment": env, "results": results}
    common.report(result, "Registry at K tasks (seconds; CPU)", ["K", "bulk import", "load all / one",
                                                                 "verify all / one", "add-task", "MiB"],
                  rows, args.json_out)
    return result


if __name__ == "__main__":
    main()
