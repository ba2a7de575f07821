"""The HTTP server: contract, dynamic batching, live add/remove with old answers bit-identical, bad uploads."""
import base64
import io
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from registry_helpers import grow, new_registry  # noqa: E402
from scenarios.decode import MAX_ASPECT, SHORT_SIDE  # noqa: E402
from serving import ServeSettings, create_app  # noqa: E402


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


@pytest.fixture
def registry(tmp_path):
    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "a", 1)
    grow(reg, net, "b", 2, memory=2)
    return reg, net


def client(reg, **kw) -> TestClient:
    return TestClient(create_app(ServeSettings(registry=reg.url, poll_interval_s=0.05, max_wait_ms=1, **kw)))


def predict(c: TestClient, *images: bytes, **params):
    files = [("files", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return c.post("/predict", files=files, params=params)


def test_top_probabilities_are_torch_softmax_and_topk():
    import torch

    from serving.app import top_probabilities

    row = np.random.default_rng(0).normal(size=300).astype(np.float32) * 5
    p, idx = top_probabilities(row, 7)
    ref_p, ref_idx = torch.from_numpy(row).double().softmax(-1).topk(7)
    assert idx == ref_idx.tolist()
    np.testing.assert_allclose(p, ref_p.numpy(), rtol=1e-6)
    assert top_probabilities(row[:3], 5)[1] == np.argsort(-row[:3]).tolist()  # k beyond the classes: all of them


def test_jpegs_decoded_in_the_pass_get_the_host_paths_answers(registry):
    # --jpeg-decode device (nvJPEG on CUDA; libjpeg-turbo inside the pass here) against the host's decode workers:
    # the same logits bit for bit, PNGs still decoded on the host, and a JPEG whose header reads but whose data
    # cannot be decoded gets the same one-line 400 either way
    from test_device_decode import bogus_huffman, jpeg

    reg, _ = registry
    uploads = [jpeg(0), jpeg(1, (700, 200)), png(3)]
    answers, in_pass = {}, {}
    for mode in ("host", "device"):
        with client(reg, jpeg_decode=mode) as c:
            answers[mode] = [predict(c, u, logits="true").json()["results"][0]["tasks"] for u in uploads]
            bad = predict(c, bogus_huffman(jpeg(0)))
            assert bad.status_code == 400, bad.text
            assert bad.json()["detail"] == "img0.png: cannot decode the image (Bogus Huffman table definition)"
            assert predict(c, uploads[0]).status_code == 200  # and the server goes on
            in_pass[mode] = [float(line.split()[1]) for line in c.get("/metrics").text.splitlines()
                             if line.startswith("continual_mem_device_decoded_images_total")][0]
    assert answers["device"] == answers["host"]
    assert in_pass == {"host": 0.0, "device": 4.0}  # three good JPEGs and the bad one; never the PNG


def test_contract(registry):
    reg, _ = registry
    with client(reg) as c:
        assert c.get("/health").json()["status"] == "ok"
        tasks = c.get("/tasks").json()
        assert [t["name"] for t in tasks["tasks"]] == ["a", "b"] and tasks["model_version"] > 0
        r = predict(c, png(0), png(1), top_k=2, logits="true")
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["image"] for x in body["results"]] == ["img0.png", "img1.png"]
        a = body["results"][0]["tasks"]["a"]
        assert len(a["top"]) == 2 and set(a["top"][0]) == {"class", "index", "prob"} and len(a["logits"]) == 3
        only = predict(c, png(0), tasks="b").json()["results"][0]["tasks"]
        assert list(only) == ["b"] and only["b"]["logits"] is None
        single = predict(c, png(0), logits="true").json()["results"][0]["tasks"]["a"]["logits"]
        b64 = c.post("/predict", json={"images": [base64.b64encode(png(0)).decode()]}, params={"logits": "true"})
        assert b64.json()["results"][0]["tasks"]["a"]["logits"] == single  # same image, same batch shape
        text = c.get("/metrics").text
        assert 'continual_mem_requests_total{endpoint="/predict",status="200"} 4.0' in text
        assert "continual_mem_pass_seconds_count" in text
        assert "continual_mem_batch_size_bucket" in text and 'continual_mem_task_images_total{task="a"}' in text
        counts = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if "_count " in line}
        assert counts["continual_mem_decode_seconds_count"] == 5  # every upload, in its worker
        assert counts["continual_mem_pass_thread_seconds_count"] == counts["continual_mem_pass_seconds_count"] > 0
        assert counts["continual_mem_pass_device_seconds_count"] == 0  # CUDA only
        lag = "continual_mem_event_loop_lag_seconds_count"
        for _ in range(100):  # the loop's 50 ms timer has fired at least once (bounded wait, not a timing check)
            if float(c.get("/metrics").text.split(lag, 1)[1].split()[0]) > 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the event-loop lag was never observed")


