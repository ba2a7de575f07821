"""Compact prepared copies as a batch source: JPEG bytes read from the page cache, decoded in batches on the GPU.

A compact copy (:mod:`scenarios.prepared`, ``encoding="jpeg"``) holds each image re-encoded once at a 256 px short
side (~25 KB instead of ~262 KB of raw pixels). :class:`CompactImages` is :class:`~scenarios.streaming.PreparedImages`
with one step more: host threads read a batch's JPEG bytes a few steps ahead and decode it
(:class:`~scenarios.gpu_jpeg.JpegBatchDecoder`: one batched nvJPEG call, optionally a share of the images in host
threads) into one packed buffer on the device; the training stream lays it out and crops it with one gather, as
for the raw copy. Training holds 8 SMs back for the decoder (:mod:`continual_mem.sm_partition`); measured on an H200:
0.95-0.96x device-resident training (docs/data_at_scale.md).

The other decoder, ``host``: :class:`CompactReader` hands the copy's JPEGs to
:class:`~scenarios.streaming.DecodedImages`, which decodes them with libjpeg-turbo in worker processes (one per host
core): the re-encoded images have about a third of a 500x375 source's pixels and need no resize, and the GPU's
time stays the model's. :func:`~scenarios.gpu_jpeg.choose_decoder` picks.

The data a step sees still depends only on ``(seed, step)`` (the same images, crop boxes and flips as every other
source); the pixels differ from the raw copy's by the JPEG re-encoding (a few grey levels, ``tests``). On a CPU
device the ``device`` decoder decodes with libjpeg-turbo in the threads.
"""
from __future__ import annotations

import numpy as np
import torch

from .augment import Preprocess
from .decode import digest
from .gpu_jpeg import HOST_SHARE, JpegBatchDecoder, choose_decoder
from .prepared import PreparedSet
from .streaming import DecodedImages, PreparedImages, padded_canvas


class CompactReader:
    """A compact copy's JPEGs as a reader of encoded images (:class:`scenarios.decode.Reader`), for
    :class:`~scenarios.streaming.DecodedImages`."""

    def __init__(self, data: PreparedSet) -> None:
        if data.encoding != "jpeg":
            raise ValueError(f"{data.root} holds {data.encoding} pixels, not JPEGs; read it with PreparedImages")
        self.data = data
        self.labels = data.index[data.rows, 3].copy()

    def __len__(self) -> int:
        return len(self.data)

    def read(self, i: int) -> bytes:
        return self.data.encoded(np.array([i]))[0].numpy().tobytes()

    def name(self, i: int) -> str:
        return f"{self.data.root.name}[{int(self.data.rows[i])}]"

    def fingerprint(self) -> dict:
        return {"kind": "compact", "root": str(self.data.root), "source": self.data.meta["source"],
                "rows": digest(map(str, self.data.rows.tolist()))}


class CompactImages(PreparedImages):
    """A compact (JPEG) :class:`PreparedSet` as a batch source; arguments as :class:`PreparedImages`, plus
    ``host_share``, the part of the images host threads decode (:class:`~scenarios.gpu_jpeg.JpegBatchDecoder`)."""

    planar = True  # decoded CHW

    def __init__(self, data: PreparedSet, pre: Preprocess, device: str | torch.device = "cpu", *,
                 threads: int | None = None, prefetch: int = 4, host_share: float | None = HOST_SHARE,
                 eval_cache: int | None = None) -> None:
        if data.encoding != "jpeg":
            raise ValueError(f"{data.root} holds {data.encoding} pixels, not JPEGs; read it with PreparedImages")
        # two threads keep one decoder busy: one reads and hands over a batch while the other's decodes
        super().__init__(data, pre, device, threads=threads or 2, prefetch=prefetch, eval_cache=eval_cache)
        self.decoder = JpegBatchDecoder(self.device, share=host_share)

    def _host(self, positions: np.ndarray) -> tuple:
        """Batch ``positions`` decoded onto the device, packed (CHW images back to back, and their offset, height
        and width rows), with its labels and padded canvas size."""
        rows = self.data.index[self.data.rows[positions]]  # (B, 4): offset, h, w, label
        flat, meta = self.decoder.decode(self.data.encoded(positions), self.data.rows[positions])
        labels = torch.from_numpy(rows[:, 3].copy())  # uploaded with the batch (DeviceStage.upload)
        return flat, meta, labels, padded_canvas(rows[:, 1:3])


def prepared_images(data: PreparedSet, pre: Preprocess, device: str | torch.device = "cpu", *,
                    decoder: str = "auto", **kwargs) -> PreparedImages | DecodedImages:
    """The batch source of a prepared copy, by its encoding and, for a compact one, where it is decoded (the one
    place that decides; ``kwargs`` go to :class:`PreparedImages`)."""
    if data.encoding != "jpeg":
        return PreparedImages(data, pre, device, **kwargs)
    if choose_decoder(decoder, device=str(device)) == "host":
        return DecodedImages(CompactReader(data), pre, device, name=data.root.name, short_side=None)
    return CompactImages(data, pre, device, **kwargs)
