"""Why batched nvJPEG decoding does not overlap a busy GPU (docs/data_at_scale.md): one GPU call that tells the
hypotheses apart.

1. Rates: nvJPEG decoding a compact copy's batches alone; a bf16 matmul loop (a stand-in for the training step) alone;
   both at once, the decode in a thread on its own stream as ``CompactImages`` does it. Overlap would keep both
   near their solo rates; serialisation gives ``1/(1/a + 1/b)``.
2. A profiler trace of the concurrent phase: CUDA runtime calls made in the process (``cudaFree``, ``cudaMalloc``,
   ``cudaDeviceSynchronize``, ``cudaHostAlloc``: a device-wide synchronisation each, whoever makes them, nvJPEG
   included) and the decode kernels' names (the hardware decoder leaves few; the CUDA backend leaves Huffman/IDCT
   kernels on the SMs), with the share of decode-kernel time that overlaps matmul kernels.

    python dev/diag_compact_overlap.py --images 4096 --json-out diag.json     # on a CUDA host
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import datasets, prepared  # noqa: E402
from scenarios.decode import host_cores, reader_for  # noqa: E402
from scenarios.synthetic import make_image_folder  # noqa: E402


def compact_copy(folder: Path, images: int) -> prepared.PreparedSet:
    if not (folder / ".complete").is_file():
        make_image_folder(folder, classes=10, per_class=images // 10, size=(500, 375), portrait_every=7,
                          workers=host_cores())
        (folder / ".complete").write_text("ok")
    data = datasets.load(f"imagefolder:{folder}")
    return prepared.prepare(reader_for(data.train), name="diag", split="train", class_names=data.class_names,
                            root=Path(str(folder) + ".prepared"), opts=prepared.PrepareOptions(encoding="jpeg"))


def decode_loop(ps, batch: int, seconds: float, stream, out: dict, stop: threading.Event | None = None) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = ps.encoded(np.arange(len(ps)))
    n, t0, i = 0, time.perf_counter(), 0
    with torch.cuda.stream(stream):
        while time.perf_counter() - t0 < seconds and not (stop and stop.is_set()):
            part = [blobs[(i + k) % len(blobs)] for k in range(batch)]
            decode_jpeg(part, mode=ImageReadMode.RGB, device="cuda")
            stream.synchronize()
            n, i = n + batch, i + batch
    out["decode_img_s"] = n / (time.perf_counter() - t0)


def matmul_loop(seconds: float, stream, out: dict) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    n, t0 = 0, time.perf_counter()
    with torch.cuda.stream(stream):
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                a @ a
            stream.synchronize()
            n += 10
    out["matmul_it_s"] = n / (time.perf_counter() - t0)


def concurrent(ps, batch: int, seconds: float) -> dict:
    out: dict = {}
    threads = [threading.Thread(target=decode_loop, args=(ps, batch, seconds, torch.cuda.Stream(), out)),
               threading.Thread(target=matmul_loop, args=(seconds, torch.cuda.Stream(), out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def traced(ps, batch: int, seconds: float) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        concurrent(ps, batch, seconds)
    calls: Counter = Counter()
    kernels: list[tuple[str, float, float]] = []
    for e in prof.events():
        name = e.name
        if name.startswith("cuda") and e.device_type.name == "CPU":
            calls[name] += 1
        elif e.device_type.name == "CUDA":
            kernels.append((name, e.time_range.start, e.time_range.end))
    def is_gemm(name: str) -> bool:  # the matmul loop's kernels (cuBLAS / CUTLASS names on Hopper)
        return any(k in name.lower() for k in ("gemm", "sm90", "cutlass"))

    gemm = sorted((s, t) for n, s, t in kernels if is_gemm(n))
    other = [(n, s, t) for n, s, t in kernels if not is_gemm(n)]
    overlap = total = 0.0
    for _, s, t in other:
        total += t - s
        for gs, gt in gemm:  # quadratic, but a few seconds of trace is a few thousand kernels
            if gs >= t:
                break
            overlap += max(0.0, min(t, gt) - max(s, gs))
    names = Counter(n for n, _, _ in other)
    return {"runtime_calls": dict(calls.most_common(25)), "decode_side_kernels": dict(names.most_common(15)),
            "decode_side_kernel_us": total, "decode_side_overlapping_gemm_share": overlap / total if total else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--folder", type=Path, default=Path("/tmp/diag-jpegs"))
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    ps = compact_copy(args.folder, args.images)
    decode_loop(ps, args.batch, 2.0, torch.cuda.Stream(), {})  # warm-up: decoder state, buffers
    alone_d, alone_m = {}, {}
    decode_loop(ps, args.batch, args.seconds, torch.cuda.Stream(), alone_d)
    matmul_loop(args.seconds, torch.cuda.Stream(), alone_m)
    both = concurrent(ps, args.batch, args.seconds)
    a, b = alone_d["decode_img_s"], alone_m["matmul_it_s"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "compact_kb_per_image": ps.meta["bytes"] / len(ps) / 1e3,
              "decode_alone_img_s": a, "matmul_alone_it_s": b, "concurrent": both,
              "decode_kept": both["decode_img_s"] / a, "matmul_kept": both["matmul_it_s"] / b,
              "serialised_would_keep": "decode_kept + matmul_kept ~ 1; overlap: both near 1",
              "trace": traced(ps, args.batch, 2.0)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)
    return result


if __name__ == "__main__":
    main()
