"""Decoding uploads off the event loop: in a pool of worker processes on a GPU server, threads otherwise.

Why processes: on a GPU server the one Python process that parses requests also launches every pass. Decoding
threads (one per core) contend with the batch worker for the GIL, and each of a pass's GIL hand-offs can then wait a
switch interval. Measured on an H100 host with 16 decoding threads and 64 clients: 121 ms per pass of 26 images,
against 32 ms per 64 images offline. Worker processes take decoding's Python work out of that process; bytes go in,
a shrunk uint8 array comes back.
"""
from __future__ import annotations

import asyncio
import io
import multiprocessing
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Literal

import numpy as np
from fastapi import HTTPException

from scenarios.decode import MAX_ASPECT, SHORT_SIDE, BadImage, decode_shrunk, host_cores

DecodeWorkers = Literal["auto", "threads", "processes"]


def use_processes(workers: DecodeWorkers, device: str) -> bool:
    """``auto``: processes when the model runs on a GPU (the host's cores are free for decoding), threads on the
    CPU (where the pass itself needs the cores, and spawning workers would only add start-up time)."""
    return workers == "processes" or (workers == "auto" and device.startswith("cuda"))


def check_header(data: bytes, *, name: str, max_pixels: int) -> None:
    """HTTP 400 / 413 with one line for an upload that is not an image or too large, read from its header
    alone (PIL parses the markers up to the size, tens of microseconds; nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as exc:  # PIL refuses to open twice its own pixel limit: too large, not bad
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than PIL opens"
        raise HTTPException(413, f"{name}: {size}; the limit is {max_pixels:,}") from None
    except Exception:  # noqa: BLE001 - PIL raises many types
        raise HTTPException(400, f"{name}: not an image (JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
    if w * h > max_pixels:
        raise HTTPException(413, f"{name}: {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}")


def decode_upload(data: bytes, *, name: str, max_pixels: int) -> np.ndarray:
    """An upload as an ``(H, W, 3)`` uint8 array shrunk to the serving short side; HTTP 400 / 413 with one line
    for what is not an image or too large (the size is read from the header, before decoding)."""
    check_header(data, name=name, max_pixels=max_pixels)
    try:
        return decode_shrunk(data, short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
    except BadImage as exc:
        raise HTTPException(400, f"{name}: cannot decode the image ({exc})") from None


def _decode_in_worker(data: bytes, name: str, max_pixels: int) -> tuple:
    """:func:`decode_upload` in a worker: the array and the seconds it took, or the HTTP status and message (plain
    values cross the process boundary; the exception is raised again in the server)."""
    t0 = time.perf_counter()
    try:
        return ("ok", decode_upload(data, name=name, max_pixels=max_pixels), time.perf_counter() - t0)
    except HTTPException as exc:
        return ("error", exc.status_code, exc.detail)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker: the pool is the parallelism


def _ready() -> int:
    return 0


class Decoders:
    """The pool that decodes uploads (see the module's docstring)."""

    def __init__(self, *, processes: bool, workers: int | None = None,
                 on_decoded: Callable[[float], None] | None = None) -> None:
        self.processes, self.on_decoded = processes, on_decoded
        self.workers = workers or host_cores()
        self.pool: Executor = (
            ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
            if processes else ThreadPoolExecutor(self.workers, thread_name_prefix="decode"))

    async def start(self) -> None:
        """Start every worker now (a spawned worker imports torch), not on the first requests."""
        if self.processes:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self.pool, _ready) for _ in range(self.workers)))

    async def decode(self, data: bytes, *, name: str, max_pixels: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.pool, _decode_in_worker, data, name, max_pixels)
        if result[0] == "error":
            raise HTTPException(result[1], result[2])
        if self.on_decoded is not None:
            self.on_decoded(result[2])
        return result[1]

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
