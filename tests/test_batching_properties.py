"""Every image gets its own answer: property tests (hypothesis) of the dynamic batcher and of the HTTP server.

The bits of a row depend on the image and on the size of the pass it ran in, never on the other rows' content or
position (a fixed batch shape runs the same kernels; checked on the model directly first). So an image's answer
in any mix must equal the answer it gets alone, repeated to the same batch size. A batcher that hands a pass's
rows out in the wrong order, or one request another's rows, fails these."""
import asyncio
import io
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
hypothesis = pytest.importorskip("hypothesis", reason="needs the dev extra: pip install -e '.[dev]'")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import images as random_images  # noqa: E402
from registry_helpers import grow, new_registry  # noqa: E402
from scenarios.decode import BadImage  # noqa: E402
from serving import ServeSettings, create_app  # noqa: E402
from serving.batcher import Batcher  # noqa: E402
from serving.decoding import decode_upload  # noqa: E402
from serving.holder import ModelHolder  # noqa: E402
from serving.metrics import Metrics  # noqa: E402
from test_device_decode import bogus_huffman  # noqa: E402

GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                reason="needs a CUDA device (run `pytest -m gpu` on a GPU host)")]
PROPERTY = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reg, net = new_registry(tmp_path_factory.mktemp("props") / "r.db")
    grow(reg, net, "a", 1)
    grow(reg, net, "b", 2, memory=2)
    grow(reg, net, "c", 3, regime="head")
    return reg


def encoded(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


# one image of a batch: its pixels' seed, its size, and what reaches the batcher (decoded array, JPEG bytes that
# the pass decodes, or JPEG bytes whose Huffman table cannot be used)
ITEMS = st.tuples(st.integers(0, 10_000), st.tuples(st.integers(20, 90), st.integers(20, 90)),
                  st.sampled_from(["array", "jpeg", "bad-jpeg"]))


def as_input(item, device_decode: bool):
    seed, size, kind = item
    if kind == "array" or not device_decode:
        return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    data = encoded(seed, size, "JPEG")
    return bogus_huffman(data) if kind == "bad-jpeg" else data


def test_a_rows_bits_depend_on_the_batch_size_not_on_its_neighbours():
    # the premise of every test below, on the model itself: same batch size, other rows and positions, same bits
    from continual_mem import MemoryViT
    from helpers import make_backbone, perturb

    net = MemoryViT(make_backbone("dinov2"))
    perturb(net.add_task("a", 3))
    x = random_images(net.backbone, n=6)
    with torch.no_grad():
        full = net(x)
        for i in range(6):
            alone = net(x[i:i + 1].expand(6, -1, -1, -1).contiguous())
            shifted = net(torch.roll(x, shifts=2, dims=0))
            for key in full:
                assert torch.equal(alone[key][0], full[key][i]) and torch.equal(shifted[key][(i + 2) % 6], full[key][i])


@pytest.fixture(scope="module")
def holders(registry):
    """One loaded model per device, shared by the examples (each example gets a batcher of its own)."""
    made: dict[str, ModelHolder] = {}

    def get(device: str) -> ModelHolder:
        if device not in made:
            made[device] = ModelHolder(ServeSettings(registry=registry.url, device=device))
            made[device].current = made[device].load()
        return made[device]

    return get


def run_passes(holder: ModelHolder, *, passes, max_batch: int, device_decode: bool, overlap: bool):
    """Each pass's items submitted together (so they share one pass), the pass awaited before the next; returns
    every item's answer (logits, or the exception) and the batcher."""
    batcher = Batcher(holder, Metrics(), max_batch=max_batch, max_wait_ms=1, amp=False,
                      cuda_graphs=holder.device.type == "cuda", device_decode=device_decode, overlap=overlap)

    async def main():
        worker = asyncio.create_task(batcher.run())
        answers = []
        try:
            for items in passes:
                got = await asyncio.gather(*(batcher.submit(as_input(it, device_decode)) for it in items),
                                           return_exceptions=True)
                answers.append(got)
        finally:
            worker.cancel()
        return answers

    return asyncio.run(main()), batcher


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU_ONLY)])
@PROPERTY
@given(data=st.data())
def test_every_image_in_a_pass_gets_the_rows_it_gets_alone(holders, device, data):
    max_batch = data.draw(st.integers(2, 6), label="max_batch")
    passes = data.draw(st.lists(st.lists(ITEMS, min_size=1, max_size=max_batch), min_size=1, max_size=3),
                       label="passes")
    device_decode = data.draw(st.booleans(), label="device_decode")
    overlap = data.draw(st.booleans(), label="overlap")
    holder = holders(device)
    answers, batcher = run_passes(holder, passes=passes, max_batch=max_batch, device_decode=device_decode,
                                  overlap=overlap)
    served = holder.current
    assert batcher.passes == len(passes)  # each pass's images shared one pass
    for items, got in zip(passes, answers):
        good = [it for it in items if not (device_decode and it[2] == "bad-jpeg")]
        for item, answer in zip(items, got):
            if device_decode and item[2] == "bad-jpeg":
                assert isinstance(answer, BadImage), answer
                continue
            assert not isinstance(answer, BaseException), answer
            # alone: this image repeated to the size of the pass it shared (the bad ones take no row)
            alone = batcher._forward(served, [as_input(item, device_decode)] * len(good), observe=False)[0]
            assert set(answer.logits) == set(alone) == {"a", "b", "c"}
            for task, row in alone.items():
                assert np.array_equal(answer.logits[task], row), (task, item, items)


