"""Dynamic batching: request handlers enqueue decoded images and await; one worker task owns the device, gathers
up to ``max_batch`` images (waiting at most ``max_wait_ms`` after the first), runs one pass for every task and
hands each request its rows."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from scenarios.streaming import pad_batch

from .holder import ModelHolder, Served
from .metrics import Metrics


@dataclass
class Answer:
    """One image's logits for every task (host float32 rows) and the model version that computed them."""

    logits: dict[str, np.ndarray]
    version: int
    served: Served = field(repr=False)


def bucket_for(n: int, max_batch: int) -> int:
    """The batch size a pass of ``n`` images runs at: the next power of two, capped at ``max_batch`` (so a few
    graphs cover every size, and a fixed image meets the same kernels whatever else shares its batch bucket)."""
    if not 1 <= n <= max_batch:
        raise ValueError(f"need 1 <= n <= max_batch, got n={n}, max_batch={max_batch}")
    return min(1 << (n - 1).bit_length(), max_batch)


class Batcher:
    def __init__(self, holder: ModelHolder, metrics: Metrics, *, max_batch: int, max_wait_ms: float,
                 amp: bool, cuda_graphs: bool = True) -> None:
        self.holder, self.metrics = holder, metrics
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1e3
        self.amp = amp and holder.device.type == "cuda"
        self.graphs = cuda_graphs and holder.device.type == "cuda"
        self.queue: asyncio.Queue = asyncio.Queue()
        self.passes = 0

    async def submit(self, image: np.ndarray) -> Answer:
        """``image``: ``(H, W, 3)`` uint8, already shrunk (see :func:`serving.app.decode_upload`)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        self.metrics.queue_depth.set(self.queue.qsize())
        return await future

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            self.metrics.queue_depth.set(self.queue.qsize())
            served = self.holder.current  # one model per batch: a swap lands between batches
            t0 = time.perf_counter()
            try:
                rows = await asyncio.to_thread(self._forward, served, [img for img, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.passes += 1
            self.metrics.pass_seconds.observe(time.perf_counter() - t0)
            self.metrics.batch_size.observe(len(batch))
            for (_, fut), logits in zip(batch, rows):
                if not fut.done():
                    fut.set_result(Answer(logits, served.version, served))

    def warm(self, served: Served) -> None:
        """Capture every bucket's graph for ``served`` now (a capture takes a few eager passes; a request that
        met one would wait for it). Runs before the batch worker starts, so nothing else uses the device."""
        if not self.graphs:
            return
        side = served.stage.pre.img_size
        blank = np.zeros((side, side, 3), dtype=np.uint8)
        for bucket in sorted({bucket_for(n, self.max_batch) for n in range(1, self.max_batch + 1)}):
            self._forward(served, [blank] * bucket, observe=False)

    def _forward(self, served: Served, images: list[np.ndarray], *,
                 observe: bool = True) -> list[dict[str, np.ndarray]]:
        """One pass: pad the images into a batch, crop and normalise on the device, every task's logits (one
        copy to the host for all tasks: a copy per task is a synchronisation per task)."""
        t0 = time.perf_counter()
        cuda = self.holder.device.type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda and observe else None
        if events:
            events[0].record()
        canvas, hw = pad_batch(images, pin=cuda)
        x, _ = served.stage(canvas, hw, torch.zeros(len(images), dtype=torch.int64), train=False)
        if self.graphs:
            out = self._replay(served, x)
        else:
            with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = served.net(x, original=False)
        if events:
            events[1].record()
        names = [name for name in out if name in served.classes]
        host = torch.cat([out[name][: len(images)].float() for name in names], dim=1).cpu().numpy()
        bounds = np.cumsum([0] + [out[name].shape[1] for name in names])
        if observe:
            if events:
                self.metrics.pass_device_seconds.observe(events[0].elapsed_time(events[1]) / 1e3)
            self.metrics.pass_thread_seconds.observe(time.perf_counter() - t0)
        return [{name: row[a:b] for name, a, b in zip(names, bounds[:-1], bounds[1:])} for row in host]

    def _replay(self, served: Served, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pass as a CUDA graph at ``x``'s bucket (rows padded with copies of the last image); eager Python
        launches hundreds of small kernels per pass, which starves the event loop's threads of the GIL."""
        from continual_mem.graphs import GraphedForward

        bucket = bucket_for(len(x), self.max_batch)
        if bucket > len(x):
            x = torch.cat([x, x[-1:].expand(bucket - len(x), *x.shape[1:])])
        graph = served.graphs.get(bucket)
        if graph is None:
            graph = served.graphs[bucket] = GraphedForward(
                served.net, x, tasks=served.net.task_names, autocast_dtype=torch.bfloat16 if self.amp else None)
        return graph(x)
