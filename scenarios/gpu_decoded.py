"""Image files decoded on the fly on the GPU: no preparation step, and the host's cores stay free.

:class:`GpuDecodedImages` reads each batch's files in a few host threads, steps ahead, and decodes the JPEGs in one
batched nvJPEG call (:class:`~scenarios.gpu_jpeg.JpegBatchDecoder`); each image is then shrunk on the device as the
host path shrinks it (:func:`~scenarios.decode.shrink`: the long side cropped to ``max_aspect`` times the short,
the short side scaled down to ``short_side``; one call per distinct size) and the batch is packed for the one-gather
layout of the prepared copies. What nvJPEG does not take (PNG, WebP, a JPEG cut short or refused) is decoded on
the host by the code :class:`~scenarios.streaming.DecodedImages` uses, which also names a bad file; a bad file is
skipped (the next decodable image takes its place) or fails the run, as the user chose.

Batches depend on ``(seed, step)`` only, as from every other source; the pixels differ from the host decoder's by
nvJPEG's rounding (a grey level or two). On a CPU device everything is decoded by libjpeg-turbo in the threads.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from .augment import Preprocess
from .decode import MAX_ASPECT, SHORT_SIDE, BadImage, Reader, bad_image_error, decode_item, shrink_by_size
from .gpu_jpeg import HOST_SHARE, JpegBatchDecoder, device_decodable, thread_stream
from .streaming import PreparedImages, packed_meta, padded_canvas
from .task_recipe import OnBad
from .types import DatasetError

log = logging.getLogger(__name__)


class GpuDecodedImages(PreparedImages):
    """Encoded image files as a batch source, decoded on ``device``.

    Args:
        reader: The encoded images (:func:`scenarios.decode.reader_for`).
        pre: The backbone's preprocessing.
        device: Where batches go (and where JPEGs are decoded).
        threads, prefetch: Reading threads and batches read ahead (:class:`~scenarios.streaming.PreparedImages`).
        on_bad: ``skip`` or ``fail`` for a file that cannot be decoded.
        name: Dataset name for messages.
        short_side, max_aspect: The shrink every image gets (:func:`~scenarios.decode.shrink`).
        host_share: The part of the JPEGs decoded by host threads (:class:`~scenarios.gpu_jpeg.JpegBatchDecoder`).
        eval_cache: Bytes of held-out batches kept on the device (:class:`~scenarios.streaming.PreparedImages`).
    """

    planar = True  # decoded CHW

    def __init__(self, reader: Reader, pre: Preprocess, device: str | torch.device = "cpu", *,
                 threads: int | None = None, prefetch: int = 4, on_bad: OnBad = "skip", name: str = "dataset",
                 short_side: int = SHORT_SIDE, max_aspect: float = MAX_ASPECT,
                 host_share: float | None = HOST_SHARE, eval_cache: int | None = None) -> None:
        super().__init__(reader, pre, device, threads=threads or 2, prefetch=prefetch, eval_cache=eval_cache)
        self.reader, self.on_bad, self.name = reader, on_bad, name
        self.short_side, self.max_aspect = short_side, max_aspect
        self.decoder = JpegBatchDecoder(self.device, share=host_share)
        self._reported: set[str] = set()

    def _host(self, positions: np.ndarray) -> tuple:
        """Batch ``positions`` decoded, shrunk and packed on the device (CHW images back to back, and their
        offset, height and width rows), with its labels and padded canvas size."""
        images: list[torch.Tensor | None] = [None] * len(positions)
        labels = self.reader.labels[positions].astype(np.int64)
        jpegs: list[int] = []
        blobs: list[torch.Tensor] = []
        for k, i in enumerate(positions.tolist()):
            data = self.reader.read(i)
            if isinstance(data, (bytes, bytearray)) and device_decodable(data):
                jpegs.append(k)
                blobs.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            else:
                images[k], labels[k] = self._on_host(i)
        for k, image in zip(jpegs, self._decode_jpegs(blobs, positions[jpegs])):
            images[k], labels[k] = (image, labels[k]) if image is not None else self._on_host(int(positions[k]))
        cuda = self.device.type == "cuda"
        with torch.cuda.stream(thread_stream(self.device)) if cuda else contextlib.nullcontext():
            images = shrink_by_size(images, short_side=self.short_side, max_aspect=self.max_aspect)
            for k, image in enumerate(images):
                if isinstance(image, BadImage):  # an empty image: the host decoder names it, skips or fails
                    images[k], labels[k] = self._on_host(int(positions[k]))
            shapes = [tuple(im.shape[1:]) for im in images]
            flat = torch.cat([im.reshape(-1) for im in images])
        if cuda:  # done before the decoded buffers it read are released to other threads' streams
            thread_stream(self.device).synchronize()
        meta = torch.from_numpy(packed_meta(shapes))
        return flat, meta, torch.from_numpy(labels), padded_canvas(shapes)

    def _decode_jpegs(self, blobs: list[torch.Tensor], ids: np.ndarray) -> list[torch.Tensor | None]:
        """Each JPEG as a ``(3, h, w)`` device tensor (a view into one packed buffer), or None where nvJPEG
        refused it (the host decoder then names the problem)."""
        if not blobs:
            return []
        try:
            return _unpack(*self.decoder.decode(blobs, ids))
        except RuntimeError:  # one bad file fails the batched call: each alone, so only it is left out
            out: list[torch.Tensor | None] = []
            for t, i in zip(blobs, ids):
                try:
                    out += _unpack(*self.decoder.decode([t], np.array([i])))
                except RuntimeError:
                    out.append(None)
            return out

    def _on_host(self, i: int) -> tuple[torch.Tensor, int]:
        """Item ``i`` decoded on the host, shrunk, on the device, with its label; a bad item is skipped (the next
        decodable one takes its place) or fails, as the user chose."""
        for j in range(i, i + len(self.reader)):
            k = j % len(self.reader)
            try:
                a = decode_item(self.reader, k, short_side=self.short_side, max_aspect=self.max_aspect)
                return torch.from_numpy(a).permute(2, 0, 1).to(self.device), int(self.reader.labels[k])
            except BadImage as exc:
                if self.on_bad == "fail":
                    raise DatasetError(bad_image_error(self.name, str(exc))) from None
                if str(exc) not in self._reported:
                    self._reported.add(str(exc))
                    log.warning("%s: %s; another image takes its place", self.name, exc)
        raise DatasetError(f"{self.name}: no image could be decoded; check the files")


def _unpack(flat: torch.Tensor, meta: torch.Tensor) -> list[torch.Tensor]:
    """The ``(3, h, w)`` views of packed images."""
    return [flat[o:o + 3 * h * w].view(3, h, w) for o, h, w in meta.tolist()]
