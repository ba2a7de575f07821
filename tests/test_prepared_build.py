"""The prepared copy's build beyond the plain path: its progress bar and log lines, a chunk with no decodable image,
an index that is not plain integers, rows and subsets, the default folder, the lock (taken only to build, waited
on when held), and a resume whose partial index is missing."""
import fcntl
import json
import logging
import re
import threading
import time

import numpy as np
import pytest
import torch

from input_helpers import SHORT, folder, prepare_small, reader  # noqa: F401 - fixtures
from scenarios import datasets, prepared
from scenarios.decode import FilesReader, decode_item, reader_for
from scenarios.prepared import PrepareOptions
from scenarios.synthetic import make_image_folder
from scenarios.types import DatasetError
from test_prepared import _Interrupting

OPTS = PrepareOptions(short_side=SHORT, workers=0)


class _Bar:
    """Stands in for rich's ``Progress``: records what the build shows."""

    made: list["_Bar"] = []

    def __init__(self, *columns):
        self.columns, self.tasks, self.updates, self.events = columns, [], [], []
        _Bar.made.append(self)

    def add_task(self, label, *, total, completed):
        self.tasks.append((label, total, completed))
        return "tid"

    def update(self, tid, *, completed):
        self.updates.append((tid, completed))

    def start(self):
        self.events.append("start")

    def stop(self):
        self.events.append("stop")


@pytest.fixture
def bars(monkeypatch):
    import rich.progress

    _Bar.made = []
    monkeypatch.setattr(rich.progress, "Progress", _Bar)
    return _Bar.made


def test_the_progress_bar_counts_images_from_where_a_resume_starts(reader, tmp_path, monkeypatch, bars, caplog):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    monkeypatch.setattr(prepared, "CHUNK", 8)  # 30 training images: chunks of 8, 8, 8, 6
    with pytest.raises(KeyboardInterrupt):
        prepare_small(_Interrupting(reader, 20), tmp_path)  # chunks 0 and 1 recorded
    assert bars == []  # no bar unless asked for
    with caplog.at_level(logging.INFO, logger="scenarios.prepared"):
        copy = prepared.prepare(reader, name="jpegs", split="train", class_names=("a", "b", "c"), root=tmp_path,
                                opts=OPTS, progress=True)
    assert len(reader) == len(copy) == 30
    assert "jpegs/train: resuming a prepared copy at image 16 of 30" in caplog.messages
    (bar,) = bars
    assert [type(c) for c in bar.columns] == [TextColumn, BarColumn, MofNCompleteColumn, TimeRemainingColumn]
    assert bar.columns[0].text_format == "[bold]prepare jpegs (train)"
    assert bar.tasks == [("jpegs (train)", 30, 16)]
    assert bar.updates == [("tid", 24), ("tid", 30)]  # the last chunk: capped at the image count
    assert bar.events == ["start", "stop"]
    from scenarios.decode import SubsetReader

    prepared.prepare(SubsetReader(reader, np.arange(24)), name="jpegs", split="train", class_names=("a", "b", "c"),
                     root=tmp_path / "whole", opts=OPTS, progress=True)  # a fresh build of exactly 3 chunks
    assert bars[1].tasks == [("jpegs (train)", 24, 0)] and bars[1].updates == [("tid", 8), ("tid", 16), ("tid", 24)]


def test_the_bar_stops_when_the_build_fails(tmp_path, monkeypatch, bars):
    monkeypatch.setattr(prepared, "CHUNK", 8)
    data = tmp_path / "data"
    make_image_folder(data, classes=1, per_class=3, size=(40, 30))
    (data / "class_00" / "img_00001.jpg").write_bytes(b"not an image")
    r = reader_for(datasets.load(f"imagefolder:{data}").train)
    with pytest.raises(DatasetError):
        prepared.prepare(r, name="x", split="train", class_names=("a",), root=tmp_path / "c", progress=True,
                         opts=PrepareOptions(short_side=SHORT, workers=0, on_bad="fail"))
    assert bars[0].events == ["start", "stop"] and bars[0].updates == []


@pytest.fixture
def gappy(tmp_path):
    """8 images in chunks of 2 where chunk 1 (images 2 and 3) has no decodable image, and image 6 is bad too."""
    root = tmp_path / "gappy"
    make_image_folder(root, classes=2, per_class=4, size=(40, 30))
    for cls, i in (("00", 2), ("00", 3), ("01", 2)):
        (root / f"class_{cls}" / f"img_0000{i}.jpg").write_bytes(b"truncated?" * (i + 1))
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    return FilesReader(paths, np.array([int("class_01" in p) for p in paths]))


