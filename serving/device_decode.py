"""JPEG uploads decoded on the GPU: nvJPEG through ``torchvision.io.decode_jpeg``, one batched call per pass.

Why: decoding a 500x375 JPEG costs ~3 ms of a host core on an H100 host (libjpeg-turbo, measured by
``benchmarks/data_throughput.py``), so serving ~2,000 images/s would need six cores for decoding alone, plus the
pickling that carries each decoded image back from a worker process. nvJPEG decodes the same files at ~13,700
images/s on the GPU. The event loop only reads an upload's header (format, size) and hands the bytes to the batch.

Only complete baseline/progressive JPEGs go this way (:func:`scenarios.gpu_jpeg.device_decodable`); anything else
(PNG, WebP, a file cut short) is decoded on the host as before, which also names the problem of a bad file.
"""
from __future__ import annotations

import contextlib

import torch

from scenarios.decode import BadImage, shrink_by_size, torchvision_reason
from scenarios.gpu_jpeg import thread_stream


def decode_jpegs(blobs: list[bytes], *, device: torch.device, short_side: int,
                 max_aspect: float) -> list[torch.Tensor | BadImage]:
    """Each JPEG as a ``(3, h, w)`` uint8 tensor on ``device``, shrunk as the host path shrinks it
    (:func:`scenarios.decode.shrink_by_size`), or the :class:`BadImage` that says why it could not be decoded. One
    batched nvJPEG call; if it fails, each file alone, so one bad file fails only its own request."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    # nvJPEG writes its outputs from a stream of its own as soon as it is called, into memory allocated on the
    # caller's current stream. Memory freed there while kernels still queued on it read it (the last pass's
    # layout) would be handed to the next decode and overwritten under them, so the outputs come from a decode
    # stream and are recorded on the current one: freed, they wait for its readers.
    cuda = device.type == "cuda"
    current = torch.cuda.current_stream(device) if cuda else None
    with torch.cuda.stream(thread_stream(device)) if cuda else contextlib.nullcontext():
        try:
            decoded: list = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for d in data:
                try:
                    decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as exc:
                    decoded.append(BadImage(torchvision_reason(str(exc))))
    for t in decoded if cuda else ():
        if isinstance(t, torch.Tensor):
            t.record_stream(current)  # decode_jpeg returns once its stream is done: nothing to wait for
    return shrink_by_size(decoded, short_side=short_side, max_aspect=max_aspect)
