"""Held-out batches kept on the device after their first pass (``scenarios.eval_cache``): what is kept, when, and
that a kept pass is bit for bit the streamed one, for every streaming source."""
import pytest
import torch

from input_helpers import PRE, folder, prepare_small, reader  # noqa: F401 - fixtures
from scenarios.compact import CompactImages
from scenarios.eval_cache import EvalCache, batch_bytes, default_budget
from scenarios.gpu_decoded import GpuDecodedImages
from scenarios.streaming import DecodedImages, PreparedImages

CPU = torch.device("cpu")


def _batches(n: int, size: int = 4):
    return [(torch.full((size, 3, 2, 2), float(k)), torch.full((size,), k)) for k in range(n)]


def test_a_full_pass_is_kept_within_the_budget_and_handed_back():
    cache, calls = EvalCache(CPU, img_size=2, budget=batch_bytes(12, 2)), []

    def produce():
        calls.append(1)
        yield from _batches(3)

    first = list(cache.batches("k", 12, produce))
    second = list(cache.batches("k", 12, produce))
    assert len(calls) == 1 and cache.used == batch_bytes(12, 2)
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(first, second, strict=True))
    list(cache.batches("other", 1, produce))  # over what is left of the budget: streamed each time
    list(cache.batches("other", 1, produce))
    assert len(calls) == 3
    cache.clear()
    list(cache.batches("k", 12, produce))
    assert len(calls) == 4 and cache.used == batch_bytes(12, 2)


def test_a_pass_stopped_early_keeps_nothing():
    cache, calls = EvalCache(CPU, img_size=2, budget=10**9), []

    def produce():
        calls.append(1)
        yield from _batches(3)

    next(iter(cache.batches("k", 12, produce)))
    assert cache.used == 0
    assert len(list(cache.batches("k", 12, produce))) == 3 and len(calls) == 2
    list(cache.batches("k", 12, produce))
    assert len(calls) == 2


def test_default_budget_and_bad_budgets():
    assert default_budget(CPU) == 0  # batches on a CPU are in host memory already
    assert default_budget(torch.device("cuda"), free=10 * 2**30) == 2**30
    assert batch_bytes(2, 224) == 2 * (3 * 224 * 224 * 4 + 8)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        EvalCache(CPU, 2, budget=-1)
    assert EvalCache(CPU, 2).budget == 0


@pytest.mark.parametrize("kind", ["raw", "compact", "files", "gpu-files"])
def test_kept_passes_equal_streamed_ones_bit_for_bit(kind, reader, tmp_path):
    big = 10**9
    if kind in ("raw", "compact"):
        data = prepare_small(reader, tmp_path, encoding="raw" if kind == "raw" else "jpeg")
        make = {"raw": PreparedImages, "compact": CompactImages}[kind]
        kept, streamed = make(data, PRE, eval_cache=big), make(data, PRE, eval_cache=0)
    else:
        make = {"files": DecodedImages, "gpu-files": GpuDecodedImages}[kind]
        extra = {"workers": 0} if kind == "files" else {}
        kept, streamed = make(reader, PRE, eval_cache=big, **extra), make(reader, PRE, eval_cache=0, **extra)
    passes = [list(kept.eval_batches(10)) for _ in range(2)]
    assert kept.eval_cache.used == batch_bytes(len(reader), PRE.img_size) and streamed.eval_cache.used == 0
    for again in (list(streamed.eval_batches(10)), passes[1]):
        for (xa, ya), (xb, yb) in zip(passes[0], again, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")
def test_a_gpu_keeps_held_out_batches_by_default_and_they_equal_streamed_ones(reader, tmp_path):
    data = prepare_small(reader, tmp_path, encoding="jpeg")
    kept, streamed = CompactImages(data, PRE, "cuda"), CompactImages(data, PRE, "cuda", eval_cache=0)
    assert kept.eval_cache.budget > 0
    passes = [list(kept.eval_batches(10)) for _ in range(2)]
    assert kept.eval_cache.used == batch_bytes(len(data), PRE.img_size)
    for again in (list(streamed.eval_batches(10)), passes[1]):
        for (xa, ya), (xb, yb) in zip(passes[0], again, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