def test_a_chunk_without_a_decodable_image_leaves_the_others_in_place(gappy, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(prepared, "CHUNK", 2)
    with caplog.at_level(logging.WARNING, logger="scenarios.prepared"):
        copy = prepare_small(gappy, tmp_path)
    good = [0, 1, 4, 5, 7]
    assert len(copy) == 5 and copy.labels.tolist() == [int(gappy.labels[i]) for i in good]
    for row, i in enumerate(good):
        assert np.array_equal(copy.image(row), decode_item(gappy, i, short_side=SHORT, max_aspect=2.0))
    assert copy.meta["bytes"] == (copy.root / "pixels.u8").stat().st_size == int((copy.sizes.prod(1) * 3).sum())
    left_out = [m for m in caplog.messages if m.endswith("; left out")]
    assert len(left_out) == 3 and left_out == [f"jpegs: {b}; left out" for b in copy.meta["bad"]]
    assert [re.search(r"img_\d+\.jpg", b).group() for b in copy.meta["bad"]] == ["img_00002.jpg", "img_00003.jpg",
                                                                               "img_00002.jpg"]


def test_fail_names_the_first_bad_image_of_its_chunk(gappy, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "CHUNK", 4)  # images 2 and 3 are both bad in chunk 0
    with pytest.raises(DatasetError) as err:
        prepare_small(gappy, tmp_path, on_bad="fail")
    assert re.fullmatch(r"jpegs: cannot decode image \S*class_00/img_00002\.jpg.*; remove or replace the file, or "
                        r"pass --on-bad-image skip to leave it out", str(err.value)), str(err.value)


def test_a_split_with_no_decodable_image_is_one_clear_error(tmp_path):
    root = tmp_path / "bad"
    make_image_folder(root, classes=1, per_class=2, size=(40, 30))
    for p in (root / "class_00").iterdir():
        p.write_bytes(b"x")
    r = reader_for(datasets.load(f"imagefolder:{root}").train)
    with pytest.raises(DatasetError, match="^jpegs: no image of the train split could be decoded; check the files$"):
        prepare_small(r, tmp_path / "c")


def test_an_index_that_needs_unpickling_is_refused(reader, tmp_path):
    copy = prepare_small(reader, tmp_path)
    np.save(copy.root / "index.npy", np.array([{"offset": 0}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        prepared.PreparedSet(copy.root)


def test_rows_and_subsets_pick_images_of_the_copy(reader, tmp_path):
    copy = prepare_small(reader, tmp_path)
    some = prepared.PreparedSet(copy.root, rows=np.array([5, 0, 5], dtype=np.int32))
    part = copy.subset([5, 0, 5])
    for picked in (some, part, copy.subset(np.array([5, 0, 5], dtype=np.int32))):
        assert len(picked) == 3 and picked.rows.dtype == np.int64
        assert torch.equal(picked.labels, copy.labels[[5, 0, 5]])
        assert np.array_equal(picked.image(0), copy.image(5)) and np.array_equal(picked.image(1), copy.image(0))
        assert np.array_equal(picked.sizes, copy.sizes[[5, 0, 5]])
    nested = part.subset([1])
    assert np.array_equal(nested.image(0), copy.image(0)) and len(copy) == len(reader)  # the parent is untouched
    empty = copy.subset([])
    assert len(empty) == 0 and empty.labels.shape == (0,)


def test_the_default_root_follows_the_environment(reader, tmp_path, monkeypatch):
    monkeypatch.delenv("CONTINUAL_MEM_PREPARED", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONTINUAL_MEM_HOME", raising=False)
    assert prepared.default_root() == tmp_path / "home" / ".cache" / "continual-mem" / "prepared"
    monkeypatch.setenv("CONTINUAL_MEM_HOME", str(tmp_path / "cm"))
    assert prepared.default_root() == tmp_path / "cm" / "prepared"
    monkeypatch.setenv("CONTINUAL_MEM_PREPARED", str(tmp_path / "p"))
    assert prepared.default_root() == tmp_path / "p"
    copy = prepared.prepare(reader, name="jpegs", split="train", class_names=("a", "b", "c"), opts=OPTS)
    assert copy.root.parent == tmp_path / "p"
    assert prepared.find(reader, name="jpegs", split="train", opts=OPTS).root == copy.root


def test_a_finished_copy_opens_without_taking_the_lock(reader, tmp_path):
    # e.g. a copy on a read-only shared mount: opening it writes nothing
    copy = prepare_small(reader, tmp_path)
    (copy.root / ".lock").unlink()
    again = prepare_small(reader, tmp_path)
    assert again.root == copy.root and not (copy.root / ".lock").exists()


def test_a_held_lock_is_waited_for_and_said_so(reader, tmp_path, caplog):
    out = prepared.location(reader, name="jpegs", split="train", opts=OPTS, root=tmp_path)
    out.mkdir(parents=True)
    done: list = []
    with open(out / ".lock", "a") as held, caplog.at_level(logging.INFO, logger="scenarios.prepared"):
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: done.append(prepare_small(reader, tmp_path)))
        worker.start()
        for _ in range(200):
            if any("waiting" in m for m in caplog.messages):
                break
            time.sleep(0.01)
        assert done == []  # still waiting
        fcntl.flock(held, fcntl.LOCK_UN)
        worker.join(60)
    assert "jpegs (train): another process is preparing this copy; waiting for it" in caplog.messages
    assert len(done) == 1 and len(done[0]) == len(reader)


def test_a_resume_without_its_partial_index_starts_over(reader, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "CHUNK", 8)
    with pytest.raises(KeyboardInterrupt):
        prepare_small(_Interrupting(reader, 20), tmp_path / "a")
    out = prepared.location(reader, name="jpegs", split="train", opts=OPTS, root=tmp_path / "a")
    assert json.loads((out / "progress.json").read_text())["chunks"] == 2
    (out / "index.partial.i64").unlink()  # e.g. removed by hand
    resumed = prepare_small(reader, tmp_path / "a")
    whole = prepare_small(reader, tmp_path / "b")
    assert np.array_equal(resumed.index, whole.index)
    assert (resumed.root / "pixels.u8").read_bytes() == (whole.root / "pixels.u8").read_bytes()
