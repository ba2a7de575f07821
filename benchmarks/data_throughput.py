"""End-to-end training and evaluation throughput per input path, same model and run: a JPEG folder through
each pipeline (PIL loader, on-the-fly decoding by host workers or on the GPU, prepared copy of raw pixels, compact
copy of re-encoded JPEGs decoded on the GPU), a device-resident uint8 set and synthetic tensors.

Training is ``continual_mem.train.fit`` itself (masked-memory task, SGD, optional CUDA graph), timed from a warm-up
step to the end with the device synchronised at both ends; evaluation is ``continual_mem.train.evaluate``, the
median of ``--eval-passes`` whole passes after a first one, with the held-out batches kept on the device after the
first pass (the sources' default, ``scenarios.eval_cache``) and streamed on every pass (``streamed x``). For
each row: images/s, ratio to the device-resident rate, CPU cores busy (process and its workers) and peak host
memory of the process tree (resident set, mapped page cache included).

    python benchmarks/data_throughput.py --device cuda --folder /tmp/jpegs          # generates the folder if absent
    python benchmarks/data_throughput.py --device cpu --images 600 --eval-images 300 --img-size 56 --steps 6 \\
        --batch-size 32 --model vit_small_patch14_dinov2 --folder /tmp/jpegs-small  # a quick CPU check
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from continual_mem import MemoryViT  # noqa: E402
from continual_mem.sm_partition import decoder_sms, sm_count  # noqa: E402
from continual_mem.train import TrainConfig, evaluate, fit  # noqa: E402
from scenarios import datasets, prepared  # noqa: E402
from scenarios.compact import prepared_images  # noqa: E402
from scenarios.datasets import ImageSet  # noqa: E402
from scenarios.decode import host_cores, reader_for  # noqa: E402
from scenarios.gpu_decoded import GpuDecodedImages  # noqa: E402
from scenarios.pipeline import DeviceImages, LoaderImages, Preprocess  # noqa: E402
from scenarios.streaming import DecodedImages, PreparedImages  # noqa: E402
from scenarios.synthetic import make_image_folder  # noqa: E402


# ----------------------------------------------------------------------------------------------- measuring
def _tree_rss() -> int:
    """Resident bytes of this process and all its descendants (from /proc)."""
    me = os.getpid()
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {me}, [me]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    total = 0
    for p in tree:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


class Probe:
    """CPU time (this process and its reaped workers) and the peak resident memory of the process tree."""

    def __enter__(self) -> "Probe":
        gc.collect()
        self.t0, self.cpu0, self.peak = time.perf_counter(), self._cpu(), _tree_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            self.peak = max(self.peak, _tree_rss())

    def __exit__(self, *exc) -> None:
        self.peak = max(self.peak, _tree_rss())
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self.t0

    def finish(self) -> dict:
        """Call after the source's workers have exited (their CPU time is counted once reaped)."""
        gc.collect()
        time.sleep(0.2)
        return {"cpu_cores_busy": (self._cpu() - self.cpu0) / max(1e-9, self.wall), "peak_rss_gb": self.peak / 1e9}


class Timed:
    """A batch source that synchronises the device and starts the clock when step ``warmup`` is asked for."""

    def __init__(self, inner, warmup: int, device: torch.device) -> None:
        self.inner, self.warmup, self.device, self.start = inner, warmup, device, None

    def train_batch(self, step: int, batch_size: int, seed: int):
        if step == self.warmup:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        return self.inner.train_batch(step, batch_size, seed)

    def eval_batches(self, batch_size: int):
        return self.inner.eval_batches(batch_size)

    @property
    def gpu_decoding(self) -> bool:
        return getattr(self.inner, "gpu_decoding", False)