def test_a_pass_of_distinct_images_is_not_handed_out_in_another_order(holders):
    # the plain case the property above generalises: four images of one pass, each gets its own rows
    items = [(s, (40, 30), "array") for s in range(4)]
    holder = holders("cpu")
    (got,), batcher = run_passes(holder, passes=[items], max_batch=4, device_decode=False, overlap=False)
    served = holder.current
    assert batcher.passes == 1
    for item, answer in zip(items, got):
        alone = batcher._forward(served, [as_input(item, False)] * 4, observe=False)[0]
        assert all(np.array_equal(answer.logits[t], alone[t]) for t in alone)
    assert not np.array_equal(got[0].logits["a"], got[1].logits["a"])  # the images do differ


# ------------------------------------------------------------------ the HTTP server under concurrent requests
UPLOADS = st.tuples(st.integers(0, 10_000), st.tuples(st.integers(20, 90), st.integers(20, 90)),
                    st.sampled_from(["PNG", "JPEG", "not-an-image"]))
REQUESTS = st.lists(st.tuples(st.lists(UPLOADS, min_size=1, max_size=3),
                              st.sampled_from(["", "a", "b", "c", "a,c", "c,b"])), min_size=1, max_size=6)
MAX_BATCH = 4


@pytest.fixture(scope="module")
def server(registry):
    settings_ = ServeSettings(registry=registry.url, poll_interval_s=0, max_wait_ms=20, max_batch=MAX_BATCH)
    with TestClient(create_app(settings_)) as c:
        yield c


def upload_bytes(upload) -> bytes:
    seed, size, fmt = upload
    return b"definitely not an image " + bytes([seed % 256]) if fmt == "not-an-image" else encoded(seed, size, fmt)


@settings(PROPERTY, max_examples=10)
@given(requests=REQUESTS)
def test_concurrent_requests_each_get_their_own_images_answers(server, requests):
    # random mixes of requests (1-3 images, some not images, task filters) sent at once: every image's logits
    # are the ones it gets alone at some batch size the server may have run it at, for exactly the tasks asked
    app = server.app
    served = app.state.holder.current
    batcher = app.state.batcher
    alone_cache: dict = {}

    def alone(upload) -> list[dict]:
        if upload not in alone_cache:
            arr = decode_upload(upload_bytes(upload), name="x", max_pixels=10**8)
            # in turn with the batch worker: a request answered 400 for one bad upload may still have its other
            # images in a pass (the pass owns the model while it runs)
            with app.state.holder.cpu_turns:
                alone_cache[upload] = [batcher._forward(served, [arr] * b, observe=False)[0]
                                       for b in range(1, MAX_BATCH + 1)]
        return alone_cache[upload]

    replies: dict[int, object] = {}

    def send(i, uploads, tasks):
        files = [("files", (f"img{j}", upload_bytes(u), "application/octet-stream")) for j, u in enumerate(uploads)]
        replies[i] = server.post("/predict", files=files, params={"tasks": tasks, "logits": "true"})

    threads = [threading.Thread(target=send, args=(i, *req)) for i, req in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (uploads, tasks) in enumerate(requests):
        r = replies[i]
        if any(u[2] == "not-an-image" for u in uploads):
            assert r.status_code == 400 and "not an image" in r.json()["detail"], r.text
            continue
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert [x["image"] for x in results] == [f"img{j}" for j in range(len(uploads))]
        wanted = tasks.split(",") if tasks else ["a", "b", "c"]
        for upload, result in zip(uploads, results):
            assert list(result["tasks"]) == wanted
            got = {t: np.asarray(result["tasks"][t]["logits"], dtype=np.float32) for t in wanted}
            assert any(all(np.array_equal(got[t], candidate[t]) for t in wanted) for candidate in alone(upload)), \
                (upload, tasks)
