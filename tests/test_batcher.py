"""The dynamic batcher on its own, with a stand-in model whose logits name the image they came from: which images
share a pass, the order rows are handed out in, overlapped passes, failures, undecodable images and the metrics.
Milliseconds per test, so a mutation run of `serving/batcher.py` can afford them (the property tests in
`test_batching_properties.py` check the same promises on a real model)."""
import asyncio
import io
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("prometheus_client", reason="needs the serve extra: pip install -e '.[serve]'")

from PIL import Image  # noqa: E402

from scenarios.decode import BadImage  # noqa: E402
from serving.batcher import Answer, Batcher  # noqa: E402
from serving.routing import answer_rows, bucket_for, routes_for  # noqa: E402
from serving.metrics import Metrics  # noqa: E402
from test_device_decode import bogus_huffman  # noqa: E402


class Stage:
    """The device stage's interface: each image becomes one number, its first pixel's red value."""

    pre = SimpleNamespace(img_size=16)

    def __call__(self, canvas, hw, labels, *, train):
        assert train is False and labels.dtype == torch.int64 and len(labels) == len(canvas) == len(hw)
        return canvas[:, 0, 0, 0].float(), labels

    def __init__(self):
        self.shapes = []  # of the images that reach the stage on the device path

    def from_images(self, tensors):
        self.shapes += [tuple(t.shape) for t in tensors]
        return torch.stack([t[0, 0, 0].float() for t in tensors])


class Net:
    """Per image value v: task "a" gives [v, v + 0.5], task "b" [2v, 3v, 4v]; "original" is not a served task.
    ``fail`` makes the next call raise; ``calls`` counts passes and their sizes."""

    task_names = ["a", "b"]

    def __init__(self):
        self.fail, self.calls, self.delay_s, self.routed = None, [], 0.0, []

    def forward_routed(self, x, routes, *, original=False):
        """Each row only its own tasks, from the same numbers; ``routed`` records each routed pass's routes."""
        self.routed.append([list(r) for r in routes])
        out = self(x, original=original)
        return [{name: out[name][b] for name in r} for b, r in enumerate(routes)]

    def __call__(self, x, *, original):
        assert original is False and not torch.is_autocast_enabled("cpu")  # amp is for CUDA only
        self.calls.append(len(x))
        time.sleep(self.delay_s)
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return {"original": torch.full((len(x), 7), -1.0), "a": torch.stack([x, x + 0.5], 1),
                "b": torch.stack([2 * x, 3 * x, 4 * x], 1)}


def served(version: int = 3):
    return SimpleNamespace(net=Net(), version=version, stage=Stage(), classes={"a": ("p", "q"), "b": ("x", "y", "z")},
                           graphs={}, paged=False, paged_tasks=frozenset(), agnostic=None)


def holder(model=None):
    return SimpleNamespace(device=torch.device("cpu"), current=model or served(), cpu_turns=threading.Lock())


def image(v: int) -> np.ndarray:
    return np.full((5 + v % 3, 4 + v % 2, 3), v, dtype=np.uint8)


def jpeg(v: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)).save(out, "JPEG", quality=100)
    return out.getvalue()


def expected(v: float) -> dict[str, list[float]]:
    return {"a": [v, v + 0.5], "b": [2 * v, 3 * v, 4 * v]}


def batcher_for(h, **kw) -> Batcher:
    opts = dict(max_batch=4, max_wait_ms=1, amp=False)
    return Batcher(h, Metrics(), **{**opts, **kw})


async def serve(b: Batcher, rounds, *, pause_s: float = 0.0):
    """Each round's images submitted together and awaited; returns each round's answers (or exceptions)."""
    worker = asyncio.create_task(b.run())
    out = []
    try:
        for images in rounds:
            futs = []
            for im in images:
                im, tasks = im if isinstance(im, tuple) else (im, None)  # (image, its tasks)
                futs.append(asyncio.ensure_future(b.submit(im, tasks)))
                if pause_s:
                    await asyncio.sleep(pause_s)
            out.append(await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 10))
    finally:
        worker.cancel()
    return out


