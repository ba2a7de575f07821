"""SMs held back from training for a GPU JPEG decoder (continual_mem.sm_partition): the policy, fit's wiring,
which sources decode on the GPU, and (on a GPU) the same arithmetic on the held-back device."""
import contextlib

import pytest
import torch

from continual_mem import MemoryViT, train
from continual_mem.sm_partition import DECODE_RESERVE, decoder_sms, partition, side_stream
from continual_mem.train import TrainConfig, fit
from helpers import make_backbone
from input_helpers import PRE as PRE_SMALL, prepare_small, folder, reader  # noqa: F401 - fixtures
from scenarios.gpu_jpeg import JpegBatchDecoder
from scenarios.pipeline import DeviceImages, Preprocess
from scenarios.streaming import PreparedImages
from test_train import quadrant_data

PRE = Preprocess(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.875, augment="none")


def test_policy_holds_sms_only_for_a_gpu_decoder_on_a_large_gpu():
    assert decoder_sms(None, gpu_decoding=True, sm_count=132) == DECODE_RESERVE == 8
    assert decoder_sms(None, gpu_decoding=False, sm_count=132) == 0
    assert decoder_sms(None, gpu_decoding=True, sm_count=40) == 0  # too few SMs to spare eight
    assert decoder_sms(None, gpu_decoding=True, sm_count=0) == 0  # a CPU
    assert decoder_sms(4, gpu_decoding=False, sm_count=132) == 4
    assert decoder_sms(0, gpu_decoding=True, sm_count=0) == 0
    for bad, count in ((-1, 132), (132, 132)):
        with pytest.raises(ValueError, match="decoder_sms must be"):
            decoder_sms(bad, gpu_decoding=True, sm_count=count)
    with pytest.raises(ValueError, match="runs on the CPU; pass 0"):
        decoder_sms(2, gpu_decoding=False, sm_count=0)
    with pytest.raises(ValueError, match="decoder_sms"):
        TrainConfig(decoder_sms=-1)


def test_partition_is_a_no_op_off_cuda():
    with partition(torch.device("cpu"), 8) as held:
        assert held == 0 and side_stream() is None


def test_which_sources_decode_on_the_gpu():
    assert JpegBatchDecoder("cuda").on_device and JpegBatchDecoder("cuda", share=0.5).on_device
    assert JpegBatchDecoder("cuda", share=None).on_device  # balanced: nvJPEG takes part
    assert not JpegBatchDecoder("cuda", share=1.0).on_device and not JpegBatchDecoder("cpu").on_device


class Decoding:
    """A source that says it decodes on the GPU."""

    def __init__(self, inner, gpu: bool) -> None:
        self.inner, self.gpu_decoding = inner, gpu

    def train_batch(self, step, batch_size, seed):
        return self.inner.train_batch(step, batch_size, seed)

    def eval_batches(self, batch_size):
        return self.inner.eval_batches(batch_size)


def held_back(monkeypatch) -> list[tuple[int, bool]]:
    """``train``'s partitions recorded instead of entered, as (SMs held back, required), on a 132-SM GPU."""
    seen = []

    @contextlib.contextmanager
    def recording(device, reserve, *, required=True):
        seen.append((reserve, required))
        yield 0

    monkeypatch.setattr(train, "sm_count", lambda device: 132)  # as on an H200
    monkeypatch.setattr(train, "partition", recording)
    return seen


@pytest.mark.parametrize("gpu, requested, expected", [(True, None, (8, False)), (False, None, (0, False)),
                                                      (False, 3, (3, True)), (True, 0, (0, True))])
def test_fit_holds_sms_back_for_a_source_decoding_on_the_gpu(monkeypatch, gpu, requested, expected):
    seen = held_back(monkeypatch)
    model = MemoryViT(make_backbone("tiny"))
    model.add_task("quad", 4, memory=2)
    fit(model, "quad", Decoding(DeviceImages(quadrant_data(32, 0), PRE), gpu), None,
        TrainConfig(steps=1, batch_size=8, amp="off", decoder_sms=requested), progress=False)
    assert seen == [expected]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")
def test_training_on_held_back_sms_is_the_same_arithmetic():
    """A graphed step on all SMs but eight: captured and replayed on the green context's streams, the same
    weights as on the whole device (the same kernels), and the caller's stream waits for it."""
    if not hasattr(torch.cuda, "green_contexts"):
        pytest.skip("this torch has no green contexts")
    runs = []
    for held in (0, 8):
        torch.manual_seed(0)
        model = MemoryViT(make_backbone("tiny")).cuda()
        model.add_task("quad", 4, memory=2)
        model.cuda()
        cfg = TrainConfig(steps=6, batch_size=16, amp="off", cuda_graph=True, decoder_sms=held)
        outer = torch.cuda.current_stream()
        with partition(torch.device("cuda"), held) as got:
            assert got == held and (side_stream() is not None) == bool(held)
            assert (torch.cuda.current_stream() != outer) == bool(held)
        fit(model, "quad", DeviceImages(quadrant_data(64, 0), PRE, "cuda"), None, cfg, progress=False)
        runs.append({k: v.detach().clone() for k, v in model.tasks["quad"].state_dict().items()})
    streams = []
    for _ in range(2):  # one stream per thread and context: freed blocks stay usable by the next pass
        with partition(torch.device("cuda"), 8):
            streams.append(torch.cuda.current_stream())
    assert streams[0] == streams[1]
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]), \
        max((runs[0][k] - runs[1][k]).abs().max().item() for k in runs[0])


@pytest.mark.parametrize("decoding, expected", [(True, 8), (False, 0)])
def test_evaluate_holds_sms_back_only_for_a_pass_that_decodes_on_the_gpu(monkeypatch, decoding, expected):
    seen, asked = held_back(monkeypatch), []
    model = MemoryViT(make_backbone("tiny"))
    model.add_task("quad", 4, memory=2)
    source = DeviceImages(quadrant_data(16, 0), PRE)
    source.eval_gpu_decoding = lambda batch_size: asked.append(batch_size) or decoding
    train.evaluate(model, source, ["quad"], batch_size=8)
    assert seen == [(expected, False)] and asked == [8]


def test_a_kept_evaluation_pass_decodes_nothing(monkeypatch, reader, tmp_path):
    """The next pass of a source decoding on the GPU counts as decoding until its batches are kept."""
    monkeypatch.setattr(PreparedImages, "gpu_decoding", property(lambda self: True))
    data = prepare_small(reader, tmp_path, encoding="raw")
    source = PreparedImages(data, PRE_SMALL, eval_cache=10**9)
    assert source.eval_gpu_decoding(8)
    list(source.eval_batches(8))
    assert not source.eval_gpu_decoding(8) and source.eval_gpu_decoding(4)
