"""Where a served pass of fine-tuned forks spends its time (#27, session 22). Served, 100 two-layer forks ran at
0.38x the served backbone with 72 ms passes of ~21 rows: is the eager routed pass bound by the host's launches?

For each batch size: the routed pass (each row one random fork, bf16 autocast over fp32 weights, as the server runs
it) timed wall-to-wall with a sync, the host time until ``forward_routed`` returns (launch cost), and the CUDA
kernels one pass launches; the backbone alone beside it.

    python dev/diag_fork_pass.py --tasks 100 --fork-layers 2 --json-out diag.json     # on a CUDA host
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_mem import MemoryViT  # noqa: E402
from continual_mem.routed_graph import RoutedGraph  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--fork-layers", type=int, default=2)
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    bb = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0).eval()
    net = MemoryViT(bb)
    for i in range(args.tasks):
        net.add_task(f"task{i}", 100, memory=5, fork_layers=args.fork_layers, fork_finetune=True)
    net = net.cuda().eval()
    rng = np.random.default_rng(0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tasks": args.tasks,
           "fork_layers": args.fork_layers, "rows": []}
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, 3, 224, 224, device="cuda")

        def routed():
            return net.forward_routed(x, [[f"task{rng.integers(args.tasks)}"] for _ in range(b)])

        def backbone():
            return net(x, [], original=True)

        with torch.no_grad():
            graph = RoutedGraph(net, x, autocast_dtype=torch.bfloat16)

        def graphed():
            return graph(x, graph.layout([[f"task{rng.integers(args.tasks)}"] for _ in range(b)]))

        row = {"batch": b}
        for name, fn in (("routed", routed), ("graphed", graphed), ("backbone", backbone)):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                host, wall = [], []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    fn()
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    host.append(t1 - t0)
                    wall.append(time.perf_counter() - t0)
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
            row[name] = {"wall_ms": 1e3 * float(np.median(wall)), "host_ms": 1e3 * float(np.median(host)),
                         "img_s": b / float(np.median(wall)), "kernels": len(kernels),
                         "kernel_ms": sum(getattr(e, "device_time", 0.0) for e in kernels) / 1e3}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
