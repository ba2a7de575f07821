"""Training on all SMs but a few, so that a GPU JPEG decoder beside it does not wait behind the step.

torchvision's nvJPEG path queues, per image, a small kernel and an event wait on a pool stream of its own. On a GPU
kept full by the training step each of those kernels waits for the step's blocks to drain, so decoding costs the
step's time instead of overlapping it (session 20: beside a busy GPU the decoder kept 7-11% of its solo rate). A CUDA
green context holding all SMs but ``reserve`` runs the training stream; the reserved SMs only run what other streams
launch, the decoder's kernels. H200 (132 SMs), session 22: with 8 SMs held back the decoder kept its solo rate
beside an MLP loop (``dev/diag_green_decode.py``), and training from the compact copy went from 0.73-0.80x to
0.95-0.96x device-resident speed, from source JPEGs decoded on the GPU from 0.58-0.70x to 0.72-0.85x (three runs,
docs/data_at_scale.md). The step's arithmetic is the same on fewer SMs (bit-equal weights, ``tests``).

``fit`` holds them for a source that decodes on the GPU, ``evaluate`` for a pass that does (kept evaluation
batches need no decoder); the server only when asked (``serve --decoder-sms N``: not shown to help there yet). One
place decides the number (:func:`decoder_sms`); :func:`partition` runs a block on the rest; :func:`side_stream`
gives graph capture and warm-up a stream on the same SMs (a graph captured on a stream of the full device would
replay there).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

# SMs left to a GPU decoder by default (H200: 4 kept 93-99% of the decoder's solo rate beside an MLP loop, 8 all of
# it, eager and graphed; in training 8 gave 0.95-0.96x resident, 16 gave 0.92x)
DECODE_RESERVE = 8

_local = threading.local()
_lock = threading.Lock()
_contexts: dict[tuple[int, int], object] = {}  # (device, SMs) -> green context, kept for the process's life


def decoder_sms(requested: int | None, *, gpu_decoding: bool, sm_count: int) -> int:
    """SMs to hold back from training for a GPU JPEG decoder (policy, pure): ``requested`` when given, else
    :data:`DECODE_RESERVE` when the training source decodes on the GPU of ``sm_count`` SMs (0 on a GPU too small
    to spare them, or on a CPU: ``sm_count`` 0)."""
    if requested is None:
        return DECODE_RESERVE if gpu_decoding and sm_count >= 8 * DECODE_RESERVE else 0
    if requested and not sm_count:
        raise ValueError(f"decoder_sms={requested} holds GPU SMs back, but this runs on the CPU; pass 0 or leave "
                         "it unset")
    if requested < 0 or requested >= max(1, sm_count):
        raise ValueError(f"decoder_sms must be 0 or in 1..{sm_count - 1} (the device has {sm_count} SMs), "
                         f"got {requested}")
    return requested


def sm_count(device: torch.device) -> int:
    """The device's SMs (0 for anything but CUDA)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(_index(device)).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _green(index: int, num_sms: int):
    with _lock:
        ctx = _contexts.get((index, num_sms))
        if ctx is None:
            from torch.cuda.green_contexts import GreenContext

            try:
                ctx = GreenContext.create(num_sms=num_sms, device_id=index)
            except TypeError:  # torch 2.11 binds create's arguments by position
                ctx = GreenContext.create(num_sms, index)
            _contexts[(index, num_sms)] = ctx
        return ctx


def _stream(ctx) -> torch.cuda.Stream:
    """This thread's stream on ``ctx``, made once: the caching allocator keeps freed blocks per stream, so a new
    stream per call (every evaluation pass) would strand each pass's activations in a pool no later pass uses."""
    streams = _local.__dict__.setdefault("streams", {})
    if id(ctx) not in streams:
        streams[id(ctx)] = ctx.Stream()
    return streams[id(ctx)]


@contextlib.contextmanager
def partition(device: torch.device, reserve: int, *, required: bool = True) -> Iterator[int]:
    """Run what the block launches on the current stream on all SMs of ``device`` but ``reserve``; yields the SMs
    held back. Work on other streams (a decoder's) may use every SM. ``required=False``: where green contexts are
    not available (driver older than CUDA 12.8, no ``cuda.bindings``) the block runs on the whole device and yields 0;
    else that is an error naming the fix."""
    if reserve == 0 or device.type != "cuda":
        yield 0
        return
    index = _index(device)
    try:
        ctx = _green(index, sm_count(device) - reserve)
        stream = _stream(ctx)
    except (RuntimeError, ImportError, AttributeError) as exc:
        if required:
            raise ValueError(f"cannot hold {reserve} SMs back for the decoder on this GPU ({exc}); pass "
                             "decoder_sms=0 (--decoder-sms 0)") from exc
        log.info("green contexts unavailable (%s): training on the whole device", exc)
        yield 0
        return
    outer = torch.cuda.current_stream(index)
    stream.wait_stream(outer)
    before = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        with torch.cuda.stream(stream):
            yield reserve
    finally:
        _local.ctx = before
        outer.wait_stream(stream)


def side_stream() -> torch.cuda.Stream | None:
    """A new stream on the SMs the enclosing :func:`partition` allows this thread (None outside one: the caller's
    default)."""
    ctx = getattr(_local, "ctx", None)
    return None if ctx is None else ctx.Stream()
