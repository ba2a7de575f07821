"""Compact prepared copies (re-encoded JPEGs decoded in batches, ``scenarios.compact``): against the raw copy, their
build (bad files, folder keys; resume: test_prepared.py), the batches' dependence on ``(seed, step)`` only, and
the path policy."""
import json

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from continual_mem.distributed import Shard
from input_helpers import PRE, SHORT, folder, prepare_small, reader  # noqa: F401 - fixtures
from scenarios import datasets, recipes
from scenarios.compact import CompactImages, CompactReader, prepared_images
from scenarios.datasets import DatasetError
from scenarios.decode import FilesReader
from scenarios.gpu_jpeg import JpegBatchDecoder, choose_decoder, host_share, on_host
from scenarios.pipeline import batches
from scenarios.prepared import PrepareOptions, choose_encoding
from scenarios.streaming import PreparedImages


@pytest.fixture(scope="module")
def copies(reader, tmp_path_factory):
    root = tmp_path_factory.mktemp("copies")
    return prepare_small(reader, root), prepare_small(reader, root, encoding="jpeg")


def test_the_compact_copy_holds_the_raw_copys_images_within_jpeg_tolerance_in_far_fewer_bytes(copies):
    raw, compact = copies
    assert (raw.encoding, compact.encoding) == ("raw", "jpeg")
    assert raw.root != compact.root  # keyed apart: neither is mistaken for the other
    assert np.array_equal(raw.index[:, 1:], compact.index[:, 1:])  # same images, sizes and labels, in order
    assert compact.meta["quality"] == 90 and compact.meta["bytes"] == (compact.root / "images.jpg").stat().st_size
    assert compact.meta["bytes"] < 0.5 * raw.meta["bytes"]
    assert int(compact.nbytes.sum()) == compact.meta["bytes"]
    for i in range(len(raw)):
        blob = compact.encoded(np.array([i]))[0].numpy().tobytes()
        assert blob[:3] == b"\xff\xd8\xff" and blob[-2:] == b"\xff\xd9"  # one whole JPEG per image
        a, b = raw.image(i).astype(int), compact.image(i).astype(int)
        assert a.shape == b.shape
        assert np.abs(a - b).mean() < 4, i  # grey levels: q90 re-encoding of smooth photos
    sub = compact.subset([4, 1])
    assert np.array_equal(sub.image(0), compact.image(4)) and sub.labels.tolist() == compact.labels[[4, 1]].tolist()


def test_compact_and_raw_batches_agree_within_jpeg_tolerance(copies):
    raw, compact = copies
    a, b = PreparedImages(raw, PRE), CompactImages(compact, PRE)
    for step in (0, 3):
        (xa, ya), (xb, yb) = a.train_batch(step, 8, seed=1), b.train_batch(step, 8, seed=1)
        assert torch.equal(ya, yb)  # the same images, boxes and flips: only the pixels' re-encoding differs
        assert (xa - xb).abs().mean() < 0.1 and (xa - xb).abs().mean() > 0  # normalised units (~1/std per level)
    for (xa, ya), (xb, yb) in zip(a.eval_batches(10), b.eval_batches(10), strict=True):
        assert torch.equal(ya, yb) and (xa - xb).abs().mean() < 0.1
    assert (a.eval_one(5)[0] - b.eval_one(5)[0]).abs().mean() < 0.1


