"""HTTP processes in front of one shared model process (``serve --workers N``): the same answers as a model in the
app's own process, live changes reach the HTTP side, bad images fail alone, a lost model process is a 503."""
import dataclasses
import multiprocessing
import time

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from registry_helpers import grow, new_registry  # noqa: E402
from serving import ServeSettings, create_app  # noqa: E402
from serving.engine import run_model_process  # noqa: E402
from test_device_decode import bogus_huffman, jpeg  # noqa: E402
from serving_helpers import png, predict, probing  # noqa: E402


def start_model_process(settings: ServeSettings, path: str):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=run_model_process, args=(dataclasses.asdict(settings), path, ready), daemon=True)
    proc.start()
    assert ready.wait(180), f"the model process did not start (exit code {proc.exitcode})"
    return proc


@pytest.fixture
def shared(tmp_path, monkeypatch):
    """A registry, settings whose JPEGs decode inside the pass (their bytes cross the socket), and a model process
    serving them, writing its metrics where the HTTP side's /metrics reads them (as under ``serve --workers``);
    yields (registry, net, settings with the socket, the process)."""
    (tmp_path / "metrics").mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    reg, net = new_registry(tmp_path / "r.db")
    grow(reg, net, "a", 1)
    grow(reg, net, "b", 2, memory=2)
    settings = ServeSettings(registry=reg.url, poll_interval_s=0.05, max_wait_ms=1, jpeg_decode="device",
                             model_socket=str(tmp_path / "model.sock"))
    proc = start_model_process(settings, settings.model_socket)
    yield reg, net, settings, proc
    proc.terminate()
    proc.join(timeout=30)


def test_http_processes_get_the_answers_of_a_model_in_their_own_process(shared):
    reg, _, settings, _ = shared
    uploads = [jpeg(0), png(3), jpeg(1, (700, 200))]
    answers, tasks = {}, {}
    for mode, s in (("shared", settings), ("local", dataclasses.replace(settings, model_socket=""))):
        with TestClient(create_app(s)) as c:
            assert hasattr(c.app.state, "holder") == (mode == "local")  # no model loaded in the HTTP process
            answers[mode] = [predict(c, u, logits="true").json() for u in uploads]
            several = predict(c, *uploads, top_k=2).json()["results"]  # one request, three images
            assert [len(r["tasks"]["b"]["top"]) for r in several] == [2, 2, 2]
            tasks[mode] = c.get("/tasks").json()
            bad = predict(c, bogus_huffman(jpeg(0)))  # fails alone, with the local path's one line
            assert (bad.status_code, bad.json()["detail"]) == (
                400, "img0.png: cannot decode the image (Bogus Huffman table definition)")
            assert predict(c, png(3), tasks="z").status_code == 404
            health = c.get("/health").json()
            assert health["passes"] >= 4 and health["tasks"] == 2 and health["swaps"] == 0
            refused = predict(c, png(3), task_agnostic="true")  # no task has class statistics yet
            assert refused.status_code == 409 and "continual-mem stats a" in refused.json()["detail"]
    assert answers["shared"] == answers["local"]
    assert tasks["shared"] == tasks["local"]


def test_task_agnostic_answers_cross_the_socket(shared):
    import torch

    from continual_mem.class_stats import collect

    reg, _, settings, _ = shared
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        h = torch.randn(30, 48, generator=g) + 3 * torch.randn(1, 48, generator=g)
        reg.set_class_stats(name, collect(name, [(h, torch.arange(3).repeat_interleave(10))], 3))
    uploads = [jpeg(0), png(3), png(4)]
    got = {}
    for mode, s in (("shared", settings), ("local", dataclasses.replace(settings, model_socket=""))):
        with TestClient(create_app(s)) as c:
            deadline = time.time() + 30
            while predict(c, png(3), task_agnostic="true").status_code != 200 and time.time() < deadline:
                time.sleep(0.05)  # the model process picks the statistics up on its next poll
            got[mode] = predict(c, *uploads, task_agnostic="true").json()["results"]
    assert got["shared"] == got["local"]
    assert all(r["task_agnostic"]["task"] in ("a", "b") for r in got["shared"])


def test_live_add_and_remove_reach_the_http_side_with_old_answers_bit_identical(shared):
    reg, net, settings, _ = shared
    with TestClient(create_app(settings)) as c:
        with probing(c, jpeg(5)) as (seen, failures):
            grow(reg, net, "c", 3, memory=3)
            _wait_for_tasks(c, 3)
            reg.remove_task("c")
            _wait_for_tasks(c, 2)  # announced on the swap, without waiting for an answer of the new version
        assert failures == []
        assert len(set(seen)) >= 2
        assert c.get("/health").json()["swaps"] == 2
        version = c.get("/tasks").json()["model_version"]
        assert f"continual_mem_model_version {version:.1f}" in c.get("/metrics").text


def test_a_lost_model_process_is_a_503_not_a_crash(shared):
    _, _, settings, proc = shared
    with TestClient(create_app(settings)) as c:
        assert predict(c, png(1)).status_code == 200
        proc.terminate()
        proc.join(timeout=30)
        r = predict(c, png(1))
        for _ in range(50):  # the connection's end reaches the HTTP process's reader first
            if r.status_code == 503:
                break
            time.sleep(0.05)
            r = predict(c, png(1))
        assert r.status_code == 503 and "model process" in r.json()["detail"]
        assert c.get("/tasks").status_code == 200  # what it last knew


def _wait_for_tasks(c: TestClient, n: int, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if len(c.get("/tasks").json()["tasks"]) == n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the HTTP side did not see {n} tasks")
