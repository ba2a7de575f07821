"""Server settings: one validated dataclass, the only input of :func:`serving.create_app`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """Args:
        registry: SQLAlchemy URL or SQLite file of the registry.
        model: Model name inside the registry.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (resolved by the caller; ``auto`` is the CLI's).
        max_batch: Images in one pass at most.
        max_wait_ms: How long the first image of a batch waits for others.
        max_upload_bytes: Larger request bodies get 413.
        max_pixels: Larger images (width x height, read from the header before decoding) get 413.
        poll_interval_s: How often the registry is asked whether the model changed (0: never).
        amp: bf16 autocast on CUDA (the answers are bit-stable for a fixed batch shape and dtype).
        top_k: Default number of classes returned per task.
        cuda_graphs: On CUDA, replay the pass as a CUDA graph per batch-size bucket (powers of two up to
            ``max_batch``; a batch is padded to its bucket), captured at start-up for the first model and, for
            each model loaded later, in the loader's thread before it is swapped in.
        decode_workers: ``processes``, ``threads`` or ``auto`` (processes on CUDA; see :mod:`serving.decoding`).
        jpeg_decode: Where complete JPEG uploads are decoded: ``device`` (inside the pass, on the model's device:
            nvJPEG on CUDA; see :mod:`serving.device_decode`), ``host`` (by the decode workers, like every other
            format), or ``auto`` (device on CUDA, host on the CPU).
        overlap_passes: ``auto`` (on CUDA), ``on`` or ``off``: launch a batch's pass before the previous pass's
            answers are read back, so the host prepares one pass while the GPU runs the other (see
            :class:`serving.batcher.Batcher`). On the CPU a pass is computed when it is launched, so overlapping
            only delays the previous answers.
        workers: HTTP server processes sharing the port (``serve --workers``); each parses and decodes on its share
            of the cores.
        shared_model: With ``workers > 1``, one model process batches the images of every HTTP process (one CUDA
            context, full batches; see :mod:`serving.engine`); ``False``: each HTTP process loads its own model.
        model_socket: The shared model process's Unix socket, set by ``serve`` for its HTTP processes (empty: the
            model runs in the app's process).
        switch_interval_ms: On CUDA, the interpreter's GIL switch interval while serving (Python's default is
            5 ms). The batch worker takes the GIL back several times per pass, and each time it can wait a whole
            interval while the event loop parses HTTP. ``benchmarks/gil_handoff.py`` reproduces this: a pass with
            6 hand-offs beside a busy thread costs 14.5x its time alone at 5 ms, 1.8x at 0.2 ms.
        resident_tasks: Fine-tuned late forks of one family held on the device at once, paged in by use, least
            recently used out (:mod:`continual_mem.paging`); None: all of them.
        page_forks: Keep every fine-tuned late fork's weights in pinned host memory (loaded there, never on the
            device whole), paged in by use: a model's fork count is then capped by host memory, not the GPU's.
            Requests without ``tasks=`` then get a routed pass of every task.
        decoder_sms: SMs the pass (and its graphs) leaves to nvJPEG (:mod:`continual_mem.sm_partition`), so the
            next batch's decode need not wait behind the pass; a pass's answers are the same bits (GPU-tested).
            Default 0: unlike training, holding SMs back has not been shown to help serving (H200, one run each,
            ``docs/many_tasks.md``: 8 SMs moved a served backbone from 1,037 to 1,200 images/s and 100 forks from
            644 to 600), so it is asked for, not assumed.
    """

    registry: str
    model: str = "default"
    device: str = "cpu"
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    poll_interval_s: float = 1.0
    amp: bool = True
    top_k: int = 5
    cuda_graphs: bool = True
    decode_workers: str = "auto"
    jpeg_decode: str = "auto"
    overlap_passes: str = "auto"
    switch_interval_ms: float = 0.2
    workers: int = 1
    shared_model: bool = True
    model_socket: str = ""
    resident_tasks: int | None = None
    page_forks: bool = False
    decoder_sms: int = 0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_upload_bytes < 1 or self.max_pixels < 1:
            raise ValueError("max_upload_bytes and max_pixels must be >= 1")
        if self.poll_interval_s < 0:
            raise ValueError(f"poll_interval_s must be >= 0, got {self.poll_interval_s}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.resident_tasks is not None and self.resident_tasks < 1:
            raise ValueError(f"resident_tasks must be >= 1 (or None: every task), got {self.resident_tasks}")
        if self.decoder_sms < 0:
            raise ValueError(f"decoder_sms must be >= 0, got {self.decoder_sms}")
        if self.switch_interval_ms <= 0:
            raise ValueError(f"switch_interval_ms must be > 0, got {self.switch_interval_ms}")
        if self.decode_workers not in ("auto", "threads", "processes"):
            raise ValueError(f"decode_workers must be auto, threads or processes, got {self.decode_workers!r}")
        if self.jpeg_decode not in ("auto", "device", "host"):
            raise ValueError(f"jpeg_decode must be auto, device or host, got {self.jpeg_decode!r}")
        if self.overlap_passes not in ("auto", "on", "off"):
            raise ValueError(f"overlap_passes must be auto, on or off, got {self.overlap_passes!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")

    @property
    def overlap(self) -> bool:
        """Whether passes overlap (see ``overlap_passes``)."""
        return self.overlap_passes == "on" or (self.overlap_passes == "auto" and self.device.startswith("cuda"))

    @property
    def device_decode(self) -> bool:
        """Whether JPEGs are decoded inside the pass (see ``jpeg_decode``)."""
        return self.jpeg_decode == "device" or (self.jpeg_decode == "auto" and self.device.startswith("cuda"))

    def held_sms(self, sm_count: int) -> int:
        """SMs the pass leaves to the JPEG decoder on a device of ``sm_count`` SMs (0: a CPU), checked by
        :func:`continual_mem.sm_partition.decoder_sms` (an impossible request is a ``ValueError`` naming the fix)."""
        from continual_mem.sm_partition import decoder_sms

        # an explicit count (the server's default is 0, not the policy's choice): checked, never chosen
        return decoder_sms(self.decoder_sms, gpu_decoding=False, sm_count=sm_count)
