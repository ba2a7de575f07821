"""The fast input path for image files: decoding, streamed batches from prepared copies and files, sharding,
bad files, WebDataset shards, the path policy (prepared copies themselves: test_prepared.py)."""
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from continual_mem.distributed import Shard
from input_helpers import PRE, SHORT, folder, prepare_small, reader  # noqa: F401 - fixtures
from scenarios import datasets, prepared, recipes
from scenarios.datasets import DatasetError
from scenarios.decode import BadImage, FilesReader, decode_item, reader_for, shrink
from scenarios.pipeline import Preprocess
from scenarios.prepared import PrepareOptions
from scenarios.recipes import choose_pipeline, sources
from scenarios.streaming import DecodedImages, PreparedImages
from scenarios.synthetic import make_image_folder, photo


def test_decoding_matches_pil(tmp_path):
    """torchvision's decoder gives PIL's pixels (both libjpeg-turbo: within JPEG decoder tolerance), also for
    grey JPEGs and PNGs; shrinking keeps the aspect ratio and never enlarges."""
    gray = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40), dtype=np.uint8)).save(gray, "JPEG")
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(png, "PNG")
    files = {"c.jpg": photo(3, label=1, size=(64, 48)), "g.jpg": gray.getvalue(), "p.png": png.getvalue()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    r = FilesReader([str(tmp_path / n) for n in files], np.zeros(3, dtype=np.int64))
    for i, name in enumerate(files):
        ours = decode_item(r, i, short_side=None, max_aspect=10.0).astype(int)
        pil = np.asarray(Image.open(tmp_path / name).convert("RGB")).astype(int)
        assert ours.shape == pil.shape
        assert np.abs(ours - pil).max() <= 2, name
    img = torch.zeros(3, 300, 400, dtype=torch.uint8)
    assert shrink(img, short_side=256, max_aspect=2.0).shape == (3, 256, 341)
    assert shrink(img, short_side=512, max_aspect=2.0).shape == (3, 300, 400)  # never enlarged
    assert shrink(torch.zeros(3, 100, 500, dtype=torch.uint8), short_side=50, max_aspect=2.0).shape == (3, 50, 100)


def test_prepared_and_decoded_batches_are_identical_and_depend_only_on_seed_and_step(reader, tmp_path):
    ps = prepare_small(reader, tmp_path)
    assert len(ps) == len(reader) and ps.meta["bad"] == []
    a = PreparedImages(ps, PRE)
    b = DecodedImages(reader, PRE, workers=0, short_side=SHORT)
    for step in (0, 1, 4):
        xa, ya = a.train_batch(step, 8, seed=3)
        xb, yb = b.train_batch(step, 8, seed=3)
        assert xa.shape == (8, 3, 28, 28)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    fresh = PreparedImages(ps, PRE)  # a resumed run asks for step 4 first
    assert torch.equal(fresh.train_batch(4, 8, seed=3)[0], xa)
    assert not torch.equal(fresh.train_batch(4, 8, seed=4)[0], xa)
    ea, eb = list(a.eval_batches(10)), list(b.eval_batches(10))
    assert len(ea) == -(-len(reader) // 10)
    for (xa, ya), (xb, yb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(torch.cat([y for _, y in ea]), torch.from_numpy(reader.labels))


@pytest.mark.parametrize("augment", ["inception", "none"])
def test_crops_never_read_padding(reader, tmp_path, augment):
    """A batch does not depend on what fills the padding around each image, nor on the other images it is padded
    with (their sizes set the canvas); the device-side layout of packed bytes gives the same bits as host-side
    padding."""
    ps = prepare_small(reader, tmp_path)
    src = PreparedImages(ps, Preprocess(28, (0.5,) * 3, (0.25,) * 3, 0.875, augment))
    order = np.argsort(ps.sizes.prod(axis=1))
    small, big = int(order[0]), int(order[-1])
    hw = torch.from_numpy(ps.sizes[[small, big]].copy())
    labels = ps.labels[[small, big]]

    def canvas(fill):
        c = fill((2, 80, 96, 3))
        for k, p in enumerate((small, big)):
            prepared.place(c[k].numpy(), ps.image(p))
        return c

    for train in (False, True):
        def crop(c, k=2):
            return src.stage(c[:k], hw[:k], labels[:k], train=train, g=torch.Generator().manual_seed(0), n=2)[0]

        zeros = crop(canvas(lambda shape: torch.zeros(shape, dtype=torch.uint8)))
        assert torch.equal(crop(canvas(lambda shape: torch.randint(0, 256, shape, dtype=torch.uint8))), zeros)
        assert torch.equal(crop(canvas(lambda shape: torch.zeros(shape, dtype=torch.uint8)), k=1), zeros[:1])
        flat, meta, lab, size = src._host(np.array([small, big]))
        packed = src.stage.from_flat(flat, meta, lab, size, train=train, g=torch.Generator().manual_seed(0), n=2)[0]
        assert torch.equal(packed, zeros)


@pytest.mark.parametrize("kind", ["prepared", "decoded"])
def test_rank_parts_rebuild_the_global_batch(reader, tmp_path, kind):
    make = (lambda: PreparedImages(prepare_small(reader, tmp_path), PRE)) if kind == "prepared" else \
        (lambda: DecodedImages(reader, PRE, workers=0, short_side=SHORT))
    x, y = make().train_batch(2, 9, seed=1)
    for world in (2, 3):
        parts = [make().train_batch(2, 9, seed=1, shard=Shard(r, world)) for r in range(world)]
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        labels = [torch.cat([b[1] for b in make().eval_batches(4, shard=Shard(r, world))]) for r in range(world)]
        assert torch.equal(torch.cat(labels), torch.from_numpy(reader.labels))


def test_decoding_workers_give_the_same_batches(reader):
    one = DecodedImages(reader, PRE, workers=0, short_side=SHORT)
    two = DecodedImages(reader, PRE, workers=2, short_side=SHORT)
    for step in range(3):
        assert torch.equal(one.train_batch(step, 8, seed=0)[0], two.train_batch(step, 8, seed=0)[0])


@pytest.fixture
def damaged(tmp_path, folder) -> Path:
    root = tmp_path / "damaged"
    make_image_folder(root, classes=2, per_class=6, size=(40, 30))
    good = (root / "class_00" / "img_00001.jpg").read_bytes()
    (root / "class_00" / "img_00001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "class_01" / "img_00002.jpg").write_bytes(b"this is not an image")
    return root


def test_bad_images_are_named_and_skipped_or_fail(damaged, tmp_path, caplog):
    r = reader_for(datasets.load(f"imagefolder:{damaged}").train)
    with pytest.raises(DatasetError, match=r"img_0000[12]\.jpg .*--on-bad-image skip"):
        prepare_small(r, tmp_path / "fail", on_bad="fail")
    assert prepared.find(r, name="jpegs", split="train", opts=PrepareOptions(short_side=SHORT, workers=0,
                                                                              on_bad="fail"), root=tmp_path / "fail") is None
    with caplog.at_level(logging.WARNING):
        ps = prepare_small(r, tmp_path / "skip")
    assert len(ps) == len(r) - 2 and len(ps.meta["bad"]) == 2
    assert sum("left out" in m for m in caplog.messages) == 2
    src = DecodedImages(r, PRE, workers=0, short_side=SHORT, name="damaged")
    with caplog.at_level(logging.WARNING):
        batches = list(src.eval_batches(len(r)))
    assert batches[0][0].shape[0] == len(r)  # a bad image's slot is filled by the next good one
    assert sum("takes its place" in m for m in caplog.messages) == 2
    strict = DecodedImages(r, PRE, workers=0, short_side=SHORT, on_bad="fail", name="damaged")
    with pytest.raises(DatasetError, match=r"damaged: cannot decode image .*img_0000[12]\.jpg"):
        list(strict.eval_batches(len(r)))


def test_pipeline_policy():
    assert choose_pipeline("auto", file_backed=False, prepared_exists=False) == "device"
    assert choose_pipeline("loader", file_backed=False, prepared_exists=True) == "device"
    assert choose_pipeline("auto", file_backed=True, prepared_exists=True, fits_on_disk=False) == "prepared"
    assert choose_pipeline("auto", file_backed=True, prepared_exists=False, fits_on_disk=True) == "prepared"
    assert choose_pipeline("auto", file_backed=True, prepared_exists=False, fits_on_disk=False) == "decode"
    assert choose_pipeline("prepared", file_backed=True, prepared_exists=False, fits_on_disk=False) == "prepared"
    assert choose_pipeline("decode", file_backed=True, prepared_exists=True) == "decode"
    assert choose_pipeline("loader", file_backed=True, prepared_exists=True) == "loader"
    with pytest.raises(ValueError, match="unknown pipeline 'dali'"):
        choose_pipeline("dali", file_backed=True, prepared_exists=True)


def test_sources_pick_the_fast_paths(folder, tmp_path, monkeypatch):
    data = datasets.load(f"imagefolder:{folder}")
    common = dict(seed=0, max_train=None, max_test=None, cache_dir=str(tmp_path))

    def kinds(**kw):
        return [type(s).__name__ for s in sources(data, "test", PRE, "cpu", **common, **kw)]

    assert kinds(pipeline="decode") == ["DecodedImages"] * 3
    assert kinds(pipeline="loader") == ["LoaderImages"] * 3
    monkeypatch.setattr(recipes, "fits_on_disk", lambda *a: (False, 1e3))
    assert kinds() == ["DecodedImages"] * 3  # auto, no copy, no room for one: decode on the fly
    monkeypatch.undo()
    assert kinds() == ["PreparedImages"] * 3  # auto: builds the copy on first use
    assert len(list(tmp_path.glob("*/meta.json"))) == 2  # train and test
    assert kinds(pipeline="prepared") == ["PreparedImages"] * 3  # and reuses it


def test_webdataset_shards(folder, tmp_path):
    import webdataset as wds

    files = sorted(folder.glob("class_*/*.jpg"))
    shards = tmp_path / "shards"
    shards.mkdir()
    for split, part in (("train", files[::2]), ("test", files[1::2])):
        for s in range(2):
            with wds.TarWriter(str(shards / f"{split}-{s:06d}.tar")) as sink:
                for p in part[s::2]:
                    sink.write({"__key__": f"{p.parent.name}/{p.stem}", "jpg": p.read_bytes(),
                                "cls": str(int(p.parent.name[-2:])).encode()})
    (shards / "classes.txt").write_text("red\ngreen\nblue\n")
    data = datasets.load(f"webdataset:{shards}")
    assert data.class_names == ("red", "green", "blue") and data.augment == "inception"
    r = reader_for(data.train)
    assert len(r) + len(reader_for(data.test)) == len(files)
    first = decode_item(r, 0, short_side=None, max_aspect=10.0)
    assert np.array_equal(first, np.asarray(Image.open(folder / f"{r.keys[0]}.jpg").convert("RGB")))
    pattern = datasets.load("webdataset:" + str(shards / "train-{000000..000001}.tar"))
    assert len(pattern.train) + len(pattern.test) == len(r)  # a fixed 20% test split of the pattern's samples
    x, y = DecodedImages(r, PRE, workers=0).train_batch(0, 6, seed=0)
    assert x.shape == (6, 3, 28, 28)
    ps = prepared.prepare(r, name=data.name, split="train", class_names=data.class_names, root=tmp_path / "c",
                          opts=PrepareOptions(workers=0))
    assert len(ps) == len(r)
    with pytest.raises(DatasetError, match="no shard file"):
        datasets.load("webdataset:" + str(shards / "train-{000000..000009}.tar"))
    (shards / "classes.txt").write_text("red\n")
    with pytest.raises(DatasetError, match="classes.txt names 1 classes"):
        datasets.load(f"webdataset:{shards}")


def test_bad_image_is_a_bad_image():
    with pytest.raises(BadImage, match="cannot decode image x"):
        decode_item(type("R", (), {"read": lambda s, i: b"nope", "name": lambda s, i: "x", "labels": [0]})(), 0,
                    short_side=None, max_aspect=2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")
def test_streamed_batches_on_the_gpu(reader, tmp_path):
    """On the GPU: prepared and decoded sources give identical batches, close to the CPU's, for any rank split."""
    ps = prepare_small(reader, tmp_path)
    gpu_a, gpu_b = PreparedImages(ps, PRE, "cuda"), DecodedImages(reader, PRE, "cuda", workers=2, short_side=SHORT)
    cpu = PreparedImages(ps, PRE)
    for step in range(3):
        xa, ya = gpu_a.train_batch(step, 8, seed=2)
        xb, yb = gpu_b.train_batch(step, 8, seed=2)
        assert xa.is_cuda and torch.equal(xa, xb) and torch.equal(ya, yb)
    ev_gpu = torch.cat([x.cpu() for x, _ in gpu_a.eval_batches(10)])
    ev_cpu = torch.cat([x for x, _ in cpu.eval_batches(10)])
    torch.testing.assert_close(ev_gpu, ev_cpu, rtol=1e-4, atol=1e-4)
    parts = [PreparedImages(ps, PRE, "cuda").train_batch(1, 9, seed=0, shard=Shard(r, 2))[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), PreparedImages(ps, PRE, "cuda").train_batch(1, 9, seed=0)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU host)")
@pytest.mark.parametrize("kind", ["prepared", "decoded"])
def test_cuda_graph_training_from_streamed_sources(reader, tmp_path, kind):
    """A captured training step while the source's threads pin host memory (capture must tolerate them)."""
    from continual_mem import MemoryViT
    from continual_mem.train import TrainConfig, fit
    from helpers import make_backbone

    net = MemoryViT(make_backbone("tiny"))
    net.add_task("t", 3, memory=2)
    net.cuda()
    pre = Preprocess(32, (0.5,) * 3, (0.25,) * 3, 0.875, "inception")
    source = PreparedImages(prepare_small(reader, tmp_path), pre, "cuda") if kind == "prepared" else \
        DecodedImages(reader, pre, "cuda", workers=2, short_side=SHORT)
    result = fit(net, "t", source, source, TrainConfig(steps=12, batch_size=8, eval_every=6, cuda_graph=True),
                 progress=False)
    assert result.steps == 12 and 0.0 <= result.best_val_accuracy <= 1.0


@pytest.mark.parametrize("augment", ["inception", "flip", "none"])
def test_resident_and_file_sources_crop_alike(augment):
    """One crop for every input path: a set held on the device (:class:`DeviceImages`) and the same images laid
    out as a padded batch (:class:`DeviceStage`: prepared copies, decoded files, the server) give the same model
    inputs, for training draws and for the evaluation crop (they differ only in where ``/255`` happens)."""
    from scenarios.pipeline import DeviceImages
    from scenarios.streaming import DeviceStage
    from scenarios.types import ImageSet

    pre = Preprocess(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.875, augment)
    imgs = torch.randint(0, 256, (5, 3, 20, 20), dtype=torch.uint8)
    resident = DeviceImages(ImageSet(imgs, torch.arange(5)), pre)
    canvas = torch.zeros((5, 32, 32, 3), dtype=torch.uint8)
    for k in range(5):
        prepared.place(canvas[k].numpy(), imgs[k].permute(1, 2, 0).numpy())
    hw = torch.full((5, 2), 20)
    stage = DeviceStage(pre, torch.device("cpu"))
    for train in (False, True):
        a = resident.batch(torch.arange(5), train=train, g=torch.Generator().manual_seed(3))[0]
        b = stage(canvas, hw, torch.arange(5), train=train, g=torch.Generator().manual_seed(3))[0]
        assert a.shape == b.shape == (5, 3, 32, 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


