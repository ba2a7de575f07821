"""Multi-task inference throughput, side by side in one run.

Measures, on whatever device it runs: the backbone alone (stock timm forward); the single-pass multi-task
forward with K tasks (masked memory, m tokens); K separate single-task passes (what you would do without
computation reuse); and the reference full-sequence masked forward (the test oracle).

    python benchmarks/multitask_inference.py                      # CPU: small batch, few iterations
    python benchmarks/multitask_inference.py --device cuda --batch-size 256 --dtype bf16
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from continual_mem import MemoryViT, cost_table, kernels  # noqa: E402
from continual_mem.graphs import GraphedForward  # noqa: E402
from continual_mem.reference import reference_forward  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", default="1,5,10,20", help="comma list of task counts K")
    p.add_argument("--no-separate", action="store_true", help="skip the K separate passes")
    p.add_argument("--no-reference", action="store_true", help="skip the reference masked forward")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph variant (GPU only)")
    p.add_argument("--group-size", type=int, default=4, help="MemoryViT group_size (task group capacity)")
    p.add_argument("--triton", action="store_true", help="also time the CUDA-graph pass with the fused Triton kernels "
                                                      "(the default on CUDA), per group and with every group stacked "
                                                      "(continual_mem.stacked), side by side with PyTorch")
    p.add_argument("--compile", action="store_true", help="torch.compile the task path (MemoryViT.compile_task_path)")
    args = common.resolve(p.parse_args(argv))
    ks = [int(k) for k in args.tasks.split(",")]

    # every variant but the Triton one runs the PyTorch expression (the kernel is the default on CUDA otherwise)
    os.environ[kernels.ENV] = "torch"
    bb = common.create(args)
    model = MemoryViT(bb, group_size=args.group_size)
    if args.compile:
        model.compile_task_path()
    x = torch.randn(args.batch_size, 3, *bb.patch_embed.img_size, device=args.device, dtype=common.tensor_dtype(args))

    def timed(fn) -> float:
        with torch.inference_mode(), common.autocast(args):
            return common.median_seconds(fn, args)

    base_s = timed(lambda: bb(x))
    rows, results = [], []

    def add(name: str, k: int, seconds: float, flops_ratio: float | None = None) -> None:
        ips = args.batch_size / seconds
        r = {"variant": name, "tasks": k, "seconds": seconds, "images_per_s": ips,
             "ratio_to_backbone": ips / (args.batch_size / base_s), "flops_ratio_bound": flops_ratio}
        results.append(r)
        rows.append([name, str(k), f"{ips:,.1f}", f"{r['ratio_to_backbone']:.3f}",
                     "-" if flops_ratio is None else f"{flops_ratio:.3f}"])

    add("backbone only", 0, base_s, 1.0)
    use_graph = args.device.startswith("cuda") and not args.no_graph
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    previous: dict[str, dict[str, torch.Tensor]] = {"eager": {}, "graph": {}}  # outputs before the additions
    exact: dict[str, bool] = {}
    for k in ks:
        while len(model.task_names) < k:
            model.add_task(f"t{len(model.task_names)}", 100, memory=args.memory)
        model.to(args.device)
        bound = 1.0 / cost_table(model)[-1]["ratio_to_backbone"]
        add("single pass, K tasks", k, timed(lambda: model(x)), bound)
        with torch.inference_mode(), common.autocast(args):
            out = model(x)
        # preservation evidence on this device: every older output is bit-identical after the tasks just added
        exact[f"eager K={k}"] = all(torch.equal(out[n], v) for n, v in previous["eager"].items())
        previous["eager"] = out
        if use_graph:
            graphed = GraphedForward(model, x, autocast_dtype=dtype)
            add("single pass, CUDA graph", k, common.median_seconds(lambda: graphed(x), args), bound)
            out = graphed(x)
            exact[f"graph K={k}"] = all(torch.equal(out[n], v) for n, v in previous["graph"].items())
            previous["graph"] = out
            if args.triton:  # the same graph with the fused kernels: per group, then every group stacked
                for label, stack in (("per group", False), ("stacked groups", True)):
                    os.environ[kernels.ENV] = "triton"
                    model.stack_groups = stack
                    try:
                        fused = GraphedForward(model, x, autocast_dtype=dtype)
                        add(f"single pass, CUDA graph, Triton, {label}", k,
                            common.median_seconds(lambda: fused(x), args), bound)
                        out = fused(x)
                    finally:
                        os.environ[kernels.ENV] = "torch"
                        model.stack_groups = True
                    key = f"triton {label}"
                    exact[f"{key} K={k}"] = all(torch.equal(out[n], v) for n, v in previous.get(key, {}).items())
                    previous[key] = out
                    del fused
        if not args.no_separate:  # each task alone: one backbone pass per task, no grouping
            solo = MemoryViT(bb, group_size=1)
            solo.tasks = model.tasks
            names = model.task_names
            add("K separate passes", k, timed(lambda: [solo(x, tasks=[n], original=False) for n in names]))
        if not args.no_reference:
            add("reference masked sequence", k, timed(lambda: reference_forward(model, x)))

    by = {(r["variant"], r["tasks"]): r for r in results}
    summary = {}
    if ("single pass, K tasks", 10) in by:
        single = by[("single pass, K tasks", 10)]
        summary["k10_ratio_to_backbone"] = single["ratio_to_backbone"]
        summary["k10_target_0.8_met"] = single["ratio_to_backbone"] >= 0.8
        if ("K separate passes", 10) in by:
            speedup = single["images_per_s"] / by[("K separate passes", 10)]["images_per_s"]
            summary["k10_speedup_vs_separate"] = speedup
            summary["k10_target_5x_met"] = speedup >= 5.0
    if ("single pass, CUDA graph", 10) in by:
        graph = by[("single pass, CUDA graph", 10)]
        summary["k10_graph_ratio_to_backbone"] = graph["ratio_to_backbone"]
        if ("K separate passes", 10) in by:
            summary["k10_graph_speedup_vs_separate"] = (graph["images_per_s"]
                                                        / by[("K separate passes", 10)]["images_per_s"])
    for k in ks:
        best = max((r for r in results if r["tasks"] == k and "CUDA graph" in r["variant"]),
                   key=lambda r: r["ratio_to_backbone"], default=None)
        if best is not None:
            summary[f"k{k}_best_graph"] = {"variant": best["variant"], "ratio_to_backbone": best["ratio_to_backbone"],
                                           "flops_ratio_bound": best["flops_ratio_bound"]}
    if exact:
        summary["old_outputs_bit_exact_after_adding_tasks"] = exact
    result = {"benchmark": "multitask_inference", **common.environment(args), "group_size": args.group_size,
              "compiled_task_path": args.compile,
              "results": results,
              "summary": summary}
    common.report(result, f"{args.model} on {result['device']}, batch {args.batch_size}, {args.dtype}",
                  ["variant", "K", "img/s", "x backbone", "FLOP bound"], rows, args.json_out)
    return result


if __name__ == "__main__":
    main()
