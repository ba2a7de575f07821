"""Where a served pass's time goes: the backbone with one head (the served baseline) against K fine-tuned forks
(#27, session 23). Served through HTTP, 100 two-layer forks ran at 0.50-0.69x the served backbone while the graphed
model pass alone costs ~1.5x the backbone's kernels at 16-64 rows; each served pass of ~20 rows spent 28 ms in the
batch thread against 13-15 ms for the baseline. This runs the server's batcher without HTTP: the same JPEG uploads
decoded by nvJPEG inside the pass, passes overlapped as ``Batcher.run`` overlaps them, and times each phase on the
host (decode, crop, routing layout, graph replay, copy-out, read-back), then the device time of one pass alone.

    python dev/diag_served_pass.py --tasks 100 --fork-layers 2 --rows 20 --json-out diag.json     # on a CUDA host
    python dev/diag_served_pass.py --device cpu --tasks 3 --img-size 56 --passes 3                 # smoke test
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import serving.batcher as batcher_module  # noqa: E402
from continual_mem import MemoryViT, fork_batch  # noqa: E402
from continual_mem.graphs import GraphedForward  # noqa: E402
from continual_mem.routed_graph import RoutedGraph  # noqa: E402
from scenarios.pipeline import Preprocess  # noqa: E402
from scenarios.streaming import DeviceStage  # noqa: E402
from scenarios.synthetic import photo  # noqa: E402
from serving.batcher import Batcher  # noqa: E402
from serving.holder import Served  # noqa: E402
from serving.metrics import Metrics  # noqa: E402
from serve_load import build_model  # noqa: E402  (the model serve_load serves)

PHASES = collections.defaultdict(list)  # phase -> host seconds per call


def _timed(owner, name: str, phase: str) -> None:
    """Wrap ``owner.name`` so each call's host time lands in ``PHASES[phase]``."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            PHASES[phase].append(time.perf_counter() - t)

    setattr(owner, name, wrapper)


def _served(net: MemoryViT, device: torch.device) -> Served:
    pre = Preprocess.for_backbone(net.backbone, "inception")
    return Served(net, 1, DeviceStage(pre, device), {n: net.tasks[n].config.class_labels for n in net.task_names},
                  [{"name": n} for n in net.task_names])


def run(args, k: int) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    served = _served(fork_batch.place(build_model(args, k).eval(), device), device)
    holder = types.SimpleNamespace(device=device, cpu_turns=contextlib.nullcontext(), current=served)
    b = Batcher(holder, Metrics(), max_batch=64, max_wait_ms=1, amp=cuda, device_decode=True, overlap=True,
                decoder_sms=args.decoder_sms)
    b.warm(served)
    uploads = [photo(i, label=i % 10, size=(500, 375)) for i in range(args.rows)]
    rng = np.random.default_rng(0)
    names = served.net.task_names

    def asked():
        return [(names[rng.integers(len(names))],) for _ in range(args.rows)]

    PHASES.clear()
    ahead, t0 = None, time.perf_counter()
    for _ in range(args.passes):  # as Batcher.run overlaps them: launch the next, then read the last back
        t = time.perf_counter()
        launched = b._launch(served, uploads, asked=asked())
        PHASES["launch (all of it)"].append(time.perf_counter() - t)
        if ahead is not None:
            b._finish(ahead)
        ahead = launched
    b._finish(ahead)
    wall = (time.perf_counter() - t0) / args.passes
    phases = {name: 1e3 * float(np.mean(v)) for name, v in PHASES.items()}
    alone = []
    for _ in range(5 if cuda else 1):  # one pass, nothing beside it: launch to answers read back
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        b._finish(b._launch(served, uploads, asked=asked()))
        alone.append(1e3 * (time.perf_counter() - t))
    out = {"tasks": k, "rows": args.rows, "pass_ms_overlapped": 1e3 * wall, "images_per_s": args.rows / wall,
           "pass_ms_alone": float(np.median(alone)), "host_ms_by_phase": phases}
    if args.trace is not None:  # five overlapped passes under the profiler: the kernels' share of the time
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            ahead = None
            for _ in range(5):
                launched = b._launch(served, uploads, asked=asked())
                if ahead is not None:
                    b._finish(ahead)
                ahead = launched
            b._finish(ahead)
        args.trace.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(args.trace / f"served_k{k}.json"))
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        top = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:20]
        out["top_ops"] = [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key, 0) / 1e3} for e in top]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--fork-layers", type=int, default=2)
    p.add_argument("--head-tasks", action="store_true", help="the tasks are linear heads (serve_load's option)")
    p.add_argument("--memory", type=int, default=5, help="memory tokens per layer (as serve_load's default)")
    p.add_argument("--rows", type=int, default=20, help="images per pass (the served passes had ~20)")
    p.add_argument("--passes", type=int, default=200)
    p.add_argument("--decoder-sms", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--trace", type=Path, default=None, help="folder for a profiler trace of five passes per K")
    args = p.parse_args(argv)
    _timed(batcher_module, "decode_jpegs", "nvJPEG decode")
    _timed(DeviceStage, "from_images", "crop and normalise")
    _timed(RoutedGraph, "layout", "routing layout (pages forks in)")
    _timed(RoutedGraph, "__call__", "routed graph replay")
    _timed(GraphedForward, "__call__", "all-task graph replay")
    _timed(MemoryViT, "forward_routed", "eager routed pass")
    _timed(Batcher, "_copy_out", "copy-out queued")
    _timed(Batcher, "_finish", "read-back (waits for the pass)")
    out = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "decoder_sms": args.decoder_sms, "fork_layers": args.fork_layers,
           "runs": [run(args, k) for k in (0, args.tasks)]}
    base = out["runs"][0]["images_per_s"]
    for r in out["runs"]:
        r["x_k0"] = r["images_per_s"] / base
    text = json.dumps(out, indent=1)
    print(text)
    for r in out["runs"]:
        print(f"K={r['tasks']:>4}: {r['pass_ms_overlapped']:.2f} ms/pass overlapped ({r['x_k0']:.2f}x K=0), "
              f"{r['pass_ms_alone']:.2f} ms alone; " +
              ", ".join(f"{n} {v:.2f}" for n, v in r["host_ms_by_phase"].items()))
    if args.json_out:
        args.json_out.write_text(text)
    return out


if __name__ == "__main__":
    main()
