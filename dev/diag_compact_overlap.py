"""Does batched GPU JPEG decoding overlap a busy GPU? (docs/data_at_scale.md) One GPU call per question.

1. Rates, per host share of the decoding (:mod:`scenarios.gpu_jpeg`: 0 is nvJPEG alone, 1 host threads alone):
   decoding a compact copy's batches alone; a bf16 matmul loop (a stand-in for the training step) alone; both at
   once, the decode in a thread as ``CompactImages`` does it. Overlap keeps both near their solo rates.
2. A profiler trace of the concurrent phase: CUDA runtime calls made in the process (per image, a pageable copy
   and an event wait show a decoder that queues each image behind the training kernels) and the decode kernels'
   names, with the share of decode-kernel time that overlaps matmul kernels.

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
from scenarios.gpu_jpeg import JpegBatchDecoder  # noqa: E402
from scenarios.synthetic import make_image_folder  # noqa: E402


def compact_copy(folder: Path, images: int) -> prepared.PreparedSet:
    if not (folder / ".complete").is_file():
        make_image_folder(folder, classes=10, per_class=images // 10, size=(500, 375), portrait_every=7,
                          workers=host_cores())
        (folder / ".complete").write_text("ok")
    data = datasets.load(f"imagefolder:{folder}")
    return prepared.prepare(reader_for(data.train), name="diag", split="train", class_names=data.class_names,
                            root=Path(str(folder) + ".prepared"), opts=prepared.PrepareOptions(encoding="jpeg"))


def decode_loop(ps, batch: int, seconds: float, share: float, out: dict) -> None:
    decoder = JpegBatchDecoder("cuda", share=share)
    blobs = ps.encoded(np.arange(len(ps)))
    n, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        rows = (i + np.arange(batch)) % len(blobs)
        decoder.decode([blobs[k] for k in rows], rows)  # returns with the batch decoded
        n, i = n + batch, i + batch
    out["decode_img_s"] = n / (time.perf_counter() - t0)


def matmul_loop(seconds: float, out: dict) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    n, t0 = 0, time.perf_counter()
    with torch.cuda.stream(stream):
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                a @ a
            stream.synchronize()
            n += 10
    out["matmul_it_s"] = n / (time.perf_counter() - t0)


def concurrent(ps, batch: int, seconds: float, share: float) -> dict:
    out: dict = {}
    threads = [threading.Thread(target=decode_loop, args=(ps, batch, seconds, share, out)),
               threading.Thread(target=matmul_loop, args=(seconds, out))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def traced(ps, batch: int, seconds: float, share: float) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        concurrent(ps, batch, seconds, share)
    calls: Counter = Counter()
    kernels: list[tuple[str, float, float]] = []
    for e in prof.events():
        if e.name.startswith("cuda") and e.device_type.name == "CPU":
            calls[e.name] += 1
        elif e.device_type.name == "CUDA":
            kernels.append((e.name, e.time_range.start, e.time_range.end))

    def is_gemm(name: str) -> bool:  # the matmul loop's kernels (cuBLAS / CUTLASS names on Hopper)
        return any(k in name.lower() for k in ("gemm", "sm90", "cutlass"))

    gemm = sorted((s, t) for n, s, t in kernels if is_gemm(n))
    other = [(n[:120], s, t) for n, s, t in kernels if not is_gemm(n)]
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
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--folder", type=Path, default=Path("/tmp/diag-jpegs"))
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    ps = compact_copy(args.folder, args.images)
    alone_m: dict = {}
    matmul_loop(args.seconds, alone_m)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "compact_kb_per_image": ps.meta["bytes"] / len(ps) / 1e3, "matmul_alone_it_s": alone_m["matmul_it_s"],
              "host_shares": {}}
    for share in (0.0, 0.5, 1.0):
        decode_loop(ps, args.batch, 2.0, share, {})  # warm-up: decoder state, buffers
        alone: dict = {}
        decode_loop(ps, args.batch, args.seconds, share, alone)
        both = concurrent(ps, args.batch, args.seconds, share)
        result["host_shares"][str(share)] = {
            "decode_alone_img_s": alone["decode_img_s"], "concurrent": both,
            "decode_kept": both["decode_img_s"] / alone["decode_img_s"],
            "matmul_kept": both["matmul_it_s"] / alone_m["matmul_it_s"],
            "trace": None if args.no_trace or share == 1.0 else traced(ps, args.batch, 2.0, share)}
        print(json.dumps({share: {k: v for k, v in result["host_shares"][str(share)].items() if k != "trace"}}),
              flush=True)
    text = json.dumps(result, indent=1)
    if args.json_out:
        args.json_out.write_text(text)
    return result


if __name__ == "__main__":
    main()