def check(answer, v: float, model) -> None:
    assert isinstance(answer, Answer), answer
    assert answer.version == model.version and answer.served is model
    assert list(answer.logits) == ["a", "b"]  # served tasks only, in the model's order
    for task, want in expected(v).items():
        assert answer.logits[task].dtype == np.float32 and answer.logits[task].tolist() == want, (task, v)


@pytest.mark.parametrize("overlap", [False, True])
def test_each_image_gets_its_own_rows_in_every_pass(overlap):
    h = holder()
    b = batcher_for(h, overlap=overlap)
    rounds = [[image(v) for v in (10, 20, 30, 40)], [image(5)], [image(v) for v in (7, 9)]]
    got = asyncio.run(serve(b, rounds))
    for images, answers in zip(rounds, got):
        for im, answer in zip(images, answers):
            check(answer, float(im[0, 0, 0]), h.current)
    assert b.passes == 3 and h.current.net.calls == [4, 1, 2]


def test_a_pass_takes_at_most_max_batch_images_and_whatever_is_queued():
    h = holder()
    b = batcher_for(h, max_batch=3)
    values = list(range(1, 8))
    (got,) = asyncio.run(serve(b, [[image(v) for v in values]]))
    for v, answer in zip(values, got):
        check(answer, float(v), h.current)
    assert h.current.net.calls == [3, 3, 1] and b.passes == 3
    assert sample(b.metrics.batch_size, "_sum") == 7 and sample(b.metrics.batch_size, "_count") == 3


@pytest.mark.parametrize("wait_ms, passes", [(500, 1), (0, 3)])
def test_the_first_image_waits_up_to_max_wait_for_company(wait_ms, passes):
    # three images 50 ms apart: a 0.5 s window gathers them into one pass, no window runs each alone
    h = holder()
    b = batcher_for(h, max_wait_ms=wait_ms)
    (got,) = asyncio.run(serve(b, [[image(v) for v in (1, 2, 3)]], pause_s=0.05))
    for v, answer in zip((1, 2, 3), got):
        check(answer, float(v), h.current)
    assert b.passes == passes


def test_a_full_batch_does_not_wait_out_the_window():
    h = holder()
    b = batcher_for(h, max_batch=2, max_wait_ms=5000)

    async def main():
        worker = asyncio.create_task(b.run())
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.wait_for(asyncio.gather(b.submit(image(1)), b.submit(image(2))), 10)
            return loop.time() - t0
        finally:
            worker.cancel()

    assert asyncio.run(main()) < 2.0


def test_with_a_pass_in_flight_the_next_batch_does_not_wait():
    # overlap: the GPU is busy with the pass in flight, so what is queued is launched at once, not after a window
    h = holder()
    b = batcher_for(h, max_batch=2, max_wait_ms=3000, overlap=True)

    async def main():
        worker = asyncio.create_task(b.run())
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            got = await asyncio.wait_for(asyncio.gather(*(b.submit(image(v)) for v in (1, 2, 3))), 10)
            return got, loop.time() - t0
        finally:
            worker.cancel()

    got, seconds = asyncio.run(main())
    for v, answer in zip((1, 2, 3), got):
        check(answer, float(v), h.current)
    assert h.current.net.calls == [2, 1] and seconds < 0.8, seconds


def test_a_failed_pass_fails_its_own_requests_and_the_worker_serves_on():
    h = holder()
    b = batcher_for(h)
    h.current.net.fail = RuntimeError("out of memory")
    first, second = asyncio.run(serve(b, [[image(1), image(2)], [image(3)]]))
    assert all(isinstance(a, RuntimeError) and str(a) == "out of memory" for a in first)
    check(second[0], 3.0, h.current)
    assert b.passes == 1  # only passes that answered count


