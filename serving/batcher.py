"""Dynamic batching: request handlers enqueue images and await; one worker task owns the device, gathers up to
``max_batch`` images (waiting at most ``max_wait_ms`` after the first), runs one pass and hands each request its rows.
A pass computes every task when every image asks for all of them; when some image names its tasks, a routed pass
(:meth:`~continual_mem.model.MemoryViT.forward_routed`) computes for each image only the tasks it asked for.

An image is either decoded already (an ``(H, W, 3)`` uint8 array from the host decoders) or, with
``device_decode``, the bytes of a JPEG that the pass decodes on the model's device (:mod:`serving.device_decode`)."""
from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from continual_mem.sm_partition import partition
from scenarios.decode import MAX_ASPECT, SHORT_SIDE, BadImage
from scenarios.streaming import pad_batch

from . import admission, agnostic
from .device_decode import decode_jpegs
from .holder import ModelHolder, Served
from .metrics import Metrics
from .routing import answer_rows, bucket_for, routes_for, warm_every_task


@dataclass
class Answer:
    """One image's logits for every task (host float32 rows), the model version that computed them, and that
    model's class names (``served.classes``: a :class:`Served`, or its :class:`~serving.engine.ModelView` on the
    HTTP side of a shared model process)."""

    logits: dict[str, np.ndarray]
    version: int
    served: Served = field(repr=False)


def _fail(batch: list, exc: Exception) -> None:
    for _, _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


@dataclass
class _Launched:
    """A pass whose device work is queued: what reading its answers back needs."""

    bad: list[BadImage | None]
    host: torch.Tensor | None = None  # every task's logits, copied into pinned memory behind the pass
    done: torch.cuda.Event | None = None  # recorded after that copy (CUDA)
    events: list | None = None  # around the pass, for its GPU time
    columns: list[tuple[str, int, int]] = field(default_factory=list)  # every row's (task, start, end) in a row
    thread_s: float = 0.0
    rows: list[list[tuple[str, int, int]]] | None = None  # routed: each row's own (task, start, end) in ``host``


