"""Batched JPEG decoding for a GPU that is busy training: one batch of encoded images in, the decoded pixels packed
back to back on the device out (what :meth:`~scenarios.streaming.DeviceStage.from_flat` lays out).

nvJPEG decodes the batch in one call (``torchvision.io.decode_jpeg`` on a list, the hardware decoder where there
is one). Measured on an H200 (docs/data_at_scale.md), it decodes 21,700-31,800 images/s alone but queues each image
behind the training kernels (a pageable copy, a kernel and an event wait per image, on a low-priority stream of its
own), so beside training it costs the step time unless training leaves it SMs of its own (``fit`` does for a
source whose decoder is :attr:`JpegBatchDecoder.on_device`, :mod:`continual_mem.sm_partition`). A share of the
images can instead go to libjpeg-turbo in host threads (torchvision's CPU decoder releases the interpreter): which
ones (:func:`on_host`, policy, pure) depends on each image's id and the share alone, so its pixels do not depend on
timing, batch or rank; ``share=None`` balances each batch by the rates both parts have shown (:func:`host_share`).
On the H200 host (16 cores) every share above 0 was slower, so the default is nvJPEG alone. nvImageCodec, tried on
a stream of the highest priority, was slower still (12,800 images/s alone) and is not used.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .decode import host_cores
from .streaming import packed_meta
from .task_recipe import DECODERS

log = logging.getLogger(__name__)

JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
MIN_CHUNK = 8  # images per host task: fewer would cost more in hand-over than they save
HOST_SHARE = 0.0  # the host threads' part by default: on an H200 with 16 cores, any host share was slower
#                   (14 threads decode ~4,900 images/s beside training; docs/data_at_scale.md)


def choose_decoder(decoder: str, *, device: str) -> str:
    """Where JPEGs are decoded (policy, pure): ``device`` (nvJPEG on the GPU, no host cores) or ``host`` (worker
    processes, libjpeg-turbo). ``auto``: on a CUDA device, nvJPEG, for a compact copy (0.95-0.96x device-resident
    training with 8 SMs left to it, against 0.56-0.61x for the host workers, H200, 16 host cores) and for image
    files alike (0.72-0.85x with ~2 cores busy, against 0.43x with 14 for the host workers); on a CPU device, the
    host."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; use auto, device or host")
    if decoder != "auto":
        return decoder
    return "device" if str(device).startswith("cuda") else "host"


def host_share(gpu_rate: float | None, host_rate: float | None, *, fixed: float | None = None) -> float:
    """The part of a batch decoded on the host (policy, pure): ``fixed`` if given, else the share that makes both
    parts finish together, ``host_rate / (gpu_rate + host_rate)`` (images/s each part has shown; a half until
    both are known)."""
    if fixed is not None:
        if not 0.0 <= fixed <= 1.0:
            raise ValueError(f"the host's share of JPEG decoding must be in [0, 1], got {fixed}")
        return fixed
    if not gpu_rate or not host_rate:
        return 0.5
    return host_rate / (gpu_rate + host_rate)


