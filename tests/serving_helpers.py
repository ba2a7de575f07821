"""What the serving tests share: a client of a registry, requests, test images, a probe that checks old answers
while the model changes, the GPU mark."""
import io
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving import ServeSettings, create_app

GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                                                reason="needs a CUDA device (run on a GPU host)")]


def on_gpu(test):
    """``pytest -m gpu`` selects it; skipped, saying why, without a CUDA device."""
    for mark in GPU_ONLY:
        test = mark(test)
    return test


def png(seed: int, size=(40, 30)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG with no pixel data: PIL reads its size from the header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def client(reg, **kw) -> TestClient:
    return TestClient(create_app(ServeSettings(registry=reg.url, poll_interval_s=0.05, max_wait_ms=1, **kw)))


def predict(c: TestClient, *images: bytes, **params):
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return c.post("/predict", files=files, params=params)


@contextmanager
def probing(c: TestClient, probe: bytes, tasks=("a", "b")):
    """Send ``probe`` again and again from a thread while the body runs; yields (the model versions that answered,
    the failures: a request that failed, or an old task whose logits differ from the first answer's)."""
    first = predict(c, probe, logits="true").json()
    base = {t: first["results"][0]["tasks"][t]["logits"] for t in tasks}
    seen, failures, stop = [], [], threading.Event()

    def flow():
        while not stop.is_set():
            r = predict(c, probe, logits="true")
            if r.status_code != 200:
                failures.append(r.text)
                continue
            body = r.json()
            seen.append(body["model_version"])
            failures.extend(f"task {t} changed at version {body['model_version']}" for t in tasks
                            if body["results"][0]["tasks"][t]["logits"] != base[t])

    worker = threading.Thread(target=flow)
    worker.start()
    try:
        yield seen, failures
    finally:
        time.sleep(0.2)  # answers of the last model too
        stop.set()
        worker.join()


def wait_for(c: TestClient, cond, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond(c.get("/health").json()):
            return
        time.sleep(0.02)
    raise AssertionError("the server did not pick up the change")
