"""``prepare`` at scale: a generated JPEG folder of ``--images`` images turned into a prepared copy (all host cores,
resumable), timed, with bytes per image against the source JPEGs and the peak memory of the process tree.

With ``--interrupt-after S`` the first build is stopped after S seconds (SIGINT, as a user's Ctrl-C) and started
again: the report then shows that the resumed build finishes the copy from where it stopped, and that its bytes equal
an uninterrupted build's (``--check-against-fresh``, small folders only: it builds the copy a second time).

    python benchmarks/prepare_scale.py --images 200000 --folder /tmp/jpegs-200k --encoding jpeg --interrupt-after 120
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from data_throughput import Probe  # noqa: E402

from scenarios.decode import host_cores  # noqa: E402
from scenarios.synthetic import make_image_folder  # noqa: E402


def build(folder: Path, cache: Path, encoding: str, *, interrupt_after: float | None) -> dict:
    """``continual-mem prepare`` in a child process (what a user runs), optionally interrupted once."""
    cmd = [sys.executable, "-m", "cli", "prepare", f"imagefolder:{folder}", "--cache-dir", str(cache),
           "--format", encoding, "--json"]
    t0 = time.perf_counter()
    stopped_at, resumed_from = None, None
    with Probe() as probe:
        if interrupt_after:  # SIGINT as Ctrl-C (restored: a shell's background job starts with it ignored)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            try:
                proc.wait(timeout=interrupt_after)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGINT)
                proc.wait()
                stopped_at = time.perf_counter() - t0
                progress = [json.loads(p.read_text()) for p in cache.glob("*/progress.json")]
                resumed_from = sum(p["rows"] for p in progress)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
    rows = json.loads(done.stdout)
    return {"encoding": encoding, "seconds": time.perf_counter() - t0, "interrupted_after_s": stopped_at,
            "images_done_when_interrupted": resumed_from, "splits": rows, **probe.finish()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--size", default="500x375", help="generated JPEG size, WxH")
    p.add_argument("--folder", type=Path, default=Path("/tmp/continual-mem-jpegs-scale"))
    p.add_argument("--cache-dir", type=Path, default=None, help="[default: FOLDER.prepared]")
    p.add_argument("--encoding", default="jpeg", choices=["jpeg", "raw"])
    p.add_argument("--interrupt-after", type=float, default=None, help="stop the first build after S seconds")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    marker = args.folder / ".complete"
    t0 = time.perf_counter()
    if not marker.is_file():
        make_image_folder(args.folder, classes=args.classes, per_class=args.images // args.classes, size=(w, h),
                          portrait_every=7, workers=host_cores())
        marker.write_text("ok")
    generated_s = time.perf_counter() - t0
    files = list(args.folder.rglob("*.jpg"))
    source_bytes = sum(f.stat().st_size for f in files)
    cache = args.cache_dir or Path(str(args.folder) + ".prepared")
    built = build(args.folder, cache, args.encoding, interrupt_after=args.interrupt_after)
    stored = sum(r["gigabytes"] for r in built["splits"]) * 1e9
    images = sum(r["images"] for r in built["splits"])
    result = {"environment": {"host_cores": host_cores(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "command": " ".join(sys.argv)},
              "source": {"folder": str(args.folder), "images": len(files), "bytes": source_bytes,
                         "kb_per_image": source_bytes / len(files) / 1e3, "generate_s": generated_s},
              "prepare": built, "images_per_s": images / built["seconds"], "kb_per_image": stored / images / 1e3,
              "x_source_bytes": stored / source_bytes}
    common.report(result, f"prepare {args.encoding}, {len(files):,} images, {host_cores()} cores",
                  ["images", "seconds", "img/s", "KB/img (source)", "x source bytes", "peak RSS GB",
                   "interrupted at s (images done)"],
                  [[f"{images:,}", f"{built['seconds']:.0f}", f"{result['images_per_s']:.0f}",
                    f"{result['kb_per_image']:.1f} ({result['source']['kb_per_image']:.1f})",
                    f"{result['x_source_bytes']:.2f}", f"{built['peak_rss_gb']:.2f}",
                    f"{built['interrupted_after_s']:.0f} ({built['images_done_when_interrupted']:,})"
                    if built["interrupted_after_s"] else "-"]], args.json_out)
    return result


if __name__ == "__main__":
    main()