def on_host(ids: np.ndarray, share: float) -> np.ndarray:
    """Which images the host threads decode (policy, pure): a fixed ``share`` of them, chosen by each image's id
    (its row in the copy) alone, so an image is always decoded the same way, whatever batch or rank it is in and
    after a resume: the pixels of batch ``s`` depend on ``(seed, s)`` and the share only."""
    mixed = (np.asarray(ids, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)  # Fibonacci hash
    return mixed.astype(np.float64) / float(1 << 24) < share


def device_decodable(data: bytes) -> bool:
    """A JPEG that ends with its end-of-image marker, for nvJPEG (a truncated one goes to the host decoder, which
    names the problem; nvJPEG may fill in the missing part instead)."""
    return data[:3] == JPEG_START and data[-2:] == JPEG_END


_STREAMS = threading.local()


def thread_stream(device: torch.device) -> torch.cuda.Stream:
    """The calling thread's own side stream on CUDA ``device`` (made on first use): where a decoding thread's
    device work and its outputs' memory live, apart from the training stream and from other threads'."""
    streams = _STREAMS.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def _decode_host(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(blobs, mode=ImageReadMode.RGB)


class JpegBatchDecoder:
    """Decodes batches of JPEG bytes (1-D uint8 CPU tensors) onto ``device``, each image ``(3, h, w)`` (CHW) in
    :meth:`decode`'s packed output. Safe to call from several threads. On a CPU device the calling thread's part
    is decoded by libjpeg-turbo too.

    Args:
        device: Where the pixels go.
        share: The host threads' part of the images (0: nvJPEG only, 1: host threads only; :func:`on_host`).
            ``None`` balances each batch by the rates measured so far (:func:`host_share`): it adapts to the host
            but an image's decoder, and so its last bits, then depend on timing.
        threads: Host decoding threads (default: the host's cores less two, for the training loop and the nvJPEG
            caller).
    """

    def __init__(self, device: str | torch.device, *, share: float | None = HOST_SHARE,
                 threads: int | None = None) -> None:
        self.device = torch.device(device)
        self.fixed = share
        host_share(None, None, fixed=share)  # validates
        self.threads = threads or max(1, host_cores() - 2)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="jpeg")
        self._lock = threading.Lock()
        self.rates: dict[str, float | None] = {"device": None, "host": None}  # images/s, moving averages

    @property
    def on_device(self) -> bool:
        """Whether nvJPEG decodes any of the images (a CUDA device and a host share below 1)."""
        return self.device.type == "cuda" and self.fixed != 1.0

    def share(self) -> float:
        """The host's part of the next batch."""
        with self._lock:
            return host_share(self.rates["device"], self.rates["host"], fixed=self.fixed)

    def _observe(self, part: str, images: int, seconds: float) -> None:
        if images < MIN_CHUNK or seconds <= 0:
            return
        with self._lock:
            old, new = self.rates[part], images / seconds
            self.rates[part] = new if old is None else 0.8 * old + 0.2 * new

    def decode(self, blobs: list[torch.Tensor], ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of ``blobs`` (RGB, 8 bits; ``ids``: each one's row in its copy) packed on the device, CHW
        each, and their ``(B, 3)`` (offset, height, width) rows in ``blobs``' order (a CPU tensor, pinned for a
        CUDA device). Returns once the pixels are there, so call it from a prefetching thread, never the training
        loop. A file that cannot be decoded raises ``RuntimeError``."""
        host = on_host(ids, self.share())
        here_rows, host_rows = np.flatnonzero(~host), np.flatnonzero(host)
        size = max(MIN_CHUNK, -(-len(host_rows) // self.threads))  # one chunk per thread
        t0 = time.perf_counter()
        futures = [self.pool.submit(_decode_host, [blobs[i] for i in host_rows[k:k + size]])
                   for k in range(0, len(host_rows), size)]
        here: list[torch.Tensor] = []
        if len(here_rows):  # decoded on the device by this thread (libjpeg-turbo on a CPU device)
            here = self._decode_here([blobs[i] for i in here_rows])
            self._observe("device", len(here_rows), time.perf_counter() - t0)
        host_images = [im for f in futures for im in f.result()]
        if len(host_rows):
            self._observe("host", len(host_rows), time.perf_counter() - t0)
        meta = np.empty((len(blobs), 3), dtype=np.int64)  # packed device part first, then the host part
        meta[np.concatenate([here_rows, host_rows])] = packed_meta([im.shape[1:] for im in here + host_images])
        if self.device.type != "cuda":
            return torch.cat([im.reshape(-1) for im in here + host_images]), torch.from_numpy(meta)
        return self._pack_on_device(here, host_images), torch.from_numpy(meta).pin_memory()

    def _decode_here(self, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type != "cuda":
            return decode_jpeg(blobs, mode=ImageReadMode.RGB)
        # outputs allocated on this thread's stream; nvJPEG hands them over by an event
        with torch.cuda.stream(thread_stream(self.device)):
            return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device)

    def _pack_on_device(self, gpu_images: list[torch.Tensor], host_images: list[torch.Tensor]) -> torch.Tensor:
        stream = thread_stream(self.device)
        gpu_bytes = sum(im.numel() for im in gpu_images)
        host = torch.empty(sum(im.numel() for im in host_images), dtype=torch.uint8, pin_memory=True)
        if host_images:
            torch.cat([im.reshape(-1) for im in host_images], out=host)
        with torch.cuda.stream(stream):
            flat = torch.empty(gpu_bytes + host.numel(), dtype=torch.uint8, device=self.device)
            if gpu_images:
                torch.cat([im.reshape(-1) for im in gpu_images], out=flat[:gpu_bytes])
            flat[gpu_bytes:].copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()  # this thread waits until the batch is there, so the training stream need not
        return flat
