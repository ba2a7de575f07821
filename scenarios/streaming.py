"""Batch sources for file-backed datasets at GPU speed.

Both sources hand the device the same thing: a padded uint8 batch ``(B, H, W, 3)`` of images already shrunk to a
short side of 256 px, plus each image's height and width. The device then does what :class:`DeviceImages` does
for resident data, in one batched kernel each: inception crop boxes inside each image's own size (or timm's centre
crop for evaluation), ``roi_align`` to the model's size, flips, normalisation. The CPU only decodes (or copies).

* :class:`PreparedImages` reads a prepared copy (:mod:`scenarios.prepared`): a memory copy per image, in a few
  threads, into pinned memory; no decoding at all.
* :class:`DecodedImages` decodes the JPEG/PNG files themselves with ``torchvision.io`` in worker processes (one per
  host core), so a folder needs no preparation.

Batch ``s`` depends only on ``(seed, s)``: the same images (:func:`~scenarios.augment.step_indices`), the same
crop boxes and coins (drawn on the device for the whole global batch, each image's box from its own size only),
whichever source, however many ranks share the batch, and after a resume.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from continual_mem.distributed import SINGLE, Shard

from .decode import MAX_ASPECT, SHORT_SIDE, BadImage, Reader, bad_image_error, decode_item, host_cores
from .task_recipe import OnBad
from .augment import Preprocess, crop_batch, step_generator, step_indices
from .prepared import PreparedSet, place
from .eval_cache import EvalCache

log = logging.getLogger(__name__)

ALIGN = 16  # padded batch sizes are rounded up to this, so a few shapes recur


def round_up(v: int) -> int:
    """Padded size for images up to ``v``: at least one row/column more (so every image's edge is replicated by
    :func:`~scenarios.prepared.place`, never clamped by ``roi_align``: the same bits whatever the batch)."""
    return (v // ALIGN + 1) * ALIGN


def padded_canvas(shapes) -> tuple[int, int]:
    """The padded ``(H, W)`` a batch of images of ``shapes`` (heights and widths: pairs or a ``(B, 2)`` array) is
    laid out in (:func:`round_up` of the largest)."""
    hw = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    return round_up(int(hw[:, 0].max())), round_up(int(hw[:, 1].max()))


def packed_meta(shapes) -> np.ndarray:
    """``(B, 3)`` int64 rows (offset, height, width) of images of ``shapes`` (``B`` heights and widths: pairs or a
    ``(B, 2)`` array) packed back to back, 3 bytes a pixel: the ``meta`` of :meth:`DeviceStage.from_flat`."""
    hw = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
    sizes = hw[:, 0] * hw[:, 1] * 3
    return np.column_stack([np.concatenate([[0], np.cumsum(sizes)[:-1]]), hw])


class DeviceStage:
    """What happens on the device: a padded uint8 batch to a normalised model batch.

    The upload runs on a copy stream (the compute stream waits for it), so it overlaps the previous step's
    kernels; the crop works on raw 0..255 values in NCHW order and ``/255``, mean and std are one affine op on
    the small cropped batch, not passes over the large padded one.
    """

    def __init__(self, pre: Preprocess, device: torch.device) -> None:
        self.pre, self.device = pre, device
        mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def upload(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        if self.copy_stream is None:
            return [t.to(self.device) for t in tensors]
        with torch.cuda.stream(self.copy_stream):
            out = [t.to(self.device, non_blocking=True) for t in tensors]
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.copy_stream)
        for t in out:
            t.record_stream(current)  # allocated on another stream (this copy stream, a decoder's), used on this one
        return out

    def __call__(self, canvas: torch.Tensor, hw: torch.Tensor, labels: torch.Tensor, *, train: bool,
                 g: torch.Generator | None = None, n: int | None = None, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded ``(B, H, W, 3)`` uint8 batch holding images ``lo:lo+B`` of a global batch of ``n`` (the random
        draws cover all ``n``)."""
        canvas, hw, labels = self.upload(canvas, hw, labels)
        return self.finish(canvas.permute(0, 3, 1, 2).contiguous(), hw, labels, train=train, g=g, n=n, lo=lo)

    def from_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images already on the device, ``(3, h, w)`` uint8 each (decoded there, e.g. by nvJPEG), cropped and
        normalised for evaluation: packed back to back and laid out by :meth:`from_flat`'s one gather, as the
        host lays them out (:func:`pad_batch`)."""
        shapes = [tuple(im.shape[1:]) for im in images]
        flat = torch.cat([im.reshape(-1) for im in images])
        labels = torch.zeros(len(images), dtype=torch.int64)
        return self.from_flat(flat, torch.from_numpy(packed_meta(shapes)), labels, padded_canvas(shapes),
                              train=False, planar=True)[0]

    def from_flat(self, flat: torch.Tensor, meta: torch.Tensor, labels: torch.Tensor, canvas: tuple[int, int], *,
                  train: bool, g: torch.Generator | None = None, n: int | None = None, lo: int = 0,
                  planar: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The images packed back to back in ``flat`` (``meta`` rows: byte offset, height, width; each image HWC,
        or CHW if ``planar``) are laid out as a padded batch of ``canvas`` (H, W) by one gather on the device,
        edge pixels repeated into the padding (what :func:`~scenarios.prepared.place` does on the host). ``flat``
        may already be on the device, made on another stream and finished there (:meth:`upload` records its use
        on this one)."""
        flat, meta, labels = self.upload(flat, meta, labels)
        H, W = canvas
        off, h, w = meta[:, 0], meta[:, 1], meta[:, 2]
        dev = flat.device
        yy = torch.minimum(torch.arange(H, device=dev)[None, :], (h - 1)[:, None])  # (B, H)
        xx = torch.minimum(torch.arange(W, device=dev)[None, :], (w - 1)[:, None])  # (B, W)
        pixel = yy[:, :, None] * w[:, None, None] + xx[:, None, :]  # (B, H, W) pixel number in its image
        channel = torch.arange(3, device=dev).view(1, 3, 1, 1)
        if planar:  # channel c of an image starts c * h * w bytes in
            index = (off[:, None, None] + pixel)[:, None] + channel * (h * w).view(-1, 1, 1, 1)
        else:
            index = (off[:, None, None] + pixel * 3)[:, None] + channel
        return self.finish(flat[index], meta[:, 1:3], labels, train=train, g=g, n=n, lo=lo)  # (B, 3, H, W)

    def finish(self, x: torch.Tensor, hw: torch.Tensor, labels: torch.Tensor, *, train: bool,
               g: torch.Generator | None = None, n: int | None = None,
               lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded ``(B, 3, H, W)`` uint8 batch on the device (``hw``: each image's size) cropped (training:
        inception boxes and flips from ``g``, drawn for all ``n`` images of the global batch; else timm's centre
        crop) and normalised."""
        hw = hw.float()
        x = crop_batch(x.float(), hw[:, 0], hw[:, 1], self.pre, train=train, g=g, n=n, lo=lo)  # 0..255
        return torch.addcmul(self.shift, x, self.scale), labels


class PreparedImages:
    """A :class:`PreparedSet` as a batch source: host threads copy each batch's images back to back into pinned
    memory a few steps ahead; the device lays them out, crops and normalises them.

    Args:
        data: The prepared copy (or a subset).
        pre: The backbone's preprocessing.
        device: Where batches go.
        threads: Host threads copying batches (default: up to 8 of the host's cores).
        prefetch: Batches prepared ahead of the one asked for (0: none, no threads).
        eval_cache: Bytes of held-out batches kept on the device after their first pass (None: the default
            budget, :func:`~scenarios.eval_cache.default_budget`; 0: none).
    """

    planar = False  # how :meth:`_host` packs each image: HWC (raw pixels), or CHW (decoded on the device)

    def __init__(self, data: PreparedSet, pre: Preprocess, device: str | torch.device = "cpu", *,
                 threads: int | None = None, prefetch: int = 4, eval_cache: int | None = None) -> None:
        self.data, self.pre, self.device = data, pre, torch.device(device)
        self.eval_cache = EvalCache(self.device, pre.img_size, eval_cache)
        self.stage = DeviceStage(pre, self.device)
        self.prefetch = prefetch
        self.pool = ThreadPoolExecutor(max_workers=threads or min(8, host_cores()), thread_name_prefix="prepared") \
            if prefetch else None
        self._ahead: dict[tuple, Future] = {}

    def __len__(self) -> int:
        return len(self.data)

    @property
    def gpu_decoding(self) -> bool:
        """Whether this source's JPEGs are decoded on the GPU (``fit`` then leaves the decoder SMs of its own,
        :mod:`continual_mem.sm_partition`)."""
        decoder = getattr(self, "decoder", None)  # the JPEG decoder of the subclasses that decode
        return decoder is not None and decoder.on_device

    def eval_gpu_decoding(self, batch_size: int, shard: Shard = SINGLE) -> bool:
        """Whether the next evaluation pass of ``batch_size`` decodes on the GPU (not when its batches are kept)."""
        return self.gpu_decoding and not self.eval_cache.holds((batch_size, shard))

    def _host(self, positions: np.ndarray) -> tuple:
        """Images ``positions`` back to back in one pinned buffer: a single ``np.concatenate`` (which releases the
        GIL while it copies), so the copying threads hardly compete with the training loop for the interpreter."""
        rows = self.data.index[self.data.rows[positions]]  # (B, 4): offset, h, w, label
        nbytes = rows[:, 1] * rows[:, 2] * 3
        flat = torch.empty(int(nbytes.sum()), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        pix = self.data.pixels
        np.concatenate([pix[o:o + k] for o, k in zip(rows[:, 0].tolist(), nbytes.tolist())], out=flat.numpy())
        canvas = padded_canvas(rows[:, 1:3])
        return flat, torch.from_numpy(packed_meta(rows[:, 1:3])), torch.from_numpy(rows[:, 3].copy()), canvas

    def _fetch(self, key: tuple, positions_of) -> tuple:
        """The host batch ``key`` (and the next ``prefetch`` ones submitted); ``positions_of(key)`` says which
        images a key holds, or None past the end."""
        if self.pool is None:  # no prefetching
            return self._host(positions_of(key))
        for k in [key] + [key[:-1] + (key[-1] + d,) for d in range(1, self.prefetch + 1)]:
            if k not in self._ahead:
                pos = positions_of(k)
                if pos is not None:
                    self._ahead[k] = self.pool.submit(self._host, pos)
        for stale in [k for k in self._ahead if k[:-1] != key[:-1] or k[-1] < key[-1]]:
            self._ahead.pop(stale).cancel()
        return self._ahead.pop(key).result()

    def train_batch(self, step: int, batch_size: int, seed: int, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Global batch ``step``; ``shard`` copies and crops only its contiguous part of it."""
        n = min(batch_size, len(self))
        lo, hi = shard.bounds(n)

        def positions(key):
            return step_indices(len(self), key[-1], batch_size, seed)[lo:hi].numpy()

        return self._model_batch(self._fetch(("train", batch_size, seed, shard, step), positions), train=True,
                                 g=step_generator(seed, step, self.device), n=n, lo=lo)

    def eval_batches(self, batch_size: int, shard: Shard = SINGLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches of ``shard``'s contiguous part of the set, in order (kept on the device after the
        first pass where they fit, :class:`~scenarios.eval_cache.EvalCache`)."""
        lo, hi = shard.bounds(len(self))
        return self.eval_cache.batches((batch_size, shard), hi - lo,
                                       lambda: self._stream_eval(batch_size, lo, hi, shard))

    def _stream_eval(self, batch_size: int, lo: int, hi: int,
                     shard: Shard) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = list(range(lo, hi, batch_size))

        def positions(key):
            b = key[-1]
            return np.arange(starts[b], min(starts[b] + batch_size, hi)) if b < len(starts) else None

        for b in range(len(starts)):
            yield self._model_batch(self._fetch(("eval", batch_size, shard, b), positions), train=False)

    def eval_one(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image ``i`` alone, preprocessed for evaluation (per-sample datasets such as Avalanche's)."""
        return self._model_batch(self._host(np.array([i])), train=False)

    def _model_batch(self, host: tuple, *, train: bool, g: torch.Generator | None = None, n: int | None = None,
                     lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`_host` prepared, as a model batch on the device."""
        return self.stage.from_flat(*host, train=train, g=g, n=n, lo=lo, planar=self.planar)


# ----------------------------------------------------------------------------------------------- decoding
class _Decode(Dataset):
    """Worker side of :class:`DecodedImages`: item ``i`` decoded and shrunk (a bad one replaced or reported)."""

    def __init__(self, reader: Reader, short_side: int, max_aspect: float, on_bad: OnBad) -> None:
        self.reader, self.short_side, self.max_aspect, self.on_bad = reader, short_side, max_aspect, on_bad

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        bad = []
        for j in range(i, i + len(self.reader)):  # skip: the next decodable image takes a bad one's place
            k = j % len(self.reader)
            try:
                a = decode_item(self.reader, k, short_side=self.short_side, max_aspect=self.max_aspect)
                return a, int(self.reader.labels[k]), bad
            except BadImage as exc:
                bad.append(str(exc))
                if self.on_bad == "fail":
                    return None, -1, bad
        return None, -1, bad


def pad_batch(images: list[np.ndarray], *, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, W, 3)`` uint8 images as one padded ``(B, H', W', 3)`` batch (laid out by :func:`place`) and their
    ``(B, 2)`` heights and widths: what :meth:`DeviceStage.__call__` takes."""
    H, W = padded_canvas([a.shape[:2] for a in images])
    canvas = torch.empty((len(images), H, W, 3), dtype=torch.uint8, pin_memory=pin)
    for k, a in enumerate(images):
        place(canvas[k].numpy(), a)
    return canvas, torch.tensor([a.shape[:2] for a in images], dtype=torch.int64)


def _pad(items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Collate decoded images with :func:`pad_batch` (runs in the worker); an empty batch carries a failure."""
    bad = [m for _, _, b in items for m in b]
    if any(a is None for a, _, _ in items):
        return torch.zeros(0, 1, 1, 3, dtype=torch.uint8), torch.zeros(0, 2, dtype=torch.int64), \
            torch.zeros(0, dtype=torch.int64), bad
    canvas, hw = pad_batch([a for a, _, _ in items])
    return canvas, hw, torch.tensor([y for _, y, _ in items], dtype=torch.int64), bad


class _StepBatches(Sampler[list[int]]):
    """This rank's part of global batches ``start, start+1, ...`` (endless)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, shard: Shard) -> None:
        self.n, self.batch_size, self.seed, self.start, self.shard = n, batch_size, seed, start, shard

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.shard.bounds(min(self.batch_size, self.n))
        step = self.start
        while True:
            yield step_indices(self.n, step, self.batch_size, self.seed)[lo:hi].tolist()
            step += 1


class _Range(Sampler[list[int]]):
    def __init__(self, lo: int, hi: int, batch_size: int) -> None:
        self.lo, self.hi, self.batch_size = lo, hi, batch_size

    def __len__(self) -> int:
        return -(-(self.hi - self.lo) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.lo, self.hi, self.batch_size):
            yield list(range(s, min(s + self.batch_size, self.hi)))


class DecodedImages:
    """Image files decoded on the fly (``torchvision.io``, one worker process per host core) into padded uint8
    batches; the device crops and normalises them. No preparation step.

    Args:
        reader: The encoded images (:func:`scenarios.decode.reader_for`).
        pre: The backbone's preprocessing.
        device: Where batches go.
        workers: Decoding processes (default: the host's cores, shared among the job's ranks, less one).
        on_bad: ``skip`` puts the next decodable image in a bad one's place (named once in the log); ``fail``
            stops with the file's path.
        name: Dataset name for messages.
        eval_cache: As :class:`PreparedImages`.
    """

    def __init__(self, reader: Reader, pre: Preprocess, device: str | torch.device = "cpu", *,
                 workers: int | None = None, on_bad: OnBad = "skip", name: str = "dataset",
                 short_side: int = SHORT_SIDE, max_aspect: float = MAX_ASPECT, eval_cache: int | None = None) -> None:
        self.reader, self.pre, self.device, self.name, self.on_bad = reader, pre, torch.device(device), name, on_bad
        self.eval_cache = EvalCache(self.device, pre.img_size, eval_cache)
        self.stage = DeviceStage(pre, self.device)
        self.workers = workers
        self.dataset = _Decode(reader, short_side, max_aspect, on_bad)
        self._it: Iterator | None = None
        self._key: tuple | None = None
        self._reported: set[str] = set()
        self._eval_loaders: dict[tuple, DataLoader] = {}

    def __len__(self) -> int:
        return len(self.reader)

    def _loader(self, sampler: Sampler, shard: Shard, *, persistent: bool = False) -> DataLoader:
        workers = self.workers if self.workers is not None else max(1, host_cores() // shard.world - 1)
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_pad, num_workers=workers,
                          pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                          persistent_workers=persistent and workers > 0)

    def _check(self, bad: list[str]) -> None:
        for message in bad:
            if self.on_bad == "fail":
                from .types import DatasetError

                raise DatasetError(bad_image_error(self.name, message))
            if message not in self._reported:
                self._reported.add(message)
                log.warning("%s: %s; another image takes its place", self.name, message)

    def train_batch(self, step: int, batch_size: int, seed: int, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Global batch ``step``; ``shard`` decodes only its contiguous part of it."""
        key = (batch_size, seed, shard, step)
        if self._key != key:  # first call, a resume, or another run: start the workers at this step
            self._it = iter(self._loader(_StepBatches(len(self), batch_size, seed, step, shard), shard))
        canvas, hw, labels, bad = next(self._it)
        self._check(bad)
        self._key = (batch_size, seed, shard, step + 1)
        n = min(batch_size, len(self))
        return self.stage(canvas, hw, labels, train=True, g=step_generator(seed, step, self.device), n=n,
                          lo=shard.bounds(n)[0])

    def eval_batches(self, batch_size: int, shard: Shard = SINGLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches of ``shard``'s contiguous part of the set, in order (kept as :class:`PreparedImages`
        keeps them)."""
        lo, hi = shard.bounds(len(self))
        return self.eval_cache.batches((batch_size, shard), hi - lo,
                                       lambda: self._stream_eval(batch_size, lo, hi, shard))

    def _stream_eval(self, batch_size: int, lo: int, hi: int,
                     shard: Shard) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        key = (batch_size, shard)
        if key not in self._eval_loaders:  # kept: fit evaluates the held-out split again and again
            self._eval_loaders[key] = self._loader(_Range(lo, hi, batch_size), shard, persistent=True)
        for canvas, hw, labels, bad in self._eval_loaders[key]:
            self._check(bad)
            yield self.stage(canvas, hw, labels, train=False)
