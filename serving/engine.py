"""Where the model runs for the HTTP side: in the app's own process (:class:`LocalModel`), or in one model process
shared by every ``serve --workers N`` HTTP process (:func:`run_model_process`, reached through
:class:`ModelClient` over a Unix socket).

Why one model process: with a model per HTTP process, N CUDA contexts take turns on one GPU, and the 64 concurrent
requests split into N batches of a few images each. Measured on an H100 (64 clients, 4 processes, DINOv2 ViT-S/14,
K = 1): ~6 images per pass and 8.2 ms of GPU time per pass, where the offline pass does 64 images in 17 ms. With one
model process the HTTP processes parse and check uploads and pass on the JPEG bytes (nvJPEG decodes them in the
pass), so every request meets the same batch and one CUDA context owns the GPU.

Both sides offer the same interface to the app: ``current`` (the model's version, classes and tasks),
``await submit(image, tasks)`` (an :class:`~serving.batcher.Answer`, :class:`BadImage` for an image the pass cannot decode)
and ``await status()``.

Messages are length-prefixed pickles on a Unix socket the server's parent created (only processes of the same
user reach it). HTTP process -> model process: ``("predict", id, image, tasks)``, ``("status", id)``. Model process ->
HTTP process: ``("meta", version, classes, tasks)`` (at connection, at each swap, and before the first answer of a
version), ``("answer", id, version, logits)``, ``("bad", id, reason)``, ``("error", id, reason)``,
``("status", id, dict)``.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch

from continual_mem.sm_partition import sm_count
from scenarios.decode import BadImage

from .batcher import Answer, Batcher
from .holder import ModelHolder, Served
from .metrics import Metrics
from .settings import ServeSettings

log = logging.getLogger(__name__)

_SIZE = struct.Struct("!I")


async def read_message(reader: asyncio.StreamReader):
    size = _SIZE.unpack(await reader.readexactly(_SIZE.size))[0]
    return pickle.loads(await reader.readexactly(size))


def write_message(writer: asyncio.StreamWriter, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.writelines((_SIZE.pack(len(data)), data))


@dataclass(frozen=True)
class ModelView:
    """What the HTTP side knows of a served model: its version, class names and task list."""

    version: int
    classes: dict[str, tuple[str, ...]]
    tasks: list[dict]


def server_process_setup(settings: ServeSettings) -> None:
    """On CUDA: one intra-op thread (the model runs on the GPU; the host's cores decode and parse) and the GIL switch
    interval of ``settings.switch_interval_ms`` (a caller that outlives the server restores the old one)."""
    if settings.device.startswith("cuda"):
        torch.set_num_threads(1)
        sys.setswitchinterval(settings.switch_interval_ms / 1e3)


class LocalModel:
    """The model in this process: its holder (loads and swaps), its batcher (passes) and their loops."""

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.holder = ModelHolder(settings)
        self.batcher: Batcher | None = None
        self._loops: list[asyncio.Task] = []

    async def start(self) -> None:
        """Load the model, capture every bucket's graph before the first request, then start the batch worker and
        the registry watcher; each later model is prepared the same way before it is swapped in."""
        s, holder = self.settings, self.holder
        holder.current = await asyncio.to_thread(holder.load)
        self.batcher = Batcher(holder, self.metrics, max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, amp=s.amp,
                               cuda_graphs=s.cuda_graphs, device_decode=s.device_decode, overlap=s.overlap,
                               decoder_sms=s.held_sms(sm_count(holder.device)))
        await asyncio.to_thread(self.batcher.warm, holder.current)
        holder.prepare = self.batcher.warm
        self._note_swap(holder.current)
        holder.on_swap.append(self._note_swap)
        self._loops = [asyncio.create_task(self.batcher.run()), asyncio.create_task(holder.watch())]

    def _note_swap(self, served: Served) -> None:
        self.metrics.version.set(served.version)
        self.metrics.swaps.set(self.holder.swaps)

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()

    @property
    def current(self) -> Served:
        return self.holder.current

    async def submit(self, image: np.ndarray | bytes, tasks: tuple[str, ...] | None = None) -> Answer:
        return await self.batcher.submit(image, tasks)

    async def status(self) -> dict:
        return {"model_version": self.holder.current.version, "tasks": len(self.holder.current.tasks),
                "device": str(self.holder.device), "swaps": self.holder.swaps, "passes": self.batcher.passes,
                "model_pid": os.getpid()}


class _ModelProcess:
    """The model process's side of the socket: one connection per HTTP process, a task per image."""

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        self.seen: dict[asyncio.StreamWriter, int] = {}  # the last version each connection was told about
        self._pending: set[asyncio.Task] = set()

    def announce(self, served: Served, writer: asyncio.StreamWriter | None = None) -> None:
        """Tell every connection (or ``writer``) about ``served`` if it has not heard of that version yet."""
        for w in [writer] if writer is not None else list(self.seen):
            if self.seen.get(w) != served.version and not w.is_closing():
                self.seen[w] = served.version
                write_message(w, ("meta", served.version, served.classes, served.tasks))

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.seen[writer] = -1
        self.announce(self.model.current, writer)
        try:
            while True:
                message = await read_message(reader)
                if message[0] == "predict":
                    task = asyncio.create_task(self._predict(writer, message[1], message[2], message[3]))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
                elif message[0] == "status":
                    write_message(writer, ("status", message[1], await self.model.status()))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the HTTP process went away
        finally:
            self.seen.pop(writer, None)
            writer.close()

    async def _predict(self, writer: asyncio.StreamWriter, rid: int, image: np.ndarray | bytes,
                       tasks: tuple[str, ...] | None) -> None:
        try:
            answer = await self.model.submit(image, tasks)
        except BadImage as exc:
            reply = ("bad", rid, str(exc))
        except Exception as exc:  # noqa: BLE001 - the request fails, the model process lives on
            log.exception("pass failed")
            reply = ("error", rid, f"{type(exc).__name__}: {exc}")
        else:
            self.announce(answer.served, writer)  # the classes of a version reach the HTTP side before its answers
            reply = ("answer", rid, answer.version, answer.logits)
        if writer.is_closing():
            return
        write_message(writer, reply)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the HTTP process went away; its connection's reader ends it


def run_model_process(settings: dict, path: str, ready) -> None:
    """The model process's main (a ``multiprocessing`` spawn target): load and warm the model, listen on ``path``,
    set ``ready`` (a ``multiprocessing.Event``), serve until terminated."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: model process: %(message)s")
    asyncio.run(_model_process(ServeSettings(**settings), path, ready))


async def _model_process(settings: ServeSettings, path: str, ready) -> None:
    server_process_setup(settings)
    model = LocalModel(settings, Metrics())
    await model.start()
    side = _ModelProcess(model)
    model.holder.on_swap.append(side.announce)
    server = await asyncio.start_unix_server(side.connection, path=path)
    os.chmod(path, 0o600)
    log.info("serving %s version %d on %s", settings.model, model.current.version, model.holder.device)
    ready.set()
    async with server:
        await server.serve_forever()


class ModelUnavailable(RuntimeError):
    """The model process cannot be reached (it exited or was never started)."""


class ModelClient:
    """An HTTP process's handle on the shared model process (same interface as :class:`LocalModel`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.current: ModelView | None = None
        self._views: dict[int, ModelView] = {}
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(self.path)
        except OSError as exc:
            raise ModelUnavailable(f"cannot reach the model process at {self.path}: {exc}") from None
        self._on_message(await read_message(reader))  # the current model's meta comes first
        self._reader_task = asyncio.create_task(self._read(reader))

    async def stop(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._on_message(await read_message(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            log.error("the model process closed the connection")
        finally:
            gone = ModelUnavailable("the model process is gone")
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(gone)
            self._waiting.clear()
            self._writer = None

    def _on_message(self, message) -> None:
        kind = message[0]
        if kind == "meta":
            view = ModelView(*message[1:])
            self._views[view.version] = view
            for old in sorted(self._views)[:-8]:  # answers in flight belong to the last few versions at most
                del self._views[old]
            if self.current is None or view.version >= self.current.version:
                self.current = view
            return
        fut = self._waiting.pop(message[1], None)
        if fut is None or fut.done():
            return
        if kind == "answer":
            fut.set_result(Answer(message[3], message[2], self._views.get(message[2], self.current)))
        elif kind == "status":
            fut.set_result(message[2])
        elif kind == "bad":
            fut.set_exception(BadImage(message[2]))
        else:
            fut.set_exception(RuntimeError(message[2]))

    async def _ask(self, *message):
        if self._writer is None:
            raise ModelUnavailable("the model process is gone")
        rid = next(self._ids)
        fut = self._waiting[rid] = asyncio.get_running_loop().create_future()
        try:
            write_message(self._writer, (message[0], rid, *message[1:]))
            await self._writer.drain()
        except ConnectionError:
            self._waiting.pop(rid, None)
            raise ModelUnavailable("the model process is gone") from None
        return await fut

    async def submit(self, image: np.ndarray | bytes, tasks: tuple[str, ...] | None = None) -> Answer:
        return await self._ask("predict", image, tasks)

    async def status(self) -> dict:
        return await self._ask("status")
