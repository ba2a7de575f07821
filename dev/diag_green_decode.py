"""Does reserving SMs for the decoder let nvJPEG overlap a busy GPU? (docs/data_at_scale.md, session 22)

torchvision's nvJPEG path runs a small kernel and an event wait per image on a pool stream of its own; beside a
GPU kept full by training, each image waits behind the training kernels (session 20: the decode keeps 7-11% of its
solo rate). A CUDA green context that holds all but R of the SMs for the training stream leaves R SMs where only
the decoder's kernels run. This measures, for each R: a matmul loop (shaped like a ViT-S MLP at batch 256, eager
and as a CUDA graph) alone and beside a thread decoding a compact copy's batches, as ``CompactImages`` does.

    python dev/diag_green_decode.py --reserve 0,4,8,16 --json-out diag.json     # on a CUDA host
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diag_compact_overlap import compact_copy, decode_loop  # noqa: E402


def green(reserve: int):
    """A stream on a green context of all SMs but ``reserve`` (None for 0), and the context to keep alive."""
    if reserve == 0:
        return None, torch.cuda.Stream()
    from torch.cuda.green_contexts import GreenContext

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    try:
        ctx = GreenContext(num_sms=sms - reserve)
    except TypeError:
        ctx = GreenContext.create(sms - reserve, 0)
    if hasattr(ctx, "Stream"):
        return ctx, ctx.Stream()
    ctx.set_context()
    stream = torch.cuda.current_stream()
    ctx.pop_context()
    return ctx, stream


def matmul_loop(stream, seconds: float, graphed: bool, out: dict) -> None:
    x = torch.randn(256 * 197, 384, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(384, 1536, device="cuda", dtype=torch.bfloat16)
    w2 = torch.randn(1536, 384, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()

    def step():
        y = x
        for _ in range(12):
            y = torch.nn.functional.gelu(y @ w1) @ w2
        return y

    with torch.cuda.stream(stream):
        step()
        if graphed:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream):
                step()
            run = g.replay
        else:
            run = step
        stream.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(5):
                run()
            stream.synchronize()
            n += 5
    out["step_it_s"] = n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--reserve", default="0,4,8,16")
    p.add_argument("--folder", type=Path, default=Path("/tmp/diag-jpegs"))
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    import torch.cuda.green_contexts as gc
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "sms": torch.cuda.get_device_properties(0).multi_processor_count,
              "green_api": [n for n in dir(gc.GreenContext) if not n.startswith("__")],
              "green_init": str(inspect.signature(gc.GreenContext.__init__)), "runs": {}}
    print(json.dumps(result), flush=True)
    ps = compact_copy(args.folder, args.images)
    decode_loop(ps, args.batch, 2.0, 0.0, {})
    solo: dict = {}
    decode_loop(ps, args.batch, args.seconds, 0.0, solo)
    result["decode_alone_img_s"] = solo["decode_img_s"]
    for reserve in (int(r) for r in args.reserve.split(",")):
        try:
            ctx, stream = green(reserve)
        except Exception as e:  # report and go on: the point is which settings work here
            result["runs"][reserve] = {"error": repr(e)}
            print(reserve, repr(e), flush=True)
            continue
        for graphed in (False, True):
            alone: dict = {}
            matmul_loop(stream, args.seconds, graphed, alone)
            both: dict = {}
            ts = [threading.Thread(target=decode_loop, args=(ps, args.batch, args.seconds, 0.0, both)),
                  threading.Thread(target=matmul_loop, args=(stream, args.seconds, graphed, both))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            row = {"step_alone_it_s": alone["step_it_s"], "step_beside_decode_it_s": both["step_it_s"],
                   "decode_beside_img_s": both["decode_img_s"],
                   "decode_kept": both["decode_img_s"] / solo["decode_img_s"]}
            result["runs"][f"{reserve}{'-graph' if graphed else ''}"] = row
            print(reserve, graphed, json.dumps(row), flush=True)
        del ctx
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
