"""Multi-GPU training throughput: the real training loop (``continual_mem.train.fit``: device-resident uint8 data
with augmentation, DistributedDataParallel, schedule, clipping) on 1 and N GPUs, side by side in one run.

Each configuration is started by torchrun's own launcher (``python -m torch.distributed.run --standalone``); every
rank trains ``--per-gpu-batch`` images per step (global batch = per-GPU batch x GPUs, "a batch that fills them").

    python benchmarks/ddp_scaling.py --gpus 2 --model vit_small_patch14_dinov2 --img-size 224 --per-gpu-batch 256
    python benchmarks/ddp_scaling.py --gpus 2 --data packed:fashion.npz ...   # real images instead of random ones
    python benchmarks/ddp_scaling.py --gpus 2 --source compact ...   # generated JPEGs through the compact copy

``--source compact`` (or ``prepared``, raw pixels) reads ``--data`` (image files; default a folder of ``--images``
generated 500x375 JPEGs) through a prepared copy built once before the runs; each rank decodes its part of every
global batch (nvJPEG on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from continual_mem import MemoryViT, distributed  # noqa: E402
from continual_mem.train import TrainConfig, fit  # noqa: E402


def prepared_set(args):
    """The training split of ``args.data`` as a prepared copy of ``args.source``'s encoding (built on first call)."""
    from scenarios import datasets, prepared
    from scenarios.decode import host_cores, reader_for
    from scenarios.synthetic import make_image_folder

    if not args.data:
        folder = Path(args.folder)
        if not (folder / ".complete").is_file():
            make_image_folder(folder, classes=100, per_class=args.images // 100, size=(500, 375), portrait_every=7,
                              workers=host_cores())
            (folder / ".complete").write_text("ok")
        args.data = f"imagefolder:{folder}"
    data = datasets.load(args.data)
    opts = prepared.PrepareOptions(encoding="jpeg" if args.source == "compact" else "raw")
    return data, prepared.prepare(reader_for(data.train), name=data.name, split="train", class_names=data.class_names,
                                  root=Path(args.cache_dir), opts=opts)


def worker(args) -> None:
    shard, device = distributed.setup("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    common.resolve(args)
    from scenarios.datasets import ImageSet
    from scenarios.pipeline import DeviceImages, Preprocess

    bb = common.create(args, num_classes=0)
    ps = None
    if args.source != "resident":
        data, ps = prepared_set(args)
        classes, augment = data.num_classes, data.augment
    elif args.data:
        from scenarios import datasets

        data = datasets.load(args.data)
        images, classes, augment = data.train, data.num_classes, data.augment
    else:  # random uint8 images at the input size: the same pipeline work as real data of that size
        g = torch.Generator().manual_seed(0)
        s = bb.patch_embed.img_size[0]
        images = ImageSet(torch.randint(0, 256, (4096, 3, s, s), generator=g, dtype=torch.uint8),
                          torch.randint(0, 100, (4096,), generator=g))
        classes, augment = 100, "inception"
    model = MemoryViT(bb)
    torch.manual_seed(0)
    model.add_task("t", classes, regime=args.regime, memory=args.memory)
    model.to(device)
    pre = Preprocess.for_backbone(bb, augment)
    if ps is not None:
        from scenarios.compact import prepared_images

        source = prepared_images(ps, pre, device)  # the compact copy: nvJPEG on a GPU
    else:
        source = DeviceImages(images, pre, device)
    batch = args.per_gpu_batch * shard.world
    amp = "bf16" if args.dtype == "bf16" else "off"
    # warm-up (kernel selection, DDP buckets), then the timed run
    fit(model, "t", source, None, TrainConfig(steps=args.warmup, batch_size=batch, lr=0.01, amp=amp, eval_every=10**6),
        progress=False)
    result = fit(model, "t", source, None, TrainConfig(steps=args.iters, batch_size=batch, lr=0.01, amp=amp,
                                                        eval_every=10**6), progress=False)
    if shard.main:
        out = {"gpus": shard.world, "global_batch": batch, "per_gpu_batch": args.per_gpu_batch,
               "images_per_s": result.images_per_s, "steps": result.steps, "wall_s": result.wall_time_s,
               "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
        Path(args.worker_out).write_text(json.dumps(out))
    distributed.teardown()


def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=2, help="largest process count (1 is always run too)")
    p.add_argument("--per-gpu-batch", type=int, default=256)
    p.add_argument("--regime", default="masked-memory")
    p.add_argument("--data", default="", help="catalog name or packed:FILE.npz (default: random uint8 images)")
    p.add_argument("--source", choices=["resident", "compact", "prepared"], default="resident",
                   help="resident: images on the device; compact / prepared: --data's image files through a compact "
                        "(JPEG) or raw prepared copy")
    p.add_argument("--images", type=int, default=8000, help="generated JPEGs when --source needs files and no --data")
    p.add_argument("--folder", default="/tmp/continual-mem-ddp-jpegs", help="where generated JPEGs go")
    p.add_argument("--cache-dir", default="/tmp/continual-mem-ddp-prepared", help="prepared copies")
    p.add_argument("--target", type=float, default=1.8, help="speedup the largest run should reach (the summary's "
                   "target_met)")
    p.add_argument("--worker-out", default="", help=argparse.SUPPRESS)  # set by the driver for its workers
    args = p.parse_args(argv)
    if args.worker_out:
        worker(args)
        return {}
    args.warmup = args.warmup if args.warmup is not None else 10
    args.iters = args.iters or 60
    runs = []
    if args.source != "resident":
        prepared_set(args)  # built once here, opened by every rank
    passthrough = ["--source", args.source, "--cache-dir", args.cache_dir,
                   "--model", args.model, "--per-gpu-batch", str(args.per_gpu_batch), "--regime", args.regime,
                   "--memory", str(args.memory), "--dtype", args.dtype,
                   *(["--img-size", str(args.img_size)] if args.img_size else []),
                   *(["--data", args.data] if args.data else [])]
    for n in sorted({1, args.gpus}):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   str(Path(__file__).resolve()), *passthrough, "--warmup", str(args.warmup), "--iters",
                   str(args.iters), "--worker-out", f.name]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
            runs.append(json.loads(Path(f.name).read_text()))
    base = runs[0]["images_per_s"]
    for r in runs:
        r["speedup"] = r["images_per_s"] / base
        r["efficiency"] = r["speedup"] / r["gpus"]
    args.device, args.batch_size = "cuda" if torch.cuda.is_available() else "cpu", args.per_gpu_batch
    common.resolve(args)
    summary = {"speedup": runs[-1]["speedup"], "gpus": runs[-1]["gpus"], "target": args.target,
               "target_met": runs[-1]["gpus"] > 1 and runs[-1]["speedup"] >= args.target}
    result = {"benchmark": "ddp_scaling", **common.environment(args), "regime": args.regime, "source": args.source,
              "data": args.data or "random uint8", "results": runs, "summary": summary}
    rows = [[str(r["gpus"]), str(r["global_batch"]), f"{r['images_per_s']:,.0f}", f"{r['speedup']:.2f}",
             f"{r['efficiency']:.2f}"] for r in runs]
    common.report(result, f"{args.regime} training from {args.source}, {args.model}, {runs[0]['device']}",
                  ["GPUs", "global batch", "img/s", "speedup", "efficiency"], rows, args.json_out)
    return result



if __name__ == "__main__":
    main()
