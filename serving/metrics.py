"""Prometheus metrics of one app (its own registry, so several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
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
        self.queue_depth = Gauge("continual_mem_queue_depth", "images waiting for a pass", registry=r)
        self.images = Counter("continual_mem_task_images", "images answered per task", ["task"], registry=r)
        self.version = Gauge("continual_mem_model_version", "registry version of the served model", registry=r)
        self.swaps = Gauge("continual_mem_model_swaps", "models swapped in since start", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
