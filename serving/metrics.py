"""Prometheus metrics of one app (its own registry, so several apps in one process do not collide). Under
``serve --workers N`` each worker process writes its values to ``PROMETHEUS_MULTIPROC_DIR`` and a scrape of any worker
adds them up (prometheus_client's multiprocess mode)."""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """``owns_model``: this process holds the model (the model's version and swaps are its to report; an HTTP process
    in front of a shared model process leaves them to it, so a multiprocess gauge does not read 0 there)."""

    def __init__(self, *, owns_model: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("continual_mem_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("continual_mem_request_seconds", "request latency by endpoint", ["endpoint"],
                                 buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10), registry=r)
        self.batch_size = Histogram("continual_mem_batch_size", "images per model pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.pass_seconds = Histogram("continual_mem_pass_seconds", "wall time of one model pass (crop, forward, "
                                      "logits to the host)", buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1),
                                      registry=r)
        # where a pass's wall time goes: its thread's own time (host work, GIL waits included), and on CUDA the
        # GPU's time between two events around it; the rest of pass_seconds is the hand-back to the event loop
        self.pass_thread_seconds = Histogram("continual_mem_pass_thread_seconds", "time of one pass inside the batch "
                                             "worker's thread", buckets=(.002, .005, .01, .02, .05, .1, .2, .5, 1),
                                             registry=r)
        self.pass_device_seconds = Histogram("continual_mem_pass_device_seconds", "GPU time of one pass (CUDA "
                                             "events; CUDA only)", buckets=(.001, .002, .005, .01, .02, .05, .1),
                                             registry=r)
        self.decode_seconds = Histogram("continual_mem_decode_seconds", "time to decode and shrink one upload, in "
                                        "its decoding worker", buckets=(.001, .002, .005, .01, .02, .05, .1, .5),
                                        registry=r)
        self.device_decoded = Counter("continual_mem_device_decoded_images", "uploads decoded on the model's device "
                                      "inside the pass (nvJPEG on CUDA); the rest decode on the host", registry=r)
        self.loop_lag_seconds = Histogram("continual_mem_event_loop_lag_seconds", "how late a 50 ms timer of the "
                                          "event loop fires (a busy loop, or one starved of the GIL)",
                                          buckets=(.001, .002, .005, .01, .02, .05, .1, .5), registry=r)
        self.queue_depth = Gauge("continual_mem_queue_depth", "images waiting for a pass", registry=r,
                                 multiprocess_mode="livesum")
        self.images = Counter("continual_mem_task_images", "images answered per task", ["task"], registry=r)
        self.routed_passes = Counter("continual_mem_routed_passes", "routed passes by where they ran: the bucket's "
                                     "CUDA graph, or eager (the CPU, task-agnostic asks, tasks no graph holds, more "
                                     "rows than max_batch)", ["path"], registry=r)
        self.version = self.swaps = None
        if not owns_model:
            return
        self.version = Gauge("continual_mem_model_version", "registry version of the served model", registry=r,
                             multiprocess_mode="livemin")  # the oldest model a worker still serves
        self.swaps = Gauge("continual_mem_model_swaps", "models swapped in since start", registry=r,
                           multiprocess_mode="livemax")

    def text(self) -> bytes:
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not shared:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, path=shared)
        return generate_latest(every_worker)