def test_compact_batches_depend_only_on_seed_and_step_whatever_the_ranks(copies):
    _, compact = copies
    src = CompactImages(compact, PRE)
    x, y = src.train_batch(2, 9, seed=5)
    assert torch.equal(CompactImages(compact, PRE, prefetch=0).train_batch(2, 9, seed=5)[0], x)  # a resumed run
    parts = [CompactImages(compact, PRE).train_batch(2, 9, seed=5, shard=Shard(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(src.train_batch(2, 9, seed=6)[0], x)


def test_the_batch_source_follows_the_copys_encoding(copies):
    raw, compact = copies
    assert type(batches(raw, PRE)) is PreparedImages
    assert type(batches(compact, PRE)).__name__ == "DecodedImages"  # on the CPU: decoded by worker processes
    assert type(prepared_images(compact, PRE, decoder="device", prefetch=0)) is CompactImages
    with pytest.raises(ValueError, match="not JPEGs; read it with PreparedImages"):
        CompactImages(raw, PRE)


def test_bad_files_are_skipped_or_fail_as_chosen_in_a_compact_build(tmp_path, folder):
    import shutil

    shutil.copytree(folder, tmp_path / "imgs")
    files = sorted((tmp_path / "imgs").rglob("*.jpg"))[:10]
    victim = files[3]
    victim.write_bytes(b"not a jpeg")
    r = FilesReader([str(f) for f in files], np.zeros(len(files), dtype=np.int64))
    skipped = prepare_small(r, tmp_path / "c", encoding="jpeg")
    assert len(skipped) == len(r) - 1 and victim.name in skipped.meta["bad"][0]
    with pytest.raises(DatasetError, match=victim.name):
        prepare_small(r, tmp_path / "f", encoding="jpeg", on_bad="fail")


def test_encoding_options_and_policy():
    with pytest.raises(ValueError, match="encoding must be raw or jpeg"):
        PrepareOptions(encoding="png")
    with pytest.raises(ValueError, match="quality must be between 1 and 100"):
        PrepareOptions(encoding="jpeg", quality=0)
    with pytest.raises(ValueError, match="unknown encoding 'webp'; use auto, raw or jpeg"):
        choose_encoding("webp", raw_fits=True)
    assert choose_encoding("auto", raw_fits=True) == "raw"  # the fastest path measured, where it fits
    assert choose_encoding("auto", raw_fits=False) == "jpeg"  # else a tenth of the bytes
    assert choose_encoding("raw", raw_fits=False) == "raw" and choose_encoding("jpeg", raw_fits=True) == "jpeg"


def test_sources_build_the_chosen_encoding_and_reuse_a_copy_of_the_other(tmp_path, folder, monkeypatch):
    data = datasets.load(f"imagefolder:{folder}")
    common = dict(seed=0, max_train=None, max_test=None, cache_dir=str(tmp_path))

    def kinds(**kw):
        return [type(s).__name__ for s in recipes.sources(data, "test", PRE, "cpu", **common, **kw)]

    def built():
        return sorted(json.loads(p.read_text())["encoding"] for p in tmp_path.glob("*/meta.json"))

    real = recipes.fits_on_disk
    monkeypatch.setattr(recipes, "fits_on_disk", lambda r, opts, c: (opts.encoding == "jpeg", 1.0))
    assert kinds() == ["DecodedImages"] * 3  # auto, raw pixels do not fit: the compact copy (host workers on a CPU)
    assert built() == ["jpeg", "jpeg"]
    monkeypatch.setattr(recipes, "fits_on_disk", real)
    assert kinds() == ["DecodedImages"] * 3  # auto takes the compact copy already there, builds no raw one
    assert built() == ["jpeg", "jpeg"]
    assert kinds(encoding="raw") == ["PreparedImages"] * 3  # asked for raw: builds it
    assert built() == ["jpeg", "jpeg", "raw", "raw"]
    assert kinds(pipeline="prepared", encoding="jpeg") == ["DecodedImages"] * 3


def test_host_decoding_of_a_compact_copy_gives_the_threads_batches_on_the_cpu(copies):
    """The ``host`` decoder (worker processes through DecodedImages) and the threads' decoder read the same JPEGs
    with the same library: identical batches, for training and evaluation; a copy pickled to a worker maps its
    file again instead of carrying it."""
    import pickle

    raw, compact = copies
    host = prepared_images(compact, PRE, decoder="host")
    assert type(host).__name__ == "DecodedImages"
    assert type(prepared_images(compact, PRE, decoder="device")) is CompactImages
    threads = CompactImages(compact, PRE)
    for step in (0, 2):
        (xa, ya), (xb, yb) = host.train_batch(step, 8, seed=1), threads.train_batch(step, 8, seed=1)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(host.eval_batches(10), threads.eval_batches(10), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    blob = pickle.dumps(compact.subset([3, 0]))
    assert len(blob) < compact.meta["bytes"] / 4
    again = pickle.loads(blob)
    assert np.array_equal(again.image(0), compact.image(3))
    assert choose_decoder("auto", device="cuda") == "device" and choose_decoder("auto", device="cpu") == "host"
    assert choose_decoder("device", device="cpu") == "device" and choose_decoder("host", device="cuda") == "host"
    with pytest.raises(ValueError, match="unknown decoder 'gpu'; use auto, device or host"):
        choose_decoder("gpu", device="cuda")
    with pytest.raises(ValueError, match="not JPEGs"):
        CompactReader(raw)
    a, b = CompactReader(compact.subset([0, 3])), CompactReader(compact.subset([1, 2]))
    assert a.fingerprint() != b.fingerprint() and a.fingerprint() == CompactReader(compact.subset([0, 3])).fingerprint()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_compact_batches_on_the_gpu(copies, share):
    """nvJPEG, host threads, or both: batches within JPEG tolerance of the raw copy's, the same for any rank split
    and for a fresh source, and usable by the training stream without a host synchronisation."""
    raw, compact = copies
    # the reference runs on the GPU too: crop boxes come from the device's generator (CPU draws differ)
    gpu, cpu = CompactImages(compact, PRE, "cuda", host_share=share), PreparedImages(raw, PRE, "cuda")
    for step in range(4):  # prefetched batches decode while earlier ones are consumed
        (xg, yg), (xc, yc) = gpu.train_batch(step, 8, seed=2), cpu.train_batch(step, 8, seed=2)
        assert xg.is_cuda and torch.equal(yg, yc)
        err = (xg - xc).abs().mean()  # nvJPEG against the raw pixels: the re-encoding and the decoder
        assert err < 0.1, err
        fresh = CompactImages(compact, PRE, "cuda", prefetch=0, host_share=share)
        assert torch.equal(fresh.train_batch(step, 8, seed=2)[0], xg)
    parts = [CompactImages(compact, PRE, "cuda", host_share=share).train_batch(1, 9, seed=0, shard=Shard(r, 2))[0]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), gpu.train_batch(1, 9, seed=0)[0])
    ev_gpu = torch.cat([x for x, _ in gpu.eval_batches(10)])
    ev_cpu = torch.cat([x for x, _ in cpu.eval_batches(10)])
    assert ev_gpu.shape[0] == len(compact) and (ev_gpu - ev_cpu).abs().mean() < 0.1


def test_avalanche_samples_of_a_compact_copy_are_its_evaluation_batches(copies):
    from scenarios.stream import PreprocessedImages

    _, compact = copies
    samples = PreprocessedImages(compact, PRE)
    x, y = samples[5]
    ref_x, ref_y = CompactImages(compact, PRE).eval_one(5)
    assert torch.equal(x, ref_x[0]) and y == int(ref_y[0]) and len(samples) == len(compact)


def test_host_share_policy_and_which_images_the_host_decodes():
    assert host_share(None, None) == 0.5 and host_share(3000.0, 1000.0) == 0.25 and host_share(1.0, 1.0, fixed=0.0) == 0
    with pytest.raises(ValueError, match="share"):
        host_share(None, None, fixed=1.5)
    ids = np.arange(20_000)
    for share in (0.0, 0.3, 1.0):
        picked = on_host(ids, share)
        assert abs(picked.mean() - share) < 0.02
    # an image's decoder is its own, not its batch's
    assert np.array_equal(on_host(ids[::7], 0.3), on_host(ids, 0.3)[::7])


@pytest.mark.parametrize("share", [0.0, 0.4, 1.0, None])
def test_decoder_packs_every_image_where_its_rows_say(copies, share):
    """Both parts of a batch (this thread and the pool) land where the (offset, height, width) rows say, in the
    batch's order: each image equals libjpeg-turbo's decoding of it alone."""
    _, compact = copies
    ids = np.arange(len(compact))[::-1].copy()
    blobs = compact.encoded(ids)
    flat, meta = JpegBatchDecoder("cpu", share=share, threads=2).decode(blobs, compact.rows[ids])
    assert meta.shape == (len(ids), 3) and flat.numel() == int((meta[:, 1] * meta[:, 2] * 3).sum())
    for k, blob in enumerate(blobs):
        off, h, w = meta[k].tolist()
        assert torch.equal(flat[off:off + 3 * h * w].view(3, h, w), decode_jpeg(blob, mode=ImageReadMode.RGB))