class Batcher:
    """``overlap``: launch a batch's pass before the previous pass's answers are read back, so the host prepares
    one pass (decode inputs, layout, graph launch) while the GPU runs the other; at most two passes are in flight.
    Answers do not change: each pass is the same kernels on the same stream, and its logits are copied out before
    the next replay of its graph writes the same buffers."""

    def __init__(self, holder: ModelHolder, metrics: Metrics, *, max_batch: int, max_wait_ms: float,
                 amp: bool, cuda_graphs: bool = True, device_decode: bool = False, overlap: bool = False,
                 decoder_sms: int = 0) -> None:
        self.holder, self.metrics = holder, metrics
        # SMs the pass (and its graphs' capture) leaves to the next batch's nvJPEG decode: beside a pass on every SM
        # each of the decoder's small kernels waits for the pass's blocks to drain (continual_mem.sm_partition)
        self.decoder_sms = decoder_sms
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1e3
        self.amp = amp and holder.device.type == "cuda"
        self.graphs = cuda_graphs and holder.device.type == "cuda"
        self.device_decode, self.overlap = device_decode, overlap
        self.queue: asyncio.Queue = asyncio.Queue()
        self.waiting: collections.deque = collections.deque()  # left out of a pass to fit its slots: first next time
        self.passes = 0

    async def submit(self, image: np.ndarray | bytes, tasks: tuple[str, ...] | None = None) -> Answer:
        """``image``: ``(H, W, 3)`` uint8 already shrunk (:func:`serving.decoding.decode_upload`), or with
        ``device_decode`` a complete JPEG's bytes; :class:`BadImage` if the pass cannot decode it. ``tasks``: the
        tasks this image needs (``None``: every task)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, tasks, future))
        self.metrics.queue_depth.set(self.queue.qsize() + len(self.waiting))
        return await future

    async def _gather(self, *, wait: bool) -> list:
        """The next batch: the first queued image, what else is queued, and (``wait``) what arrives within
        ``max_wait`` of the first, up to ``max_batch``. With a pass in flight there is no waiting: the GPU is busy,
        and its answers are read back only after this batch is launched."""
        batch = [self.waiting.popleft() if self.waiting else await self.queue.get()]
        while self.waiting and len(batch) < self.max_batch:
            batch.append(self.waiting.popleft())
        deadline = time.monotonic() + (self.max_wait if wait else 0.0)
        while len(batch) < self.max_batch:
            try:  # what queued up during the last pass, without a timer each
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        self.metrics.queue_depth.set(self.queue.qsize() + len(self.waiting))
        return batch

    async def run(self) -> None:
        ahead = None  # a launched pass whose answers are not read back yet (overlap)
        while True:
            if ahead is not None and self.queue.empty():
                await self._deliver(*ahead)
                ahead = None
            batch = await self._gather(wait=ahead is None)
            served = self.holder.current  # one model per batch: a swap lands between batches
            if served.paged_tasks:  # a pass within the paged tasks' slots; the rest go first next time
                batch, later = admission.split(batch, [tasks for _, tasks, _ in batch], paged=served.paged_tasks,
                                               slots=served.net.resident_tasks, every=served.net.task_names)
                self.waiting.extendleft(reversed(later))
            t0 = time.perf_counter()
            try:
                launched = await asyncio.to_thread(self._launch_in_turn, served, [img for img, _, _ in batch],
                                                   [tasks for _, tasks, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error, the worker lives on
                _fail(batch, exc)
                continue
            if ahead is not None:
                await self._deliver(*ahead)
                ahead = None
            if self.overlap:
                ahead = (batch, served, launched, t0)
            else:
                await self._deliver(batch, served, launched, t0)

    async def _deliver(self, batch: list, served: Served, launched: _Launched, t0: float) -> None:
        """Read a launched pass's answers back and hand each request its rows."""
        try:
            rows = (await asyncio.to_thread(self._finish, launched) if launched.done is not None
                    else self._finish(launched))
        except Exception as exc:  # noqa: BLE001
            _fail(batch, exc)
            return
        self.passes += 1
        self.metrics.pass_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(batch))
        for (_, _, fut), logits in zip(batch, rows):
            if fut.done():
                continue
            if isinstance(logits, BadImage):
                fut.set_exception(logits)
            else:
                fut.set_result(Answer(logits, served.version, served))

    def _launch_in_turn(self, served: Served, images: list[np.ndarray | bytes],
                        asked: list[tuple[str, ...] | None]) -> _Launched:
        with self.holder.cpu_turns:  # on the CPU, never beside a model load (see ModelHolder.cpu_turns)
            return self._launch(served, images, asked=asked)

    def warm(self, served: Served) -> None:
        """Capture every bucket's graph for ``served`` now (a capture takes a few eager passes; a request that
        met one would wait for it) and start the device's JPEG decoder. At start-up this runs before the batch
        worker starts; for a model loaded later, in the loader's thread while the worker serves the current model
        (captures are thread-local, and the two models share no graph, stage or buffer)."""
        if not (self.graphs or self.device_decode):
            return
        side = served.stage.pre.img_size
        blank: np.ndarray | bytes = np.zeros((side, side, 3), dtype=np.uint8)
        if self.device_decode:  # also starts the decoder (nvJPEG's first call sets up its state)
            from torchvision.io import encode_jpeg

            blank = encode_jpeg(torch.zeros((3, side, side), dtype=torch.uint8)).numpy().tobytes()
        buckets = {bucket_for(n, self.max_batch) for n in range(1, self.max_batch + 1)} if self.graphs else {1}
        routed = [(served.net.task_names[0],)] if self.graphs and served.net.task_names else []
        every = warm_every_task(len(served.net.task_names), paged=served.paged)
        for bucket in sorted(buckets):
            if every or not routed:
                self._forward(served, [blank] * bucket, observe=False)
            if routed:  # and the bucket's routed graph (if the model has grouped tasks), for requests naming tasks
                self._forward(served, [blank] * bucket, observe=False, asked=routed * bucket)

    def _forward(self, served: Served, images: list[np.ndarray | bytes], *, observe: bool = True,
                 asked: list[tuple[str, ...] | None] | None = None) -> list[dict[str, np.ndarray] | BadImage]:
        """One pass, launched and read back (see :meth:`_launch` and :meth:`_finish`)."""
        return self._finish(self._launch(served, images, observe=observe, asked=asked), observe=observe)

    def _launch(self, served: Served, images: list[np.ndarray | bytes], *, observe: bool = True,
                asked: list[tuple[str, ...] | None] | None = None) -> _Launched:
        """Queue one pass on the device: the images as one batch (decoding the JPEGs there with
        ``device_decode``), cropped and normalised, every task's logits, and one copy of them all into pinned host
        memory (a copy per task is a synchronisation per task). An image that cannot be decoded gets its
        :class:`BadImage` instead of logits and leaves the others' pass as it is."""
        t0 = time.perf_counter()
        cuda = self.holder.device.type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda and observe else None
        if events:
            events[0].record()
        if self.device_decode:
            x, bad = self._on_device(served, images, observe=observe)
            if x is None:
                return _Launched(bad)
        else:
            bad = [None] * len(images)
            canvas, hw = pad_batch(images, pin=cuda)
            x, _ = served.stage(canvas, hw, torch.zeros(len(images), dtype=torch.int64), train=False)
        with partition(self.holder.device, self.decoder_sms):
            return self._pass(served, x, bad, asked, events, t0, observe=observe)

    def _pass(self, served: Served, x: torch.Tensor, bad: list, asked: list[tuple[str, ...] | None] | None,
              events: list | None, t0: float, *, observe: bool) -> _Launched:
        """The launch's model pass on the decoded batch ``x`` (the good images) and the copy of its answers."""
        good = [a for a, why in zip(asked or [None] * len(bad), bad) if why is None]
        good, wants = agnostic.split(good)  # task-agnostic asks: the backbone alone, and one answer over all tasks
        wants = wants if served.agnostic is not None else [False] * len(wants)
        routes = routes_for(good, served.net.task_names, route_all=served.paged)
        if routes is not None:
            return self._launch_routed(served, x, routes, bad, events, t0, wants=wants, observe=observe)
        if not served.classes:  # a model without tasks: every image gets an empty answer, no pass
            launched = self._copy_out(x.new_zeros(len(x), 0, dtype=torch.float32), bad, None, t0)
            launched.columns = []
            return launched
        if self.graphs:
            out = self._replay(served, x)
        else:
            with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = served.net(x, original=False)
        if events:
            events[1].record()
        names = [name for name in out if name in served.classes]
        bounds = np.cumsum([0] + [out[name].shape[1] for name in names])
        launched = self._copy_out(torch.cat([out[name][: len(x)].float() for name in names], dim=1), bad, events, t0)
        launched.columns = list(zip(names, bounds[:-1].tolist(), bounds[1:].tolist()))
        return launched

    def _copy_out(self, logits: torch.Tensor, bad: list, events: list | None, t0: float) -> _Launched:
        """One copy of a pass's answers into pinned host memory, queued behind the pass, and an event after it."""
        cuda = self.holder.device.type == "cuda"
        host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=cuda)
        host.copy_(logits, non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event(blocking=True)  # waited on without spinning a core
            done.record()
        return _Launched(bad, host, done, events, thread_s=time.perf_counter() - t0)

    def _to_bucket(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded to its batch bucket with copies of its last image."""
        bucket = bucket_for(len(x), self.max_batch)
        return x if bucket == len(x) else torch.cat([x, x[-1:].expand(bucket - len(x), *x.shape[1:])])

    def _launch_routed(self, served: Served, x: torch.Tensor, routes: list[list[str]], bad: list,
                       events: list | None, t0: float, *, wants: list[bool], observe: bool) -> _Launched:
        """A routed pass (each image only its tasks) at ``x``'s bucket on CUDA (rows padded with copies of the
        last image, so an image meets the same kernels whatever shares its bucket): the bucket's routed CUDA graph
        when the routes fit it (:class:`~continual_mem.routed_graph.RoutedGraph`), else eager; one copy of the
        answers into pinned host memory. Task-agnostic asks (``wants``) take the eager pass (the graph has no
        backbone features)."""
        n = len(x)
        padded = self._to_bucket(x) if self.holder.device.type == "cuda" else x
        graphed = self._graph_pass(served, x, padded, routes) if self.graphs and not any(wants) else None
        if observe:  # a pass that leaves the graph costs the host a few hundred launches: worth seeing
            self.metrics.routed_passes.labels(path="eager" if graphed is None else "graph").inc()
        if graphed is not None:
            logits, rows = graphed
        else:
            x, routes = padded, routes + [routes[-1]] * (len(padded) - n)
            with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
                full = served.net.forward_routed(x, routes, original=any(wants))
                extra = agnostic.routed_answers(served, x, full, wants + [False] * (len(x) - n)) \
                    if any(wants) else {}
            rows, flat, at = [], [], 0
            for b, row in enumerate(full[:n]):
                rows.append([])
                for name in (name for name in row if name in served.classes):
                    rows[-1].append((name, at, at + row[name].shape[0]))
                    at += row[name].shape[0]
                    flat.append(row[name].float())
                if b in extra:
                    rows[-1].append((agnostic.AGNOSTIC, at, at + 2))
                    at += 2
                    flat.append(extra[b])
            logits = torch.cat(flat) if flat else torch.empty(0, device=x.device)
        if events:
            events[1].record()
        launched = self._copy_out(logits, bad, events, t0)
        launched.rows = rows
        return launched

    def _graph_pass(self, served: Served, x: torch.Tensor, padded: torch.Tensor,
                    routes: list[list[str]]) -> tuple[torch.Tensor, list[list[tuple[str, int, int]]]] | None:
        """The routed pass of ``x`` (the batch's good images; ``padded`` to its bucket) as a routed CUDA graph:
        the logits and each image's ``(task, start, end)`` in them; None where the graph cannot hold the routes
        (eager then). An image asking for more than one graph row holds (two forks of one family) takes several
        rows (:meth:`~continual_mem.routed_graph.RoutedGraph.split`), as many as ``max_batch`` allows."""
        graph = self._routed_graph(served, padded)
        split = graph.split(routes, most=self.max_batch) if graph is not None else None
        if split is None:
            return None
        parts, origin = split
        if len(parts) > len(x):  # (a pageable copy of the indices would wait for the pass in flight)
            idx = torch.tensor(origin)
            padded = self._to_bucket(x[idx.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else idx])
            graph = self._routed_graph(served, padded)
        layout = graph.layout(parts + [parts[-1]] * (len(padded) - len(parts)))
        if layout is None:
            return None
        logits = graph(padded, layout)[:len(parts)].float()
        return logits, answer_rows(layout.rows, origin, routes, logits.shape[1], served.classes)

    def _routed_graph(self, served: Served, x: torch.Tensor):
        """The routed CUDA graph of ``x``'s batch size (captured on first use), or None for a model without
        grouped tasks, batched forks or head tasks (:meth:`~continual_mem.routed_graph.RoutedGraph.routable`)."""
        from continual_mem.routed_graph import RoutedGraph

        key = ("routed", len(x))
        if key not in served.graphs:
            served.graphs[key] = RoutedGraph(served.net, x, autocast_dtype=torch.bfloat16 if self.amp else None) \
                if RoutedGraph.routable(served.net) else None
        return served.graphs[key]

    def _finish(self, launched: _Launched, *, observe: bool = True) -> list[dict[str, np.ndarray] | BadImage]:
        """Wait for a launched pass's copy and split its logits into each image's rows, task by task."""
        if launched.host is None:
            return list(launched.bad)
        t0 = time.perf_counter()
        if launched.done is not None:
            launched.done.synchronize()
        if observe:
            if launched.events:
                self.metrics.pass_device_seconds.observe(launched.events[0].elapsed_time(launched.events[1]) / 1e3)
            self.metrics.pass_thread_seconds.observe(launched.thread_s + time.perf_counter() - t0)
        flat = launched.host.numpy().reshape(-1)
        if launched.rows is None:  # one matrix: every row the same columns, ``width`` apart
            width = launched.host.shape[1]
            rows = iter([(name, i * width + lo, i * width + hi) for name, lo, hi in launched.columns]
                        for i in range(len(launched.host)))
        else:  # routed: each row's answers where the pass put them
            rows = iter(launched.rows)
        answers: list[dict[str, np.ndarray] | BadImage] = []
        for why in launched.bad:
            if why is not None:
                answers.append(why)
                continue
            answers.append({name: flat[lo:hi] for name, lo, hi in next(rows)})
        return answers

    def _on_device(self, served: Served, images: list[np.ndarray | bytes], *,
                   observe: bool) -> tuple[torch.Tensor | None, list[BadImage | None]]:
        """The batch decoded and laid out on the device: JPEG bytes through one batched decode, host-decoded
        arrays uploaded as they are. Returns the model input of the good images (``None`` if there is none) and,
        per image, ``None`` or why it could not be decoded."""
        device = self.holder.device
        jpegs = [i for i, im in enumerate(images) if isinstance(im, (bytes, bytearray))]
        decoded = dict(zip(jpegs, decode_jpegs([images[i] for i in jpegs], device=device, short_side=SHORT_SIDE,
                                               max_aspect=MAX_ASPECT))) if jpegs else {}
        tensors, bad = [], []
        for i, im in enumerate(images):
            t = decoded[i] if i in decoded else torch.from_numpy(im).permute(2, 0, 1).to(device, non_blocking=True)
            bad.append(t if isinstance(t, BadImage) else None)
            if not isinstance(t, BadImage):
                tensors.append(t)
        if observe:
            self.metrics.device_decoded.inc(len(jpegs))
        return (served.stage.from_images(tensors) if tensors else None), bad

    def _replay(self, served: Served, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pass as a CUDA graph at ``x``'s bucket (rows padded with copies of the last image); eager Python
        launches hundreds of small kernels per pass, which starves the event loop's threads of the GIL."""
        from continual_mem.graphs import GraphedForward

        x = self._to_bucket(x)
        bucket = len(x)
        graph = served.graphs.get(bucket)
        if graph is None:
            graph = served.graphs[bucket] = GraphedForward(
                served.net, x, tasks=served.net.task_names, autocast_dtype=torch.bfloat16 if self.amp else None)
        return graph(x)