def test_answers_match_the_model_offline(registry):
    """The served logits are eval's: the same preprocessing (shrink, timm centre crop on the device) and model."""
    import torch

    from scenarios.decode import FilesReader
    from scenarios.pipeline import Preprocess
    from scenarios.streaming import DecodedImages

    reg, _ = registry
    net = reg.load()
    with client(reg) as c:
        served = predict(c, png(5, (64, 48)), logits="true").json()["results"][0]["tasks"]
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "x.png").write_bytes(png(5, (64, 48)))
        src = DecodedImages(FilesReader([str(Path(d) / "x.png")], np.zeros(1, dtype=np.int64)),
                            Preprocess.for_backbone(net.backbone, "inception"), workers=0)
        x, _ = next(iter(src.eval_batches(1)))
    with torch.no_grad():
        offline = net(x, original=False)
    for task in ("a", "b"):
        assert torch.equal(torch.tensor(served[task]["logits"]), offline[task][0])


def test_concurrent_requests_share_one_pass(registry):
    reg, _ = registry
    with TestClient(create_app(ServeSettings(registry=reg.url, max_batch=8, max_wait_ms=300,
                                             poll_interval_s=0))) as c:
        before = c.get("/health").json()["passes"]
        codes = []

        def one(i):
            codes.append(predict(c, png(i)).status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200] * 4
        assert c.get("/health").json()["passes"] - before == 1
        assert 'continual_mem_batch_size_bucket{le="4.0"} 1.0' in c.get("/metrics").text


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU_ONLY)])
def test_overlapped_passes_hand_each_image_its_own_rows(registry, device):
    # --overlap-passes on: a pass is launched before the previous one's answers are read back; with one image per
    # pass and twelve concurrent requests, every image must still get exactly the logits it gets alone (on CUDA:
    # graphs of bucket 1, JPEGs decoded by nvJPEG while the previous pass runs)
    from test_device_decode import jpeg

    reg, _ = registry
    images = [png(i) if i % 2 else jpeg(i) for i in range(12)]
    with client(reg, max_batch=1, device=device, overlap_passes="off") as c:
        alone = [predict(c, im, logits="true").json()["results"][0]["tasks"] for im in images]
    with client(reg, max_batch=1, device=device, overlap_passes="on") as c:
        assert c.app.state.batcher.overlap
        got: dict[int, dict] = {}

        def one(i):
            got[i] = predict(c, images[i], logits="true").json()["results"][0]["tasks"]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(images))] == alone
        assert c.get("/health").json()["passes"] == len(images)


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


def test_live_add_and_remove_keep_old_answers_bit_identical(registry):
    """Another process adds and removes tasks while requests flow: no request fails, every answer of an old task
    is the same bits before, during and after (CPU float32, one image per pass)."""
    reg, net = registry
    with client(reg, max_batch=1) as c:
        with probing(c, png(7)) as (seen, failures):
            grow(reg, net, "c", 3, memory=3)
            _wait_for(c, lambda h: h["tasks"] == 3)
            grow(reg, net, "d", 4, layers="last:2")
            _wait_for(c, lambda h: h["tasks"] == 4)
            reg.remove_task("c")
            _wait_for(c, lambda h: h["tasks"] == 3)
        assert failures == []
        assert len(set(seen)) >= 3  # answers came from at least three models while it changed
        now = predict(c, png(7)).json()["results"][0]["tasks"]
        assert sorted(now) == ["a", "b", "d"]
        assert c.get("/health").json()["swaps"] == 3


