"""Diagnostic (GPU): where a served probe's routed answers change: batch composition, bucket, model reload, add.

    PYTHONPATH=/tmp/site:. python3 dev/diag_routed_bits.py --tasks 1000
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from serve_load import add_task, build_registry  # noqa: E402

from serving import ServeSettings  # noqa: E402
from serving.batcher import Batcher  # noqa: E402
from serving.holder import ModelHolder  # noqa: E402
from serving.metrics import Metrics  # noqa: E402


def image(rng, hw, jpeg: bool):
    """A smooth random photo-like image (as an array, or JPEG bytes of it)."""
    import io

    from PIL import Image

    small = rng.integers(0, 256, (hw[0] // 16, hw[1] // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((hw[1], hw[0]), Image.BICUBIC)
    if not jpeg:
        return np.asarray(img)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def diff(a: dict, b: dict) -> dict:
    return {t: float(np.abs(a[t] - b[t]).max()) for t in a if not np.array_equal(a[t], b[t])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--model", default="vit_small_patch14_dinov2")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--memory", type=int, default=5)
    p.add_argument("--fork-layers", type=int, default=0)
    p.add_argument("--head-tasks", action="store_true", help="the tasks are linear heads (serve_load's option)")
    p.add_argument("--probe-tasks", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--device-decode", action="store_true", help="JPEG uploads decoded by nvJPEG in the pass")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    reg_path = tmp / "reg.db"
    t0 = time.perf_counter()
    build_registry(reg_path, args, args.tasks)
    print(f"built K={args.tasks} in {time.perf_counter() - t0:.0f} s", flush=True)
    holder = ModelHolder(ServeSettings(registry=str(reg_path), device=args.device))
    served = holder.current = holder.load()
    dd = args.device_decode
    b = Batcher(holder, Metrics(), max_batch=64, max_wait_ms=5, amp=True, device_decode=dd)
    b.warm(served)
    rng = np.random.default_rng(0)
    probe = image(rng, (256, 341), dd)
    k = args.tasks
    asked = tuple(f"task{i}" for i in range(0, k, max(1, k // args.probe_tasks)))[: args.probe_tasks]
    alone = b._forward(served, [probe], asked=[asked], observe=False)[0]
    again = b._forward(served, [probe], asked=[asked], observe=False)[0]
    print("alone twice:", diff(alone, again))
    one = (asked[0],)
    alone1 = b._forward(served, [probe], asked=[one], observe=False)[0]
    for n in (1, 2, 3, 5, 8, 17, 33, 64):
        same_bucket, cross = 0, {}
        ref = b._forward(served, [probe] * n, asked=[asked] * n, observe=False)[0]
        ref1 = b._forward(served, [probe] * n, asked=[one] * n, observe=False)[0]
        for trial in range(3):
            others = [image(rng, (256, 300), dd) for _ in range(n - 1)]
            routes = [(f"task{rng.integers(k)}",) for _ in range(n - 1)]
            at = int(rng.integers(n))
            for ask, r, a in ((asked, ref, alone), (one, ref1, alone1)):
                imgs, asks = list(others), list(routes)
                imgs.insert(at, probe)
                asks.insert(at, ask)
                got = b._forward(served, imgs, asked=asks, observe=False)[at]
                d = diff(r, got)
                same_bucket += bool(d)
                if d:
                    print(f"  n={n} trial={trial} ask={len(ask)} at={at}: differs from same-size alone {d}")
                cross.update({(len(ask), t): v for t, v in diff(a, got).items()})
        print(f"n={n}: same-bucket mismatches {same_bucket}; vs bucket-1 alone: {len(cross)} tasks differ "
              f"(max {max(cross.values(), default=0):.2e})", flush=True)
    # a reload of the same version, then an added task
    again_served = holder.load()
    b.warm(again_served)
    print("reload, alone:", diff(alone, b._forward(again_served, [probe], asked=[asked], observe=False)[0]))
    from registry import Registry

    reg = Registry(reg_path)
    add_task(reg, reg.load(), f"task{k}", seed=1000, memory=args.memory, fork_layers=args.fork_layers,
             head=args.head_tasks)
    fresh = holder.load()
    b.warm(fresh)
    after = b._forward(fresh, [probe], asked=[asked], observe=False)[0]
    print("after add, alone:", diff(alone, after))
    no_graph = Batcher(holder, Metrics(), max_batch=64, max_wait_ms=5, amp=True, cuda_graphs=False,
                       device_decode=dd)
    print("eager (no graphs) old vs new:", diff(no_graph._forward(served, [probe], asked=[asked], observe=False)[0],
                                             no_graph._forward(fresh, [probe], asked=[asked], observe=False)[0]))
    print("eager vs graph old:", diff(alone, no_graph._forward(served, [probe], asked=[asked], observe=False)[0]))
    # as the server: another task added, the new model loaded and warmed in a thread while this one runs passes
    import threading

    add_task(reg, reg.load(), f"task{k + 1}", seed=1001, memory=args.memory, fork_layers=args.fork_layers,
             head=args.head_tasks)
    box: dict = {}

    def loader():
        m = holder.load()
        b.warm(m)
        box["m"] = m

    th = threading.Thread(target=loader)
    th.start()
    passes = 0
    while th.is_alive():
        n = int(rng.integers(1, 65))
        imgs = [image(rng, (256, 300), dd) for _ in range(n)]
        b._forward(fresh, imgs, asked=[(f"task{rng.integers(k)}",) for _ in range(n)], observe=False)
        passes += 1
    th.join()
    print(f"loaded beside {passes} passes, alone:",
          diff(alone, b._forward(box["m"], [probe], asked=[asked], observe=False)[0]))
    # the batch worker itself (overlap on), probes among random requests, as serve_load's clients send them
    import asyncio

    runner = Batcher(holder, Metrics(), max_batch=64, max_wait_ms=5, amp=True, device_decode=dd, overlap=True)
    holder.current = box["m"]

    async def load_and_probe():
        worker = asyncio.create_task(runner.run())
        moved = []

        async def client():
            for _ in range(40):
                await runner.submit(image(rng, (256, 300), dd), (f"task{rng.integers(k)}",))

        async def prober():
            for _ in range(40):
                got = await runner.submit(probe, asked)
                moved.append(diff(alone, got.logits))
                await asyncio.sleep(0.01)

        await asyncio.gather(prober(), *(client() for _ in range(32)))
        worker.cancel()
        return moved

    moved = asyncio.run(load_and_probe())
    print(f"batch worker with overlap: {sum(bool(m) for m in moved)} of {len(moved)} probes moved; "
          f"max {max((v for m in moved for v in m.values()), default=0):.2e}")


if __name__ == "__main__":
    main()
