"""Many tasks, one image one task: routed passes against the backbone alone, side by side in one run.

For each task count K it builds a model of K tasks (masked memory, and with ``--fork-share`` a share of fine-tuned
late forks), sends batches where every image names one random task (as requests naming one task each do), and
times, per pass: the backbone alone (the model's own head only), the routed pass
(:meth:`MemoryViT.forward_routed`) and, up to ``--all-task-max`` tasks, the all-task pass (every image runs every
task). It reports throughput against the backbone, p50 / p99 pass latency, GPU memory and host memory, and
how long building the K tasks took. With forks it also times one fork task on every image (backbone plus one
fork, the per-task cost ``c``) and reports the routed pass against the routed bound ``1 / (1 + c)``.
``--resident-tasks N`` holds at most N forks of a family on the device (paged by use); ``--offload`` keeps every
fork's weights in pinned host memory.

    python benchmarks/many_tasks.py --tasks 1,10 --batch-size 8                       # CPU smoke run
    python benchmarks/many_tasks.py --device cuda --dtype bf16-cast --model vit_small_patch14_dinov2 \\
        --img-size 224 --tasks 1,10,100,1000 --json-out many_tasks.json
"""
from __future__ import annotations

import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from continual_mem import MemoryViT, fork_batch  # noqa: E402


def host_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build(bb, k: int, args, rng: random.Random) -> tuple[MemoryViT, float]:
    """A model of ``k`` tasks with nonzero parameters (as if trained): masked memory, and forks at
    ``--fork-share``."""
    t0 = time.perf_counter()
    net = MemoryViT(bb, group_size=args.group_size)
    layers, select = args.fork_layers, args.fork_select
    for i in range(k):
        if rng.random() < args.fork_share:
            task = net.add_task(f"f{i}", args.classes, memory=args.memory, fork_layers=layers, fork_select=select,
                                fork_finetune=True)
        else:
            task = net.add_task(f"t{i}", args.classes, memory=args.memory)
        with torch.no_grad():
            for p in task.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    net.to(args.device, common.tensor_dtype(args)).eval()
    return net, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", default="1,10,100,1000", help="comma list of task counts K")
    p.add_argument("--classes", type=int, default=100, help="classes per task")
    p.add_argument("--group-size", type=int, default=4, help="MemoryViT group_size")
    p.add_argument("--fork-share", type=float, default=0.0, help="share of tasks that are fine-tuned late forks")
    p.add_argument("--fork-layers", type=int, default=8)
    p.add_argument("--fork-select", type=int, default=96)
    p.add_argument("--all-task-max", type=int, default=100, help="time the all-task pass up to this K")
    p.add_argument("--resident-tasks", type=int, default=None, help="forks of a family held on the device at once")
    p.add_argument("--offload", action="store_true", help="forks' weights in pinned host memory, paged in by use")
    p.add_argument("--seed", type=int, default=0)
    args = common.resolve(p.parse_args(argv))
    if not 0 <= args.fork_share <= 1:
        raise SystemExit(f"--fork-share must be in [0, 1], got {args.fork_share}")
    gpu = args.device.startswith("cuda")
    bb = common.create(args)
    x = torch.randn(args.batch_size, 3, *bb.patch_embed.img_size, device=args.device, dtype=common.tensor_dtype(args))
    results, rows = [], []
    for k in [int(v) for v in args.tasks.split(",")]:
        rng = random.Random(args.seed + k)
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        net, build_s = build(bb, k, args, rng)
        names = net.task_names
        forks = [n for n in names if n.startswith("f")]
        net.resident_tasks = args.resident_tasks
        batches = [[[rng.choice(names)] for _ in range(args.batch_size)] for _ in range(8)]  # rotate: 8 mixes
        turn = iter(range(10**9))

        def routed():
            return net.forward_routed(x, batches[next(turn) % len(batches)])

        with torch.inference_mode(), common.autocast(args):
            base = common.run_seconds(lambda: net(x, tasks=[], original=True), args)
            one = common.run_seconds(lambda: net(x, tasks=forks[:1], original=True), args) if forks else None
            every = common.run_seconds(lambda: net(x), args) if k <= args.all_task_max else None
            if args.offload and forks:
                fork_batch.offload(net, forks)
            got = common.run_seconds(routed, args)
        med_base, med = statistics.median(base), statistics.median(got)
        bound = med_base / statistics.median(one) if one else None  # 1 / (1 + c)
        r = {"tasks": k, "forks": len(forks), "build_s": build_s, "fork_bound_ratio": bound,
             "routed_over_bound": med_base / med / bound if bound else None,
             "resident_tasks": args.resident_tasks, "offload": args.offload,
             "backbone_s": med_base, "routed_s": med, "routed_ratio": med_base / med,
             "routed_p50_ms": 1e3 * percentile(got, 0.5), "routed_p99_ms": 1e3 * percentile(got, 0.99),
             "all_task_s": statistics.median(every) if every else None,
             "all_task_ratio": med_base / statistics.median(every) if every else None,
             "images_per_s_routed": args.batch_size / med, "images_per_s_backbone": args.batch_size / med_base,
             "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
             "host_rss_gib": host_rss_gib()}
        results.append(r)
        rows.append([str(k), str(r["forks"]), f"{r['images_per_s_backbone']:,.0f}", f"{r['images_per_s_routed']:,.0f}",
                     f"{r['routed_ratio']:.2f}", "-" if bound is None else f"{bound:.2f}",
                     f"{r['routed_p50_ms']:.1f} / {r['routed_p99_ms']:.1f}",
                     "-" if every is None else f"{r['all_task_ratio']:.2f}",
                     "-" if r["gpu_peak_gib"] is None else f"{r['gpu_peak_gib']:.1f}", f"{r['host_rss_gib']:.1f}",
                     f"{build_s:.1f}"])
        net = routed = None  # free this K's tasks before the next K is built
    result = {"benchmark": "many_tasks", "environment": common.environment(args), "group_size": args.group_size,
              "classes": args.classes, "fork_share": args.fork_share, "fork_layers": args.fork_layers,
              "fork_select": args.fork_select, "results": results}
    common.report(result, f"Many tasks, one random task per image ({result['environment']['device']})",
                  ["K", "forks", "backbone img/s", "routed img/s", "routed ×", "bound 1/(1+c)", "p50 / p99 ms",
                   "all-task ×",
                   "GPU GiB", "host GiB", "build s"], rows, args.json_out)
    return result


if __name__ == "__main__":
    main()