def test_a_new_model_is_prepared_before_it_is_swapped_in(registry):
    # the app's prepare hook (on CUDA: capture every bucket's graph) runs on the loaded model while the old one
    # still serves; only then does the swap happen
    reg, net = registry
    with client(reg, jpeg_decode="device") as c:
        holder = c.app.state.holder
        assert holder.prepare == c.app.state.batcher.warm
        prepared = []

        def spy(fresh):
            prepared.append((fresh.version, holder.current.version))
            holder_warm(fresh)

        holder_warm, holder.prepare = holder.prepare, spy
        grow(reg, net, "c", 3)
        _wait_for(c, lambda h: h["tasks"] == 3)
        assert len(prepared) == 1
        fresh, serving_then = prepared[0]
        assert serving_then != fresh and holder.current.version == fresh

        def broken(fresh):  # a failed preparation still swaps the model in (its graphs come on first use)
            fresh.graphs["stale"] = object()
            raise RuntimeError("capture failed")

        holder.prepare = broken
        grow(reg, net, "d", 4)
        _wait_for(c, lambda h: h["tasks"] == 4)
        assert holder.current.graphs == {} and predict(c, png(0)).status_code == 200


def _wait_for(c: TestClient, cond, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond(c.get("/health").json()):
            return
        time.sleep(0.02)
    raise AssertionError("the server did not pick up the change")


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_bad_requests_get_one_line_4xx(registry, workers):
    # the same answers whether uploads decode in threads or in worker processes (errors cross the boundary)
    reg, _ = registry
    with client(reg, max_upload_bytes=50_000, max_pixels=100_000, decode_workers=workers) as c:
        def detail(r, code):
            assert r.status_code == code, r.text
            d = r.json()["detail"]
            assert isinstance(d, str) and "\n" not in d
            return d

        assert "not an image" in detail(predict(c, b"hello"), 400)
        jpeg = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(jpeg, "JPEG")
        cut = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
        assert "cannot decode the image (Image is incomplete or truncated)" in detail(predict(c, cut), 400)
        flat = io.BytesIO()
        Image.new("RGB", (400, 300), (10, 20, 30)).save(flat, "PNG")  # small file, many pixels
        assert "400x300 = 120,000 pixels; the limit is 100,000" in detail(predict(c, flat.getvalue()), 413)
        assert "limit is 50,000" in detail(predict(c, b"x" * 60_000), 413)
        # past twice PIL's own pixel limit (a decompression bomb to PIL): too large, not "not an image"
        assert "900,000,000 pixels; the limit is 100,000" in detail(predict(c, png_header(30_000, 30_000)), 413)
        assert "unknown task 'zz'" in detail(predict(c, png(1), tasks="a,zz"), 404)
        assert "base64" in detail(c.post("/predict", json={"pictures": []}), 400)
        assert detail(c.post("/predict", content=b"raw", headers={"content-type": "text/plain"}), 415)
        assert predict(c, png(2)).status_code == 200  # still serving


def test_a_request_refused_for_one_bad_upload_runs_no_pass(registry):
    reg, _ = registry
    with client(reg) as c:
        before = c.get("/health").json()["passes"]
        r = predict(c, png(1), b"hello", png(2))
        assert r.status_code == 400 and "img1.png: not an image" in r.json()["detail"]
        time.sleep(0.2)  # a pass queued anyway would have run by now
        assert c.get("/health").json()["passes"] == before
        assert predict(c, png(1)).status_code == 200 and c.get("/health").json()["passes"] == before + 1


def test_decoding_in_processes_gives_the_threads_answers(registry):
    from serving.decoding import use_processes

    assert use_processes("auto", "cuda:0") and not use_processes("auto", "cpu")
    assert use_processes("processes", "cpu") and not use_processes("threads", "cuda")
    reg, _ = registry
    answers = []
    for workers in ("threads", "processes"):
        with client(reg, decode_workers=workers) as c:
            assert c.app.state.decoders.processes == (workers == "processes")
            answers.append(predict(c, png(3), logits="true").json()["results"])
    assert answers[0] == answers[1]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="switch_interval_ms"):
        ServeSettings(registry="x", switch_interval_ms=0)
    with pytest.raises(ValueError, match="decode_workers"):
        ServeSettings(registry="x", decode_workers="fibers")
    with pytest.raises(ValueError, match="overlap_passes"):
        ServeSettings(registry="x", overlap_passes="sometimes")
    assert ServeSettings(registry="x", device="cuda").overlap and not ServeSettings(registry="x").overlap
    with pytest.raises(ValueError, match="max_batch"):
        ServeSettings(registry="x.db", max_batch=0)
    with pytest.raises(ValueError, match="device"):
        ServeSettings(registry="x.db", device="tpu")


