"""Prepared copies: resume after an interruption, chunk boundaries, a location stable across versions, safe
folder names, one copy for concurrent prepares, options, the canvas, meta.json."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from input_helpers import SHORT, folder, prepare_small, reader  # noqa: F401 - fixtures
from scenarios import datasets, prepared
from scenarios.decode import decode_item, reader_for
from scenarios.prepared import PrepareOptions
from scenarios.synthetic import make_image_folder, photo

GOLDEN_DIGEST = "620fdbf3920af9c9"  # prepared.location of _Named below; changes only with prepared.FORMAT


class _Interrupting:
    """A reader that stops the process (as Ctrl-C would) at one item."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.labels = inner, at, inner.labels

    def __len__(self):
        return len(self.inner)

    def read(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return self.inner.read(i)

    def name(self, i):
        return self.inner.name(i)

    def fingerprint(self):
        return self.inner.fingerprint()


@pytest.mark.parametrize("encoding", prepared.ENCODINGS)
def test_prepare_interrupted_resumes_to_the_same_copy(reader, tmp_path, monkeypatch, encoding):
    opts = PrepareOptions(short_side=SHORT, workers=0, encoding=encoding)
    data_file = prepared.DATA_FILE[encoding]
    monkeypatch.setattr(prepared, "CHUNK", 5)  # 36 images: 7 full chunks and one of a single image
    with pytest.raises(KeyboardInterrupt):
        prepare_small(_Interrupting(reader, 21), tmp_path / "a", encoding=encoding)
    out = prepared.location(reader, name="jpegs", split="train", opts=opts, root=tmp_path / "a")
    assert not (out / "meta.json").exists()  # an unfinished copy is never read as data
    assert json.loads((out / "progress.json").read_text())["chunks"] == 4
    for name in (data_file, "index.partial.i64"):  # a crash after writing, before recording the chunk
        with open(out / name, "ab") as f:
            f.write(b"garbage a crash left behind" * 8)
    resumed = prepare_small(reader, tmp_path / "a", encoding=encoding)
    whole = prepare_small(reader, tmp_path / "b", encoding=encoding)
    assert (resumed.root / data_file).read_bytes() == (whole.root / data_file).read_bytes()
    assert np.array_equal(resumed.index, whole.index)
    assert not (out / "progress.json").exists()
    # and both hold exactly the reader's images, in order, across the 8 chunks, read-only
    assert len(whole) == len(reader) and torch.equal(whole.labels, torch.from_numpy(reader.labels))
    assert whole.class_names == ("a", "b", "c") and not whole.pixels.flags.writeable
    assert prepared.find(reader, name="jpegs", split="train", opts=opts, root=tmp_path / "b").root == whole.root
    assert prepared.find(reader, name="jpegs", split="test", opts=opts, root=tmp_path / "b") is None
    for i in range(len(reader)):  # raw pixels exactly; re-encoded JPEGs within a few grey levels
        got, ref = whole.image(i).astype(int), decode_item(reader, i, short_side=SHORT, max_aspect=2.0).astype(int)
        assert got.shape == ref.shape and (np.array_equal(got, ref) if encoding == "raw" else
                                           np.abs(got - ref).mean() < 4), i


@pytest.mark.parametrize("count", [26, 29])
def test_a_copy_of_n_images_in_chunks_holds_all_n(reader, tmp_path, monkeypatch, count):
    """A last chunk of one image, and a last chunk one image short of full, are written whole."""
    from scenarios.decode import SubsetReader

    monkeypatch.setattr(prepared, "CHUNK", 5)
    part = SubsetReader(reader, np.arange(count))
    copy = prepare_small(part, tmp_path)
    assert len(copy) == count and np.array_equal(copy.image(count - 1),
                                                 decode_item(part, count - 1, short_side=SHORT, max_aspect=2.0))


def test_a_folder_that_is_not_a_prepared_copy_is_refused(tmp_path):
    with pytest.raises(ValueError, match=rf"^{tmp_path} is not a finished prepared copy \(no meta.json\); run "
                                         "prepare again$"):
        prepared.PreparedSet(tmp_path)


class _Named:
    """A reader reduced to what :func:`prepared.location` reads."""

    def fingerprint(self):
        return {"files": 3, "sha256": "0" * 64}


def test_a_prepared_copys_location_is_stable_across_versions():
    """The folder name is a hash of the source and the decoding options: a change to it silently rebuilds every
    user's copies, so it changes only with ``prepared.FORMAT``."""
    opts = PrepareOptions(short_side=256, max_aspect=2.0, on_bad="skip")
    where = prepared.location(_Named(), name="My Photos/2024", split="train", opts=opts, root=Path("/r"))
    assert where == Path(f"/r/My-Photos-2024-train-{GOLDEN_DIGEST}")
    for other in (PrepareOptions(short_side=128), PrepareOptions(max_aspect=3.0), PrepareOptions(on_bad="fail")):
        assert prepared.location(_Named(), name="My Photos/2024", split="train", opts=other, root=Path("/r")) != where
    assert prepared.find(_Named(), name="My Photos/2024", split="train", opts=opts, root="/nowhere") is None


@pytest.mark.parametrize("name, slug", [("a b", "a-b"), ("../x/", "x"), ("...", "data"), ("é", "data"),
                                        ("ok_name-1.2", "ok_name-1.2"), ("y" * 60, "y" * 48),
                                        ("X-ray", "X-ray")])
def test_copy_names_are_safe_folder_names(name, slug):
    assert prepared.location(_Named(), name=name, split="s", opts=PrepareOptions(), root=Path("/r")).name \
        .startswith(f"{slug}-s-")


def test_a_changed_folder_gets_a_new_copy(tmp_path):
    root = tmp_path / "f"
    make_image_folder(root, classes=2, per_class=3, size=(40, 30))
    r1 = reader_for(datasets.load(f"imagefolder:{root}").train)
    ps = prepare_small(r1, tmp_path / "cache")
    (root / "class_00" / "img_00000.jpg").write_bytes(photo(99, label=0, size=(30, 40)))
    r2 = reader_for(datasets.load(f"imagefolder:{root}").train)
    assert prepared.location(r2, name="jpegs", split="train", opts=PrepareOptions(short_side=SHORT),
                             root=tmp_path / "cache") != ps.root


def _prepare_in_a_process(args):
    folder, root = args
    r = reader_for(datasets.load(f"imagefolder:{folder}").train)
    ps = prepare_small(r, root)
    return ps.root, (ps.root / "pixels.u8").read_bytes(), ps.index.tolist()


def test_concurrent_prepares_build_one_copy(folder, tmp_path, monkeypatch):
    """Two processes (DDP ranks, two shells) preparing the same dataset at once: one builds, the other waits."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    build, log = prepared._build, tmp_path / "builds.txt"

    def slow_build(*args, **kwargs):  # long enough for the other process to arrive while it runs
        with open(log, "a") as f:
            f.write("build\n")
        time.sleep(0.5)
        return build(*args, **kwargs)

    monkeypatch.setattr(prepared, "_build", slow_build)  # the forked workers inherit it
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        a, b = pool.map(_prepare_in_a_process, [(folder, tmp_path / "shared")] * 2)
    assert log.read_text().count("build") == 1
    whole = _prepare_in_a_process((folder, tmp_path / "alone"))
    assert a[0] == b[0] and a[1:] == b[1:] == whole[1:]


def test_prepare_options_boundaries_and_messages():
    PrepareOptions(short_side=8, max_aspect=1.0, workers=0)  # the smallest accepted
    for kw, message in [(dict(short_side=7), "short_side must be >= 8, got 7"),
                        (dict(max_aspect=0.99), "max_aspect must be >= 1, got 0.99"),
                        (dict(on_bad="ignore"), "on_bad must be skip or fail, got 'ignore'"),
                        (dict(workers=-1), "workers must be >= 0, got -1")]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            PrepareOptions(**kw)


def test_place_fills_a_canvas_it_exactly_fits_and_repeats_edges_otherwise():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    exact = np.zeros((2, 3, 3), np.uint8)
    prepared.place(exact, img)  # no room for the repeated edge: nothing written past the image
    assert np.array_equal(exact, img)
    wide = np.full((2, 5, 3), 7, np.uint8)
    prepared.place(wide, img)
    assert np.array_equal(wide[:, 3], img[:, 2]) and (wide[:, 4] == 7).all()
    tall = np.full((4, 3, 3), 7, np.uint8)
    prepared.place(tall, img)
    assert np.array_equal(tall[2], img[1]) and (tall[3] == 7).all()


def test_a_copys_meta_json_describes_it(reader, tmp_path):
    copy = prepare_small(reader, tmp_path)
    meta = json.loads((copy.root / "meta.json").read_text())
    assert {k: meta[k] for k in ("format", "name", "split", "class_names", "count", "bad", "short_side",
                                 "max_aspect")} == {"format": prepared.FORMAT, "name": "jpegs", "split": "train",
                                                    "class_names": ["a", "b", "c"], "count": len(reader), "bad": [],
                                                    "short_side": SHORT, "max_aspect": 2.0}
    assert meta["bytes"] == (copy.root / "pixels.u8").stat().st_size == int((copy.sizes.prod(axis=1) * 3).sum())
    assert meta["source"] == reader.fingerprint() and 0 <= meta["seconds"] < 600
    leftovers = sorted(p.name for p in copy.root.iterdir())
    assert leftovers == [".lock", "index.npy", "meta.json", "pixels.u8"]  # no progress or partial index