def test_a_failed_read_back_fails_its_own_requests_and_the_worker_serves_on(monkeypatch):
    h = holder()
    b = batcher_for(h)
    finish = b._finish
    calls = []

    def flaky(launched, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return finish(launched, **kw)

    monkeypatch.setattr(b, "_finish", flaky)
    first, second = asyncio.run(serve(b, [[image(1), image(2)], [image(4)]]))
    assert all(isinstance(a, RuntimeError) and str(a) == "device lost" for a in first)
    check(second[0], 4.0, h.current)


def test_a_request_given_up_on_does_not_disturb_the_others():
    h = holder()
    b = batcher_for(h, max_wait_ms=200)

    async def main():
        worker = asyncio.create_task(b.run())
        try:
            gone = asyncio.ensure_future(b.submit(image(1)))
            kept = asyncio.ensure_future(b.submit(image(2)))
            await asyncio.sleep(0)
            gone.cancel()
            return await asyncio.wait_for(kept, 10)
        finally:
            worker.cancel()

    check(asyncio.run(main()), 2.0, h.current)


@pytest.mark.parametrize("overlap", [False, True])
def test_undecodable_jpegs_get_their_error_and_the_others_their_rows(overlap):
    h = holder()
    b = batcher_for(h, device_decode=True, overlap=overlap)
    bad = bogus_huffman(jpeg(9))
    rounds = [[jpeg(40), bad, image(20), jpeg(80)], [bad, bad]]
    (mixed, all_bad) = asyncio.run(serve(b, rounds))
    assert isinstance(mixed[1], BadImage) and all(isinstance(a, BadImage) for a in all_bad)
    for i, v in ((0, 40), (2, 20), (3, 80)):
        answer = mixed[i]
        assert isinstance(answer, Answer)
        assert abs(answer.logits["a"][0] - v) <= 2, (i, answer.logits)  # JPEG rounding of a flat colour
        assert answer.logits["b"].tolist() == [2 * answer.logits["a"][0], 3 * answer.logits["a"][0],
                                               4 * answer.logits["a"][0]]
    assert h.current.net.calls == [3]  # the good images of the first pass only; the second ran no model
    assert sample(b.metrics.device_decoded, "_total") == 5  # JPEGs only, bad ones included


def sample(metric, suffix: str = "") -> float:
    """One value of a prometheus metric: a counter's or gauge's, a histogram's ``_sum`` or ``_count``."""
    (family,) = metric.collect()
    return {s.name: s.value for s in family.samples}[family.name + suffix]


def test_metrics_observe_each_pass():
    h = holder()
    h.current.net.delay_s = 0.05  # in the pass's thread, before its read-back
    b = batcher_for(h)
    asyncio.run(serve(b, [[image(1), image(2)], [image(3)]]))
    m = b.metrics
    count = lambda hist: sample(hist, "_count")  # noqa: E731
    assert count(m.pass_seconds) == count(m.pass_thread_seconds) == count(m.batch_size) == 2
    for hist in (m.pass_seconds, m.pass_thread_seconds):  # durations of a stand-in pass: well under a second
        assert 0.09 <= sample(hist, "_sum") < 2, hist
    assert count(m.pass_device_seconds) == 0  # CUDA only
    assert sample(m.queue_depth) == 0


def test_large_jpegs_are_shrunk_on_the_device_as_on_the_host():
    h = holder()
    b = batcher_for(h, device_decode=True)
    out = io.BytesIO()
    Image.fromarray(np.full((300, 900, 3), 60, dtype=np.uint8)).save(out, "JPEG", quality=95)
    (answer,) = asyncio.run(serve(b, [[out.getvalue()]]))[0]
    assert isinstance(answer, Answer)
    assert h.current.stage.shapes == [(3, 256, 512)]  # short side 256, the long side cut to 2x (scenarios.decode)


def test_forward_observes_by_default():
    h = holder()
    b = batcher_for(h)
    (row,) = b._forward(h.current, [image(7)])
    assert row["a"].tolist() == [7.0, 7.5] and sample(b.metrics.pass_thread_seconds, "_count") == 1
    b._forward(h.current, [image(7)], observe=False)
    assert sample(b.metrics.pass_thread_seconds, "_count") == 1


@pytest.mark.parametrize("device_decode", [False, True])
def test_warm_runs_one_blank_pass_per_graph_bucket(monkeypatch, device_decode):
    # the bucket set as on CUDA (graphs are CUDA only; the passes are recorded, not run)
    h = holder()
    b = batcher_for(h, max_batch=6, device_decode=device_decode)
    b.graphs = True
    seen = []
    asked = []
    monkeypatch.setattr(b, "_forward", lambda served, images, *, observe, **kw: (
        seen.append((served, images, observe)), asked.append(kw.get("asked"))))
    b.warm(h.current)
    # each bucket: the all-task graph, then the routed one (a request naming the first task)
    assert [len(images) for _, images, _ in seen] == [1, 1, 2, 2, 4, 4, 6, 6]
    assert asked == [x for n in (1, 2, 4, 6) for x in (None, [("a",)] * n)]
    assert all(served is h.current and observe is False for served, _, observe in seen)
    blank = seen[0][1][0]
    if device_decode:  # a JPEG of the model's input size (it also starts the decoder)
        decoded = np.asarray(Image.open(io.BytesIO(blank)))
        assert decoded.shape == (16, 16, 3) and decoded.max() == 0
    else:
        assert blank.dtype == np.uint8 and blank.shape == (16, 16, 3) and blank.max() == 0
    assert all(im is blank for _, images, _ in seen for im in images)


def test_warm_captures_only_routed_graphs_for_paged_or_large_models(monkeypatch):
    from serving.routing import WARM_EVERY_TASK_MAX, warm_every_task

    assert warm_every_task(WARM_EVERY_TASK_MAX, paged=False) and not warm_every_task(WARM_EVERY_TASK_MAX + 1,
                                                                                      paged=False)
    assert not warm_every_task(1, paged=True)
    h = holder()
    h.current.paged = True
    b = batcher_for(h, max_batch=4)
    b.graphs = True
    asked = []
    monkeypatch.setattr(b, "_forward", lambda served, images, *, observe, **kw: asked.append(kw.get("asked")))
    b.warm(h.current)
    assert asked == [[("a",)] * n for n in (1, 2, 4)]  # the routed graphs; the all-task ones on first use


def test_warm_runs_nothing_on_the_cpu_without_device_decoding():
    h = holder()
    batcher_for(h).warm(h.current)
    assert h.current.net.calls == []


def test_warm_with_device_decoding_starts_the_decoder_without_counting():
    h = holder()
    b = batcher_for(h, device_decode=True)
    b.warm(h.current)
    assert h.current.net.calls == [1]  # one bucket on the CPU (graphs are CUDA only)
    assert sample(b.metrics.device_decoded, "_total") == 0
    assert sample(b.metrics.pass_thread_seconds, "_count") == 0 and sample(b.metrics.batch_size, "_count") == 0


def test_amp_and_graphs_are_for_cuda_only():
    b = batcher_for(holder(), amp=True, cuda_graphs=True)
    assert b.amp is False and b.graphs is False
    assert b.max_wait == 0.001 and b.max_batch == 4
    on_cuda = SimpleNamespace(device=torch.device("cuda"), current=None, cpu_turns=threading.Lock())  # not run
    b = Batcher(on_cuda, Metrics(), max_batch=8, max_wait_ms=2, amp=True)
    assert b.amp is True and b.graphs is True  # graphs by default
    assert b.overlap is False and b.device_decode is False  # each pass read back before the next, host decoding
    assert batcher_for(on_cuda, amp=False, cuda_graphs=False).graphs is False


def test_batch_buckets_are_powers_of_two_up_to_max_batch():
    assert [bucket_for(n, 64) for n in (1, 2, 3, 4, 5, 17, 33, 64)] == [1, 2, 4, 4, 8, 32, 64, 64]
    assert [bucket_for(n, 48) for n in (33, 48)] == [48, 48]
    for n, most in ((0, 4), (65, 64)):
        with pytest.raises(ValueError, match=f"need 1 <= n <= max_batch, got n={n}, max_batch={most}"):
            bucket_for(n, most)


@pytest.mark.parametrize("overlap", [False, True])
def test_images_that_name_their_tasks_get_a_routed_pass_with_only_those(overlap):
    h = holder()
    b = batcher_for(h, overlap=overlap)
    rounds = [[(image(10), ("b",)), image(20), (image(30), ("a",))],  # mixed: a routed pass, all tasks for None
              [image(5), image(6)],  # nobody names tasks: the all-task pass
              [(image(7), ("b", "a")), (image(9), ("a", "gone"))]]  # "gone": removed while it waited
    got = asyncio.run(serve(b, rounds))
    want = [[["b"], ["a", "b"], ["a"]], None, [["b", "a"], ["a"]]]
    for (images, answers), names in zip(zip(rounds, got), want):
        for i, (im, answer) in enumerate(zip(images, answers)):
            im = im[0] if isinstance(im, tuple) else im
            v = float(im[0, 0, 0])
            assert isinstance(answer, Answer) and answer.served is h.current
            assert list(answer.logits) == (names[i] if names else ["a", "b"])
            for task, row in answer.logits.items():
                assert row.dtype == np.float32 and row.tolist() == expected(v)[task], (task, v)
    assert h.current.net.routed == [want[0], want[2]] and h.current.net.calls == [3, 2, 2]
    assert routed_passes(b) == {"eager": 2}  # the CPU has no graphs; the all-task pass is not a routed one


def routed_passes(b) -> dict[str, float]:
    (family,) = b.metrics.routed_passes.collect()
    return {s.labels["path"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_a_routed_pass_hands_undecodable_images_their_error():
    h = holder()
    b = batcher_for(h, device_decode=True)
    bad = bogus_huffman(jpeg(9))
    (answers,) = asyncio.run(serve(b, [[(jpeg(40), ("b",)), (bad, ("a",)), (image(20), ("a",))]]))
    assert isinstance(answers[1], BadImage)
    assert list(answers[0].logits) == ["b"] and abs(answers[0].logits["b"][0] - 80) <= 4
    assert answers[2].logits["a"].tolist() == [20.0, 20.5]
    assert h.current.net.routed == [[["b"], ["a"]]]  # the good images only


def test_routes_policy():
    assert routes_for([None, None], ["a", "b"]) is None  # every task for every image: the all-task pass
    assert routes_for([None, ("b",)], ["a", "b"]) == [["a", "b"], ["b"]]
    assert routes_for([("b", "x", "a"), ()], ["a", "b"]) == [["b", "a"], []]  # the asked order; unknown left out
    assert routes_for([None, None], ["a", "b"], route_all=True) == [["a", "b"], ["a", "b"]]  # paged tasks


def test_answer_rows_policy():
    # graph rows 0-1 hold image 0's parts, row 2 image 1's; answers in the asked order, unknown tasks left out
    rows = [[("a", 0, 2), ("m", 4, 7)], [("b", 0, 3)], [("c", 0, 1)]]
    got = answer_rows(rows, [0, 0, 1], [["b", "m", "a", "b"], ["c"]], 10, keep={"a", "b", "c"})
    assert got == [[("b", 10, 13), ("a", 0, 2)], [("c", 20, 21)]]


def test_an_image_naming_two_forks_of_a_family_stays_in_the_routed_graph(monkeypatch):
    """Such an image runs as several graph rows (one fork each); its answers are each part's eager answers at the
    bucket the rows fill, in the order it asked for them."""
    from continual_mem.routed_graph import RoutedGraph
    from helpers import images
    from test_fork_batch import _model

    model = _model()
    x = images(model.backbone, n=3, seed=4)
    srv = SimpleNamespace(net=model, version=1, classes={n: () for n in model.task_names}, graphs={}, paged=False,
                          paged_tasks=frozenset(), agnostic=None)
    b = Batcher(holder(srv), Metrics(), max_batch=8, max_wait_ms=1, amp=False)
    b.graphs, sizes = True, []
    monkeypatch.setattr(Batcher, "_routed_graph", lambda self, served, xx: sizes.append(len(xx)) or
                        RoutedGraph(model, xx, capture=False))
    routes = [["a", "b", "h", "m"], ["c"], ["b", "a"]]
    b._launch_routed(srv, x, routes, [None] * 3, None, 0.0, wants=[False] * 3, observe=False)  # a warm-up's
    got = b._finish(b._launch_routed(srv, x, routes, [None] * 3, None, 0.0, wants=[False] * 3, observe=True))
    assert sizes[-1] == 8 and routed_passes(b) == {"graph": 1}  # three images, six rows: the graph of eight
    parts, origin = RoutedGraph(model, x, capture=False).split(routes)
    wide = torch.cat([x[torch.tensor(origin)], x[[origin[-1]] * (8 - len(origin))]])
    eager = model.forward_routed(wide, parts + [parts[-1]] * (8 - len(parts)))
    assert [list(a) for a in got] == routes
    for r, (i, part) in enumerate(zip(origin, parts)):
        for name in part:
            if name == "m":  # the grouped task: the graph's gathered head agrees to float tolerance
                np.testing.assert_allclose(got[i][name], eager[r][name].numpy(), rtol=1e-4, atol=1e-5)
            else:
                assert np.array_equal(got[i][name], eager[r][name].numpy()), (i, name)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_paged_model_gets_passes_within_its_slots_and_every_request_its_rows(overlap):
    # slots for one paged task: the queued requests for "a" and "b" alternate, so they run in passes that each
    # ask for one of them, the oldest request first; each image still gets its own rows
    model = served()
    model.paged, model.paged_tasks, model.net.resident_tasks = True, frozenset({"a", "b"}), 1
    h = holder(model)
    b = batcher_for(h, overlap=overlap)
    asked = [("a",), ("b",), ("a",), ("b",)]
    (answers,) = asyncio.run(serve(b, [[(image(v), t) for v, t in zip((10, 20, 30, 40), asked)]]))
    for v, t, answer in zip((10, 20, 30, 40), asked, answers):
        assert isinstance(answer, Answer) and answer.logits[t[0]].tolist() == expected(v)[t[0]]
    assert all(len({n for r in routes for n in r}) == 1 for routes in model.net.routed), model.net.routed
    assert model.net.routed[0][0] == ["a"] and sum(len(r) for r in model.net.routed) == 4
    assert not b.waiting


def test_admission_policy():
    from serving.admission import fits_slots, split

    paged = frozenset({"f1", "f2", "f3"})
    asked = [("f1",), ("f2", "m"), ("f1", "m"), ("f3",), None, ("m",)]
    assert fits_slots(asked, paged=paged, slots=2, every=["m", "f1", "f2", "f3"]) == [True, True, True, False,
                                                                                      False, True]
    assert fits_slots(asked, paged=paged, slots=None) == [True] * 6  # no slot limit
    assert fits_slots(asked, paged=frozenset(), slots=1) == [True] * 6  # nothing paged
    assert fits_slots([None, ("f1",)], paged=paged, slots=1, every=["f1", "f2"]) == [True, False]  # the oldest runs
    assert split(list("abc"), [("f1",), ("f2",), ("f1",)], paged=paged, slots=1) == (["a", "c"], ["b"])
