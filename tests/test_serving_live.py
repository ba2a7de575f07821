"""The server while its model changes: another process adds and removes tasks as requests flow, old answers stay
bit-identical, a new model is prepared before it is swapped in; several worker processes share one model."""
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from registry_helpers import grow, two_task_registry  # noqa: E402
from serving_helpers import client, on_gpu, png, predict, probing, wait_for  # noqa: E402


@pytest.fixture
def registry(tmp_path):
    return two_task_registry(tmp_path)


def test_live_add_and_remove_keep_old_answers_bit_identical(registry):
    """Another process adds and removes tasks while requests flow: no request fails, every answer of an old task
    is the same bits before, during and after (CPU float32, one image per pass)."""
    reg, net = registry
    with client(reg, max_batch=1) as c:
        with probing(c, png(7)) as (seen, failures):
            grow(reg, net, "c", 3, memory=3)
            wait_for(c, lambda h: h["tasks"] == 3)
            grow(reg, net, "d", 4, layers="last:2")
            wait_for(c, lambda h: h["tasks"] == 4)
            reg.remove_task("c")
            wait_for(c, lambda h: h["tasks"] == 3)
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
        wait_for(c, lambda h: h["tasks"] == 3)
        assert len(prepared) == 1
        fresh, serving_then = prepared[0]
        assert serving_then != fresh and holder.current.version == fresh

        def broken(fresh):  # a failed preparation still swaps the model in (its graphs come on first use)
            fresh.graphs["stale"] = object()
            raise RuntimeError("capture failed")

        holder.prepare = broken
        grow(reg, net, "d", 4)
        wait_for(c, lambda h: h["tasks"] == 4)
        assert holder.current.graphs == {} and predict(c, png(0)).status_code == 200


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
        wait_for(c, lambda h: h["tasks"] == 3)
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