def test_batch_buckets_are_powers_of_two_up_to_max_batch():
    from serving.batcher import bucket_for

    assert [bucket_for(n, 64) for n in (1, 2, 3, 4, 5, 17, 33, 64)] == [1, 2, 4, 4, 8, 32, 64, 64]
    assert [bucket_for(n, 48) for n in (33, 48)] == [48, 48]
    with pytest.raises(ValueError, match="1 <= n <= max_batch"):
        bucket_for(65, 64)


@on_gpu
def test_graph_buckets_answer_what_the_eager_pass_does_at_the_same_shape(registry):
    """The served pass replayed from a CUDA graph at its bucket (padded rows) gives the eager pass's bits there,
    and the original head is not returned as a task."""
    from serving.batcher import Batcher
    from serving.holder import ModelHolder
    from serving.metrics import Metrics

    reg, _ = registry
    settings = ServeSettings(registry=reg.url, device="cuda", poll_interval_s=0)
    holder = ModelHolder(settings)
    served = holder.current = holder.load()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(3)]
    graphed = Batcher(holder, Metrics(), max_batch=8, max_wait_ms=1, amp=True)._forward(served, images)
    assert list(served.graphs) == [4] and set(graphed[0]) == {"a", "b"}
    eager = Batcher(holder, Metrics(), max_batch=8, max_wait_ms=1, amp=True, cuda_graphs=False)
    padded = eager._forward(served, images + [images[-1]])
    for g, e in zip(graphed, padded):
        for task in ("a", "b"):
            assert np.array_equal(g[task], e[task])


@on_gpu
def test_every_bucket_is_captured_at_start_up_and_decoding_runs_in_processes(registry):
    reg, _ = registry
    with client(reg, device="cuda", max_batch=8) as c:
        assert sorted(c.app.state.holder.current.graphs) == [1, 2, 4, 8]
        assert c.app.state.decoders.processes  # auto on CUDA
        assert predict(c, png(0)).status_code == 200
        text = c.get("/metrics").text
        assert "continual_mem_pass_device_seconds_count 1.0" in text  # the one request's pass, not the warm-up


