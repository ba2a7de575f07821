"""Training-step throughput per regime, with backbone-only inference as the reference, in one run.

A step is forward + cross-entropy + backward + SGD update of the task's own parameters. ``masked-memory`` runs
the backbone without autograd (patches never see task tokens), so it should train near inference speed;
``memory`` and ``full`` must backpropagate through every block.

    python benchmarks/train_throughput.py                          # CPU: small batch, few iterations
    python benchmarks/train_throughput.py --device cuda --batch-size 256 --dtype bf16
    python benchmarks/train_throughput.py --device cuda --batch-size 256 --dtype bf16 --cuda-graph  # + graphed steps
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from continual_mem import MemoryViT, build_optimizer, train_step  # noqa: E402
from continual_mem.graphs import GraphedTrainStep  # noqa: E402
from continual_mem.step import deterministic_algorithms  # noqa: E402

REGIMES = {
    "head": {},
    "head+cls": {},
    "masked-memory": {"memory": None},
    "memory": {"memory": None},
    "full": {},
}


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--regimes", default=",".join(REGIMES), help="comma list of regimes")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--cuda-graph", action="store_true", help="also time each regime's step replayed as a CUDA "
                                                            "graph (GraphedTrainStep), side by side with eager")
    p.add_argument("--compile", action="store_true", help="also time masked-memory with the task path compiled "
                                                         "(compile_task_path) and replayed as a CUDA graph")
    p.add_argument("--deterministic", action="store_true", help="also time each regime's eager step with "
                                                              "deterministic algorithms (TrainConfig.deterministic)")
    p.add_argument("--data", default="", help="dataset (catalog name or packed:FILE.npz): also time masked-memory "
                                              "steps fed by the real device-resident uint8 pipeline")
    args = common.resolve(p.parse_args(argv))
    gpu = args.device.startswith("cuda")

    bb = common.create(args)
    x = torch.randn(args.batch_size, 3, *bb.patch_embed.img_size, device=args.device, dtype=common.tensor_dtype(args))
    y = torch.randint(0, args.classes, (args.batch_size,), device=args.device)

    def peak_reset() -> None:
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if gpu else None

    def row(variant: str, s: float) -> dict:
        """One timed variant: seconds per step of ``args.batch_size`` images, against backbone inference."""
        return {"variant": variant, "seconds": s, "images_per_s": args.batch_size / s,
                "ratio_to_backbone_inference": base_s / s, "peak_gib": peak()}

    def timed_graph(model: MemoryViT, variant: str) -> dict:
        """The training step of task "t" captured as a CUDA graph (GraphedTrainStep), timed like the eager one."""
        opt = build_optimizer(model, "t", lr=0.01, cuda_graph=True)
        graphed = GraphedTrainStep(model, "t", opt, x, y, autocast_dtype=torch.bfloat16 if args.dtype == "bf16" else None)
        peak_reset()
        return row(variant, common.median_seconds(lambda: graphed(x, y, 0.01), args))

    peak_reset()
    with torch.inference_mode(), common.autocast(args):
        base_s = common.median_seconds(lambda: bb(x), args)
    results = [row("backbone inference", base_s)]
    for regime in args.regimes.split(","):
        if regime not in REGIMES:
            raise SystemExit(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")
        model = MemoryViT(bb)
        kwargs = {k: (args.memory if v is None else v) for k, v in REGIMES[regime].items()}
        model.add_task("t", args.classes, regime=regime, **kwargs)
        model.to(args.device).train()
        opt = build_optimizer(model, "t", lr=0.01)

        def step() -> None:
            with common.autocast(args):
                train_step(model, "t", x, y, opt)

        peak_reset()
        results.append(row(f"train {regime}", common.median_seconds(step, args)))
        if args.deterministic:
            with deterministic_algorithms():
                peak_reset()
                results.append(row(f"train {regime} (deterministic)", common.median_seconds(step, args)))
        del opt
        if args.cuda_graph:
            results.append(timed_graph(model, f"train {regime} (CUDA graph)"))
            if args.compile and regime == "masked-memory":
                model.compile_task_path()
                results.append(timed_graph(model, f"train {regime} (compiled + CUDA graph)"))
        del model
    if args.data:
        import itertools

        from scenarios import datasets
        from scenarios.pipeline import DeviceImages, Preprocess

        data = datasets.load(args.data)
        source = DeviceImages(data.train, Preprocess.for_backbone(bb, data.augment), args.device)
        model = MemoryViT(bb)
        model.add_task("t", data.num_classes, regime="masked-memory", memory=args.memory)
        model.to(args.device).train()
        opt = build_optimizer(model, "t", lr=0.01)
        counter = itertools.count()

        def real_step() -> None:
            xb, yb = source.train_batch(next(counter), args.batch_size, 0)  # augment + normalise on the device
            with common.autocast(args):
                train_step(model, "t", xb.to(common.tensor_dtype(args)), yb, opt)

        peak_reset()
        results.append(row(f"train masked-memory, real pipeline ({data.name})", common.median_seconds(real_step, args)))
    by = {r["variant"]: r for r in results}
    summary = {}
    if "train masked-memory" in by:
        mm = by["train masked-memory"]
        summary["masked_memory_ratio_to_inference"] = mm["ratio_to_backbone_inference"]
        summary["masked_memory_target_0.7_met"] = mm["ratio_to_backbone_inference"] >= 0.7
        if "train full" in by:
            summary["masked_memory_speedup_vs_full"] = mm["images_per_s"] / by["train full"]["images_per_s"]
            summary["masked_memory_target_2.5x_full_met"] = summary["masked_memory_speedup_vs_full"] >= 2.5
    if "train masked-memory (CUDA graph)" in by:
        g = by["train masked-memory (CUDA graph)"]
        summary["graphed_masked_memory_ratio_to_inference"] = g["ratio_to_backbone_inference"]
        summary["graphed_masked_memory_target_0.7_met"] = g["ratio_to_backbone_inference"] >= 0.7
        summary["graph_speedup_masked_memory"] = g["images_per_s"] / by["train masked-memory"]["images_per_s"]
        if "train full (CUDA graph)" in by:
            summary["graphed_masked_memory_speedup_vs_graphed_full"] = (
                g["images_per_s"] / by["train full (CUDA graph)"]["images_per_s"])
        if "train full" in by:
            summary["graphed_masked_memory_speedup_vs_full"] = g["images_per_s"] / by["train full"]["images_per_s"]
            summary["graphed_masked_memory_target_2.5x_full_met"] = (
                summary["graphed_masked_memory_speedup_vs_full"] >= 2.5)
    if "train masked-memory (compiled + CUDA graph)" in by:
        c = by["train masked-memory (compiled + CUDA graph)"]
        summary["compiled_graphed_masked_memory_ratio_to_inference"] = c["ratio_to_backbone_inference"]
        if "train full" in by:
            summary["compiled_graphed_masked_memory_speedup_vs_full"] = c["images_per_s"] / by["train full"]["images_per_s"]
    real = [r for r in results if "real pipeline" in r["variant"]]
    if real and "train masked-memory" in by:
        summary["real_pipeline_ratio_to_synthetic"] = real[0]["images_per_s"] / by["train masked-memory"]["images_per_s"]
        summary["real_pipeline_within_10pct_met"] = summary["real_pipeline_ratio_to_synthetic"] >= 0.9
    if "train memory" in by and "train head+cls" in by:
        summary["memory_ratio_to_head_cls"] = by["train memory"]["images_per_s"] / by["train head+cls"]["images_per_s"]
    result = {"benchmark": "train_throughput", **common.environment(args), "results": results, "summary": summary}
    rows = [[r["variant"], f"{r['images_per_s']:,.1f}", f"{r['ratio_to_backbone_inference']:.3f}",
             "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"] for r in results]
    common.report(result, f"{args.model} on {result['device']}, batch {args.batch_size}, {args.dtype}",
                  ["variant", "img/s", "x backbone inference", "peak GiB"], rows, args.json_out)
    return result


if __name__ == "__main__":
    main()