class Synthetic:
    """The same normalised batch every step (the upper bound: no input pipeline at all)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def train_batch(self, step: int, batch_size: int, seed: int):
        return self.x, self.y

    def eval_batches(self, batch_size: int):
        for i in range(0, 10_000, batch_size):
            yield self.x[:min(batch_size, 10_000 - i)], self.y[:min(batch_size, 10_000 - i)]


# ----------------------------------------------------------------------------------------------- data
def ensure_folder(root: Path, *, images: int, eval_images: int, classes: int, size: tuple[int, int]) -> dict:
    """``root/train`` and ``root/test`` of synthetic photos (written once, in parallel)."""
    marker = root / ".complete"
    t0 = time.perf_counter()
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        make_image_folder(root / "train", classes=classes, per_class=images // classes, size=size,
                          portrait_every=7, workers=host_cores())
        make_image_folder(root / "test", classes=classes, per_class=eval_images // classes, size=size,
                          portrait_every=7, seed=1, workers=host_cores())
        marker.write_text("ok")
    files = list((root / "train").rglob("*.jpg"))
    sizes = [f.stat().st_size for f in files[:2000]]
    return {"folder": str(root), "train_images": len(files), "test_images": len(list((root / "test").rglob("*.jpg"))),
            "mean_kb": float(np.mean(sizes)) / 1e3, "generate_s": time.perf_counter() - t0}


def resident(ps: prepared.PreparedSet, side: int) -> ImageSet:
    """A device-resident reference set: the prepared images centre-cropped to ``side`` x ``side``."""
    out = np.empty((len(ps), side, side, 3), dtype=np.uint8)
    for i in range(len(ps)):
        img = ps.image(i)
        h, w = img.shape[:2]
        y, x = (h - side) // 2, (w - side) // 2
        out[i] = img[y:y + side, x:x + side]
    return ImageSet(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), ps.labels)


def nvjpeg_rate(files: list[Path], batch_size: int, batches: int = 10) -> float | None:
    """Decode-only rate of torchvision's batched GPU JPEG decoding (nvJPEG) on ``batches`` batches: the ceiling of
    a GPU-decoding input path, which would also take GPU time from training."""
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files[:batch_size * batches]]
    try:
        decode_jpeg(data[:batch_size], device="cuda")
    except RuntimeError:
        return None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(batches):
        decode_jpeg(data[b * batch_size:(b + 1) * batch_size], device="cuda")
    torch.cuda.synchronize()
    return batch_size * batches / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = common.base_parser(__doc__.splitlines()[0])
    p.set_defaults(model="vit_small_patch14_dinov2")
    p.add_argument("--folder", type=Path, default=Path("/tmp/continual-mem-jpegs"))
    p.add_argument("--images", type=int, default=20_000, help="training JPEGs to generate")
    p.add_argument("--eval-images", type=int, default=10_000, help="test JPEGs to generate")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", default="500x375", help="generated JPEG size, WxH")
    p.add_argument("--steps", type=int, default=160, help="fit() steps per variant")
    p.add_argument("--loader-steps", type=int, default=40, help="steps for the slow PIL loader variant")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--variants", default="synthetic,resident,prepared,compact,compact-host,decode,loader",
                   help="comma list; compact:SHARE[:THREADS] sets the host threads' share of JPEG decoding (auto: "
                        "balanced) and the threads calling the decoder; decode-gpu: the source files decoded on the "
                        "device; KIND@N holds N SMs back from training for a GPU decoder (default: fit's policy)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the compact copy")
    p.add_argument("--eval-passes", type=int, default=5, help="timed evaluation passes (the median is reported)")
    p.add_argument("--cache-dir", type=Path, default=None, help="prepared copies [default: FOLDER.prepared]")
    args = common.resolve(p.parse_args(argv))
    gpu = args.device.startswith("cuda")
    device = torch.device(args.device)
    img_size = args.img_size or 224
    w, h = (int(v) for v in args.size.split("x"))
    data_info = ensure_folder(args.folder, images=args.images, eval_images=args.eval_images, classes=args.classes,
                              size=(w, h))
    data = datasets.load(f"imagefolder:{args.folder}")
    model_kwargs = {"img_size": img_size, "num_classes": 0}
    bb = common.create(args, **model_kwargs).float()
    pre = Preprocess.for_backbone(bb, "inception")
    net = MemoryViT(bb)
    cache = args.cache_dir or Path(str(args.folder) + ".prepared")
    variants = args.variants.split(",")

    # the prepared copies (timed: the one-off cost of each prepared path)
    def build(encoding: str) -> tuple[dict, prepared.PreparedSet, prepared.PreparedSet]:
        opts = prepared.PrepareOptions(encoding=encoding, quality=args.quality)
        t0 = time.perf_counter()
        with Probe() as probe:
            parts = [prepared.prepare(reader_for(part), name=data.name, split=split, class_names=data.class_names,
                                      root=cache, opts=opts) for split, part in (("train", data.train),
                                                                                 ("test", data.test))]
        count, stored = sum(len(ps) for ps in parts), sum(ps.meta["bytes"] for ps in parts)
        return ({"encoding": encoding, "seconds": time.perf_counter() - t0, "images_per_s": count / probe.wall,
                 "gigabytes": stored / 1e9, "kb_per_image": stored / count / 1e3,
                 "x_source_jpeg_bytes": stored / count / 1e3 / data_info["mean_kb"], **probe.finish()}, *parts)

    prep, train_ps, test_ps = build("raw")
    compact = build("jpeg") if any(v.startswith("compact") for v in variants) else None

    def make(kind: str, split: str, eval_cache: int | None = None):
        keep = {} if eval_cache is None else {"eval_cache": eval_cache}  # streaming sources only
        part = data.train if split == "train" else data.test
        ps = train_ps if split == "train" else test_ps
        if kind == "resident":
            return DeviceImages(resident(ps, 256), pre, device)
        if kind == "prepared":
            return PreparedImages(ps, pre, device, **keep)
        if kind == "compact-host":  # decoded by host worker processes
            return prepared_images(compact[1] if split == "train" else compact[2], pre, device, decoder="host", **keep)
        if kind.startswith("compact"):  # compact[:SHARE[:THREADS]]: the host threads' share of decoding (auto:
            share, _, threads = kind.partition(":")[2].partition(":")  # balanced); threads calling the decoder
            options = {"host_share": None if share == "auto" else float(share)} if share else {}
            options.update(keep, **({"threads": int(threads)} if threads else {}))
            return prepared_images(compact[1] if split == "train" else compact[2], pre, device, decoder="device",
                                   **options)
        if kind == "decode":
            return DecodedImages(reader_for(part), pre, device, name=data.name, **keep)
        if kind == "decode-gpu":  # the source files, decoded by nvJPEG and shrunk on the device
            return GpuDecodedImages(reader_for(part), pre, device, name=data.name, **keep)
        if kind == "loader":
            return LoaderImages(part, pre, device, workers=max(1, host_cores() - 1), **keep)
        x = torch.randn(args.batch_size, 3, img_size, img_size, device=device)
        return Synthetic(x, torch.randint(0, args.classes, (args.batch_size,), device=device))

    def eval_rates(source, task: str, n_eval: int) -> tuple[float, float, list[float]]:
        """The first pass's rate (pipeline start and any keeping included), the median of the timed passes
        after it, and those passes (each whole, as one lasts ~0.2 s)."""
        rates = []
        for _ in range(1 + args.eval_passes):
            t0 = time.perf_counter()
            evaluate(net, source, [task], batch_size=args.batch_size)  # returns counts: synchronised
            rates.append(n_eval / (time.perf_counter() - t0))
        return rates[0], float(np.median(rates[1:])), rates[1:]

    def measure(variant: str, task: str) -> dict:
        kind, _, sms = variant.partition("@")  # KIND@N: N SMs held back for the decoder (default: fit's policy)
        requested = int(sms) if sms else None
        steps = args.loader_steps if kind == "loader" else args.steps
        warm = min(args.warmup_steps, steps // 2)
        source = make(kind, "train")
        decoder = getattr(source, "decoder", None)  # the compact copy's JPEG decoder, if any
        held = decoder_sms(requested, gpu_decoding=getattr(source, "gpu_decoding", False),
                           sm_count=sm_count(device))  # what fit holds back (the same policy)
        with Probe() as probe:
            timed = Timed(source, warm, device)
            cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=0.05, eval_every=steps,
                              cuda_graph=args.cuda_graph and gpu, amp="auto" if args.dtype != "fp32" else "off",
                              decoder_sms=requested)
            fit(net, task, timed, None, cfg, progress=False)
            if gpu:
                torch.cuda.synchronize()
            train_rate = (steps - warm) * args.batch_size / (time.perf_counter() - timed.start)
        del source, timed
        train_probe = probe.finish()
        streams = kind not in ("resident", "synthetic")  # a source that decodes or copies on every pass
        n_eval = 10_000 if kind == "synthetic" else len(data.test)
        with Probe() as probe:
            first, eval_rate, passes = eval_rates(make(kind, "test"), task, n_eval)  # kept after the first pass
            streamed = eval_rates(make(kind, "test", eval_cache=0), task, n_eval)[1] if streams else eval_rate
        eval_probe = probe.finish()
        print(f"{variant}: train {train_rate:.0f} img/s, eval {eval_rate:.0f} img/s (streamed {streamed:.0f}, first "
              f"pass {first:.0f})", file=sys.stderr, flush=True)
        shares = {"host_share": decoder.fixed, "host_share_last": decoder.share()} if decoder else {}
        return {"variant": variant, **shares, "decoder_sms": held, "train_images_per_s": train_rate,
                "eval_images_per_s": eval_rate,
                "eval_pass_images_per_s": passes, "eval_streamed_images_per_s": streamed,
                "eval_first_pass_images_per_s": first,
                "train_steps_timed": steps - warm, "train_cpu_cores_busy": train_probe["cpu_cores_busy"],
                "train_peak_rss_gb": train_probe["peak_rss_gb"], "eval_cpu_cores_busy": eval_probe["cpu_cores_busy"],
                "eval_peak_rss_gb": eval_probe["peak_rss_gb"]}

    rows = []
    for i, kind in enumerate(variants):
        task = f"t{i}"
        torch.manual_seed(0)
        net.add_task(task, args.classes, memory=args.memory)
        net.to(device)
        try:
            rows.append(measure(kind, task))
        except Exception as exc:  # noqa: BLE001 - one broken variant must not hide the others' numbers
            print(f"{kind}: failed: {exc!r}", file=sys.stderr, flush=True)
            rows.append({"variant": kind, "error": repr(exc)})
        finally:
            net.remove_task(task)
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    ref = next((r for r in rows if r["variant"] == "resident"), None)
    for r in rows:
        r["train_ratio_to_resident"] = r["train_images_per_s"] / ref["train_images_per_s"] if ref else None
        r["eval_ratio_to_resident"] = r["eval_images_per_s"] / ref["eval_images_per_s"] if ref else None
        r["eval_streamed_ratio_to_resident"] = r["eval_streamed_images_per_s"] / ref["eval_images_per_s"] if ref else None
    best_file = max((r for r in rows if r["variant"] in ("prepared", "decode", "decode-gpu")
                     or r["variant"].startswith("compact")),
                    key=lambda r: r["train_images_per_s"],
                    default=None)
    env = common.environment(args)
    env.update({"img_size": img_size, "cuda_graph": args.cuda_graph and gpu, "host_cores": host_cores(),
                "regime": "masked-memory"})

    def ratio(variant: str, phase: str) -> float | None:
        return next((r[f"{phase}_ratio_to_resident"] for r in rows if r["variant"] == variant), None)

    nvjpeg = nvjpeg_rate(sorted((args.folder / "train").rglob("*.jpg")), args.batch_size) if gpu else None
    result = {"environment": env, "data": data_info, "prepare": prep,
              "prepare_compact": compact[0] if compact else None, "results": rows, "failed": failed,
              "nvjpeg_decode_only_images_per_s": nvjpeg,
              "targets": {"decode_train_ratio": ratio("decode", "train"),
                          "decode_gpu_train_ratio": ratio("decode-gpu", "train"),
                          "prepared_train_ratio": ratio("prepared", "train"),
                          "compact_train_ratio": ratio("compact", "train"),
                          "compact_eval_ratio": ratio("compact", "eval"),
                          "compact_eval_streamed_ratio": ratio("compact", "eval_streamed"),
                          "compact_host_train_ratio": ratio("compact-host", "train"),
                          "compact_x_source_jpeg_bytes": compact[0]["x_source_jpeg_bytes"] if compact else None,
                          "best_file_path": best_file["variant"] if best_file else None}}
    table_rows = [[r["variant"], f"{r['train_images_per_s']:,.0f}",
                   f"{r['train_ratio_to_resident']:.2f}" if ref else "-", f"{r['eval_images_per_s']:,.0f}",
                   f"{r['eval_ratio_to_resident']:.2f}" if ref else "-",
                   f"{r['eval_streamed_ratio_to_resident']:.2f}" if ref else "-", f"{r['train_cpu_cores_busy']:.1f}",
                   f"{r['train_peak_rss_gb']:.1f}"] for r in rows]
    for built in (prep, compact[0] if compact else None):
        if built:
            table_rows.append([f"prepare {built['encoding']} (once; {built['kb_per_image']:.0f} KB/img, "
                               f"{built['x_source_jpeg_bytes']:.2f}x source)", f"{built['images_per_s']:,.0f} decoded",
                               "", "", "", "", f"{built['cpu_cores_busy']:.1f}", f"{built['peak_rss_gb']:.1f}"])
    if nvjpeg:
        table_rows.append(["nvJPEG decode only", f"{nvjpeg:,.0f} decoded", "", "", "", "", "", ""])
    common.report(result, f"input paths, {args.model} {img_size}px, batch {args.batch_size}, {env['device']}",
                  ["variant", "train img/s", "x resident", "eval img/s", "x resident", "streamed x", "cores busy",
                   "peak RSS GB"],
                  table_rows, args.json_out)
    return result


if __name__ == "__main__":
    main()
