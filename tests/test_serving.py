"""The HTTP server: contract, dynamic batching, bad uploads, batch buckets and graphs, nvJPEG in the pass."""
import base64
import io
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from registry_helpers import two_task_registry  # noqa: E402
from scenarios.decode import MAX_ASPECT, SHORT_SIDE  # noqa: E402
from serving import ServeSettings, create_app  # noqa: E402
from serving_helpers import GPU_ONLY, client, on_gpu, png, png_header, predict  # noqa: E402


@pytest.fixture
def registry(tmp_path):
    return two_task_registry(tmp_path)


def test_a_model_without_tasks_answers_every_image_with_no_tasks(tmp_path):
    from registry_helpers import new_registry

    reg, _ = new_registry(tmp_path / "empty.db")
    with client(reg) as c:
        r = predict(c, png(1), png(2))
        assert r.status_code == 200, r.text
        assert [res["tasks"] for res in r.json()["results"]] == [{}, {}]


def test_paged_forks_are_served_from_host_memory_with_the_resident_answers(tmp_path):
    from registry_helpers import grow, new_registry

    reg, net = new_registry(tmp_path / "forks.db")
    for i, name in enumerate(("f1", "f2", "f3")):
        grow(reg, net, name, i + 1, fork_layers=2, fork_finetune=True)
    grow(reg, net, "m", 4)
    uploads = [png(1), png(2)]
    answers = {}
    for paged in (False, True):
        # one image a request: with one slot the paged server runs two images' passes apart (serving.admission),
        # and on the CPU a pass's bits depend on its batch size
        with client(reg, page_forks=paged, resident_tasks=1 if paged else None) as c:
            got = [predict(c, up, tasks="f1,f3,m,f2", logits="true") for up in uploads]
            assert all(g.status_code == 200 for g in got), [g.text for g in got]
            answers[paged] = [g.json()["results"][0]["tasks"] for g in got]
            if paged:  # no all-task pass: requests without tasks= get a routed pass of every task
                every = [predict(c, up, logits="true").json()["results"][0]["tasks"] for up in uploads]
                assert every == answers[paged]
    assert answers[True] == answers[False]
    assert list(answers[True][0]) == ["f1", "f3", "m", "f2"]


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
    # the pass closes when the fourth image arrives (max_batch), however slowly a loaded host delivers them
    with TestClient(create_app(ServeSettings(registry=reg.url, max_batch=4, max_wait_ms=20_000,
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
        graphs = c.app.state.holder.current.graphs  # the all-task graph and the routed one, of every bucket
        assert set(graphs) == {1, 2, 4, 8} | {("routed", b) for b in (1, 2, 4, 8)}
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
def test_an_image_naming_several_forks_stays_in_the_routed_graph_on_cuda(tmp_path, monkeypatch):
    """As served (nvJPEG, bf16, captured graphs): an image asking three forks of one family runs as three graph
    rows, no eager pass, and each answer is what an image asking that fork alone gets at the same bucket."""
    from continual_mem import MemoryViT
    from registry_helpers import grow, new_registry
    from serving.batcher import Batcher
    from serving.holder import ModelHolder
    from serving.metrics import Metrics
    from test_device_decode import jpeg

    reg, net = new_registry(tmp_path / "forks.db")
    for i, name in enumerate(("f1", "f2", "f3")):
        grow(reg, net, name, i + 1, fork_layers=2, fork_finetune=True)
    grow(reg, net, "m", 4)
    holder = ModelHolder(ServeSettings(registry=reg.url, device="cuda", poll_interval_s=0))
    served = holder.current = holder.load()
    b = Batcher(holder, Metrics(), max_batch=8, max_wait_ms=1, amp=True, device_decode=True)
    b.warm(served)
    eager = []
    real = MemoryViT.forward_routed
    monkeypatch.setattr(MemoryViT, "forward_routed", lambda *a, **k: eager.append(1) or real(*a, **k))
    uploads = [jpeg(0), jpeg(1, (700, 200))]
    got = b._forward(served, uploads, asked=[("f3", "m", "f1", "f2"), ("f2",)])
    assert not eager and [list(a) for a in got] == [["f3", "m", "f1", "f2"], ["f2"]]
    alone = b._forward(served, [uploads[0]] * 3 + [uploads[1]], asked=[("f3", "m"), ("f1",), ("f2",), ("f2",)])
    for i, part in ((0, ("f3", "m")), (1, ("f1",)), (2, ("f2",)), (3, ("f2",))):
        for name in part:
            assert np.array_equal(got[0 if i < 3 else 1][name], alone[i][name]), (i, name)


def test_task_agnostic_answers_are_the_library_s_and_need_every_task_s_statistics(tmp_path):
    """?task_agnostic=true: one answer over every task's classes, the same as class_stats.predict on eval's input;
    refused (409, one line, the fix) while a task has no statistics, and with tasks= (400)."""
    import tempfile
    from pathlib import Path

    import torch

    from continual_mem.class_stats import TaskAgnostic, backbone_features, collect, predict as agnostic_predict
    from registry_helpers import new_registry
    from scenarios.decode import FilesReader
    from scenarios.pipeline import Preprocess
    from scenarios.streaming import DecodedImages

    reg, net = new_registry(tmp_path / "r.db")
    images = [png(s, (64, 48)) for s in range(3)]
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, data in enumerate(images):
            (Path(d) / f"{i}.png").write_bytes(data)
            paths.append(str(Path(d) / f"{i}.png"))
        src = DecodedImages(FilesReader(paths, np.zeros(3, dtype=np.int64)),
                            Preprocess.for_backbone(net.backbone, "inception"), workers=0)
        x, _ = next(iter(src.eval_batches(3)))
    feats = backbone_features(net, x)
    g = torch.Generator().manual_seed(0)

    def stats_around(name, means):  # tight classes around ``means``: the answers are known
        h = torch.cat([m + 1e-3 * torch.randn(10, m.numel(), generator=g) for m in means])
        return collect(name, [(h, torch.arange(len(means)).repeat_interleave(10))], len(means))

    far = [100 + torch.randn(48, generator=g) for _ in range(3)]
    net.add_task("a", 3)
    reg.add_task(net, "a", class_stats=stats_around("a", [far[0], feats[1], far[1]]))  # image 1: a, class 1
    net.add_task("b", 4)
    reg.add_task(net, "b")
    with client(reg) as c:
        r = predict(c, *images, task_agnostic="true")
        assert r.status_code == 409 and "tasks ['b'] have none" in r.json()["detail"]
        assert "continual-mem stats b" in r.json()["detail"] and "\n" not in r.json()["detail"]
        reg.set_class_stats("b", stats_around("b", [far[2], feats[2], feats[0], 200 + far[2]]))  # 0: b 2; 2: b 1
        deadline = time.time() + 10
        while predict(c, images[0], task_agnostic="true").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)  # the server picks the statistics up on its next poll
        got = predict(c, *images, task_agnostic="true").json()["results"]
        assert predict(c, images[0], tasks="a", task_agnostic="true").status_code == 400
    assert [(r["task_agnostic"]["task"], r["task_agnostic"]["index"]) for r in got] == [("b", 2), ("a", 1), ("b", 1)]
    net = reg.load()
    agn = TaskAgnostic(reg.class_stats())
    task, cls = agnostic_predict(net.eval(), agn, x)
    expected = [{"task": agn.tasks[t], "index": c, "class": net.tasks[agn.tasks[t]].config.class_labels[c]}
                for t, c in zip(task.tolist(), cls.tolist())]
    assert [r["task_agnostic"] for r in got] == expected
    assert all(r["tasks"] == {} for r in got)
    # beside images that name their tasks, the same answer (a row never depends on its neighbours)
    from serving.agnostic import AGNOSTIC
    from serving.batcher import Batcher
    from serving.holder import ModelHolder
    from serving.metrics import Metrics

    holder = ModelHolder(ServeSettings(registry=reg.url))
    served = holder.current = holder.load()
    b = Batcher(holder, Metrics(), max_batch=4, max_wait_ms=1, amp=False)
    arrays = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in images]
    alone = b._forward(served, arrays, asked=[(AGNOSTIC,)] * 3)
    mixed = b._forward(served, arrays, asked=[("a",), (AGNOSTIC,), ("b",)])
    assert np.array_equal(mixed[1][AGNOSTIC], alone[1][AGNOSTIC])
    assert AGNOSTIC not in mixed[0] and set(mixed[1]) == {AGNOSTIC}  # the backbone alone ran for it
    assert [int(v) for v in alone[1][AGNOSTIC]] == [agn.tasks.index(expected[1]["task"]), expected[1]["index"]]