@on_gpu
def test_jpegs_are_decoded_by_nvjpeg_inside_the_pass_on_cuda(registry):
    # auto on CUDA: complete JPEGs go to the batch as bytes; nvJPEG's pixels are libjpeg-turbo's within a few
    # levels (its IDCT differs), the same upload gets the same bits every time, a bad file fails only itself
    import torch

    from serving.device_decode import decode_jpegs
    from test_device_decode import bogus_huffman

    from scenarios.synthetic import photo

    # photo-like files: on per-pixel noise the two decoders' chroma upsampling differs by ~7 levels on average
    files = [photo(0, label=1, size=(500, 375)), photo(1, label=2, size=(700, 200))]
    on_gpu = decode_jpegs(files, device=torch.device("cuda"), short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
    on_host = decode_jpegs(files, device=torch.device("cpu"), short_side=SHORT_SIDE, max_aspect=MAX_ASPECT)
    for g, h in zip(on_gpu, on_host):
        assert g.is_cuda and g.shape == h.shape
        gap = float((g.cpu().int() - h.int()).abs().float().mean())
        assert gap < 3.0, f"nvJPEG and libjpeg-turbo differ by {gap:.2f} levels on average"
    reg, _ = registry
    with client(reg, device="cuda", max_batch=8) as c:
        first = predict(c, files[0], logits="true").json()["results"][0]["tasks"]
        bad = predict(c, bogus_huffman(files[0]))
        assert bad.status_code == 400 and "cannot decode the image" in bad.json()["detail"], bad.text
        assert predict(c, files[0], logits="true").json()["results"][0]["tasks"] == first
        text = c.get("/metrics").text
        assert "continual_mem_device_decoded_images_total 3.0" in text, text


@on_gpu
def test_a_live_add_on_cuda_captures_the_new_graphs_beside_the_serving_ones(registry):
    # the new model's graphs are captured in the loader's thread while requests keep flowing through the old
    # model's; no request fails, the swapped-in model has every bucket, old tasks keep their bits
    from scenarios.synthetic import photo

    reg, net = registry
    probe = photo(3, label=1, size=(500, 375))
    with client(reg, device="cuda", max_batch=4) as c:
        before = predict(c, probe, logits="true").json()["results"][0]["tasks"]
        stop, failures = threading.Event(), []

        def flow():
            while not stop.is_set():
                r = predict(c, probe)
                if r.status_code != 200:
                    failures.append(r.text)

        worker = threading.Thread(target=flow)
        worker.start()
        grow(reg, net, "c", 3)
        _wait_for(c, lambda h: h["tasks"] == 3)
        time.sleep(0.2)
        stop.set()
        worker.join()
        assert failures == []
        assert sorted(c.app.state.holder.current.graphs) == [1, 2, 4]
        after = predict(c, probe, logits="true").json()["results"][0]["tasks"]
        assert {t: after[t] for t in before} == before


@pytest.mark.slow
def test_several_worker_processes_share_the_port_and_their_metrics(registry, tmp_path):
    # serve --workers 2: every request answered, the same image gets the same bits from whichever worker, and a
    # scrape of any worker counts the requests of both (prometheus_client's multiprocess mode)
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    reg, _ = registry
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "cli", "--registry", reg.url, "serve", "--port", str(port), "--workers", "2",
         "--device", "cpu", "--poll-s", "0"], cwd=root, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(root)})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.1)
        answers = []
        for _ in range(8):  # new connections: the kernel spreads them over the workers
            with httpx.Client(timeout=30) as c:
                r = c.post(f"{url}/predict", files=[("files", ("x.png", png(4), "image/png"))],
                           params={"logits": "true"})
                assert r.status_code == 200, r.text
                answers.append(r.json()["results"])
        assert all(a == answers[0] for a in answers)
        text = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'continual_mem_requests_total{endpoint="/predict",status="200"} 8.0' in text
        # the version comes from the one model process (an HTTP process reporting 0 would win the "livemin")
        version = httpx.get(f"{url}/tasks", timeout=5).json()["model_version"]
        assert f"continual_mem_model_version {version:.1f}" in text
        # a model process that dies takes the server down with it (its HTTP processes could only answer 503)
        model_pid = httpx.get(f"{url}/health", timeout=5).json()["model_pid"]
        assert model_pid != server.pid
        os.kill(model_pid, 9)
        assert server.wait(timeout=60) != 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "Started parent process" in text and text.count("Started server process") == 2
    assert text.count("model process: serving default") == 1  # one model for both HTTP processes
    assert "error: the model process exited with code -9 while serving" in text
