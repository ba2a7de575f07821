"""How long a serving pass takes when another thread keeps the GIL busy, against the interpreter's switch interval.

The server's batch worker spends most of a GPU pass outside the GIL (graph replay, the device-to-host copy) and
takes the GIL back several times per pass; the event loop, parsing HTTP, holds it in between. A thread that wants
the GIL back waits up to ``sys.getswitchinterval()`` (5 ms by default) for the holder to drop it, once per
hand-off. This script reproduces that on the CPU: a stand-in pass (``--handoffs`` waits of ``--wait-ms`` outside
the GIL, a little Python after each) timed alone and beside a busy pure-Python thread, at several intervals.

    python benchmarks/gil_handoff.py [--handoffs 6] [--wait-ms 0.3] [--intervals 5,1,0.5,0.2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def stand_in_pass(handoffs: int, wait_s: float) -> float:
    t0 = time.perf_counter()
    for _ in range(handoffs):
        time.sleep(wait_s)  # outside the GIL, as a replay or a device sync is
        sum(range(200))  # the Python between two waits
    return time.perf_counter() - t0


def median_ms(handoffs: int, wait_s: float, passes: int) -> float:
    return 1e3 * statistics.median(stand_in_pass(handoffs, wait_s) for _ in range(passes))


def with_busy_thread(handoffs: int, wait_s: float, passes: int, interval_s: float) -> float:
    stop = threading.Event()

    def busy() -> None:  # the event loop's share: pure Python, never waiting
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    before = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    thread = threading.Thread(target=busy)
    thread.start()
    try:
        time.sleep(0.05)
        return median_ms(handoffs, wait_s, passes)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(before)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--handoffs", type=int, default=6, help="GIL hand-offs per pass")
    p.add_argument("--wait-ms", type=float, default=0.3, help="time outside the GIL per hand-off")
    p.add_argument("--passes", type=int, default=200)
    p.add_argument("--intervals", default="5,1,0.5,0.2", help="switch intervals to try, ms")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    wait = args.wait_ms / 1e3
    alone = median_ms(args.handoffs, wait, args.passes)
    rows = [{"switch_interval_ms": float(ms), "pass_ms": with_busy_thread(args.handoffs, wait, args.passes, ms / 1e3)}
            for ms in (float(v) for v in args.intervals.split(","))]
    for r in rows:
        r["x_alone"] = r["pass_ms"] / alone
    result = {"environment": {"python": sys.version.split()[0], "command": " ".join(sys.argv),
                              "handoffs": args.handoffs, "wait_ms": args.wait_ms, "passes": args.passes},
              "alone_ms": alone, "rows": rows}
    common.report(result, f"stand-in pass, {args.handoffs} GIL hand-offs (alone {alone:.2f} ms)",
                  ["switch interval ms", "pass ms beside a busy thread", "x alone"],
                  [[f"{r['switch_interval_ms']:g}", f"{r['pass_ms']:.2f}", f"{r['x_alone']:.1f}"] for r in rows],
                  args.json_out)
    return result


if __name__ == "__main__":
    main()
