"""Files decoded on the fly by the GPU path (``scenarios/gpu_decoded.py``), run on the CPU: the batches of the host
decoder bit for bit (the same libjpeg-turbo and shrink), for any rank split; bad files skipped or failed; PNGs and
JPEGs cut short go to the host decoder. The GPU run is ``-m gpu``."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from continual_mem.distributed import Shard
from input_helpers import PRE, SHORT, folder, reader  # noqa: F401 - fixtures
from scenarios import datasets
from scenarios.decode import reader_for
from scenarios.gpu_decoded import GpuDecodedImages
from scenarios.streaming import DecodedImages
from scenarios.types import DatasetError


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_batches_equal_the_host_decoders(reader, share):
    gpu_path = GpuDecodedImages(reader, PRE, short_side=SHORT, host_share=share, threads=2)
    host = DecodedImages(reader, PRE, workers=0, short_side=SHORT)
    for step in range(3):
        (xa, ya), (xb, yb) = gpu_path.train_batch(step, 8, seed=3), host.train_batch(step, 8, seed=3)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    parts = [GpuDecodedImages(reader, PRE, short_side=SHORT).train_batch(1, 9, seed=0, shard=Shard(r, 2))[0]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), gpu_path.train_batch(1, 9, seed=0)[0])
    ev_a = torch.cat([x for x, _ in gpu_path.eval_batches(10)])
    ev_b = torch.cat([x for x, _ in host.eval_batches(10)])
    assert torch.equal(ev_a, ev_b)


@pytest.fixture
def mixed(tmp_path, folder):  # noqa: F811 - the fixture above
    """The folder with a truncated JPEG, a file that is no image, garbage between JPEG markers and a PNG."""
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(folder, root)
    good = (root / "class_00" / "img_00001.jpg").read_bytes()
    (root / "class_00" / "img_00001.jpg").write_bytes(good[: len(good) // 2])
    (root / "class_01" / "img_00002.jpg").write_bytes(b"this is not an image")
    # JPEG markers around garbage, the last of its class (its stand-in has another label): handed to the batched
    # decoder, which fails, then to the host, which names it
    sorted((root / "class_01").glob("*.jpg"))[-1].write_bytes(good[:3] + bytes(range(256)) * 8 + good[-2:])
    Image.open(root / "class_02" / "img_00003.jpg").save(root / "class_02" / "img_00003.png")
    (root / "class_02" / "img_00003.jpg").unlink()
    return root


def test_bad_files_are_skipped_or_fail_and_pngs_are_read(mixed, caplog):
    r = reader_for(datasets.load(f"imagefolder:{mixed}").train)
    src = GpuDecodedImages(r, PRE, short_side=SHORT, name="mixed")
    with caplog.at_level(logging.WARNING):
        (got, got_y), = src.eval_batches(len(r))
    (want, want_y), = DecodedImages(r, PRE, workers=0, short_side=SHORT).eval_batches(len(r))
    # a bad file's place: the next good one (its label too), as on the host
    assert got.shape[0] == len(r) and torch.equal(got, want) and torch.equal(got_y, want_y)
    # the loader already leaves out the file that is no image; the other two are met here
    assert sum(m.startswith("mixed:") and "takes its place" in m for m in caplog.messages) == 2
    strict = GpuDecodedImages(r, PRE, short_side=SHORT, on_bad="fail", name="mixed")
    with pytest.raises(DatasetError, match=r"mixed: cannot decode image .*img_000\d\d\.jpg"):
        list(strict.eval_batches(len(r)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")
def test_gpu_decoded_batches_on_the_gpu(reader):
    """nvJPEG: within JPEG decoder tolerance of the host decoder's batches on the same device, the same for any rank
    split and for a fresh source."""
    gpu_path = GpuDecodedImages(reader, PRE, "cuda", short_side=SHORT)
    host = DecodedImages(reader, PRE, "cuda", workers=2, short_side=SHORT)
    for step in range(3):
        (xa, ya), (xb, yb) = gpu_path.train_batch(step, 8, seed=3), host.train_batch(step, 8, seed=3)
        assert xa.is_cuda and torch.equal(ya, yb) and (xa - xb).abs().mean() < 0.1
        fresh = GpuDecodedImages(reader, PRE, "cuda", short_side=SHORT, prefetch=0)
        assert torch.equal(fresh.train_batch(step, 8, seed=3)[0], xa)
    parts = [GpuDecodedImages(reader, PRE, "cuda", short_side=SHORT).train_batch(1, 9, seed=0, shard=Shard(r, 2))[0]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), gpu_path.train_batch(1, 9, seed=0)[0])
    assert np.isfinite(torch.cat([x for x, _ in gpu_path.eval_batches(10)]).cpu().numpy()).all()


def test_the_decoder_choice_reaches_the_batch_source(reader):
    from scenarios.pipeline import batches
    from scenarios.task_recipe import TaskRecipe

    assert type(batches(reader, PRE)).__name__ == "DecodedImages"  # auto: host workers for image files
    assert type(batches(reader, PRE, decoder="device")).__name__ == "GpuDecodedImages"
    assert TaskRecipe(decoder="device").decoder == "device"
    with pytest.raises(ValueError, match="decoder must be auto, device or host"):
        TaskRecipe(decoder="gpu")
