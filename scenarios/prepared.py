"""Prepared copies: a file-backed dataset decoded once into one memory-mapped file.

``prepare`` decodes every image of a split (all host cores, ``torchvision.io``), shrinks it to a fixed short side
and appends it to one data file; ``index.npy`` holds ``(offset, height, width, label)`` per image. Two encodings:

* ``raw`` (``pixels.u8``): uint8 pixels, ~196 KB per 256 px image (~4x a typical source JPEG). Training reads
  batches straight from the page cache (:class:`scenarios.streaming.PreparedImages`): no decoding, one memory copy
  per image; the fastest path measured.
* ``jpeg`` (``images.jpg``, the compact copy, in the spirit of FFCV): each shrunk image re-encoded once as a
  JPEG (quality 90 by default), ~10x smaller than raw; batches are decoded by nvJPEG or host workers
  (:mod:`scenarios.compact`). For datasets whose raw copy would not fit (:func:`choose_encoding`).

The build is

* **resumable**: work goes in chunks, in order; after each chunk the pixels are flushed, then the index so far,
  then ``progress.json``: an interrupted build restarts at the last recorded chunk;
* **atomic**: ``meta.json`` (with the source's fingerprint) is written last, by rename; a folder without it is an
  unfinished build and is never read as data;
* **keyed by content**: the folder name carries a hash of the file list (paths, sizes, mtimes, labels) and the
  decoding options, so a changed dataset gets a new copy instead of a stale one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .decode import MAX_ASPECT, SHORT_SIDE, BadImage, Reader, bad_image_error, decode_item, host_cores
from .task_recipe import OnBad

log = logging.getLogger(__name__)

FORMAT = 1
ENCODINGS = ("raw", "jpeg")
DATA_FILE = {"raw": "pixels.u8", "jpeg": "images.jpg"}
CHUNK = 64  # images a decoding worker hands back at once (smaller chunks kept 16 cores busier)


def default_root() -> Path:
    """``$CONTINUAL_MEM_PREPARED``, else ``$CONTINUAL_MEM_HOME/prepared`` (default
    ``~/.cache/continual-mem/prepared``)."""
    if os.environ.get("CONTINUAL_MEM_PREPARED"):
        return Path(os.environ["CONTINUAL_MEM_PREPARED"])
    home = os.environ.get("CONTINUAL_MEM_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "continual-mem") / "prepared"


@dataclass(frozen=True)
class PrepareOptions:
    """Args:
        short_side: Images are shrunk (never enlarged) to this short side; 256 keeps a 224 px crop sharp.
        max_aspect: Longer sides are centre-cropped to this many times the short side.
        on_bad: ``skip`` leaves an undecodable image out (named once in the log and in ``meta.json``);
            ``fail`` stops with its path.
        workers: Decoding processes (default: the host's cores).
        encoding: ``raw`` pixels or ``jpeg`` (the compact copy; :func:`choose_encoding` picks).
        quality: JPEG quality of the compact copy (1-100).
    """

    short_side: int = SHORT_SIDE
    max_aspect: float = MAX_ASPECT
    on_bad: OnBad = "skip"
    workers: int | None = None
    encoding: str = "raw"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.short_side < 8:
            raise ValueError(f"short_side must be >= 8, got {self.short_side}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if self.on_bad not in ("skip", "fail"):
            raise ValueError(f"on_bad must be skip or fail, got {self.on_bad!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be raw or jpeg, got {self.encoding!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {self.quality}")


def choose_encoding(encoding: str, *, raw_fits: bool) -> str:
    """The prepared copy's encoding (policy, pure). ``auto``: raw pixels where they fit (``raw_fits``: half the free
    disk), the fastest path measured (one H200, ``benchmarks/data_throughput.py``: 0.98-0.99x device-resident
    training, the compact copy 0.54-0.58x with nvJPEG, decoding the source files 0.43x); else the compact copy,
    a tenth of the bytes."""
    if encoding not in ("auto", *ENCODINGS):
        raise ValueError(f"unknown encoding {encoding!r}; use auto, raw or jpeg")
    if encoding != "auto":
        return encoding
    return "raw" if raw_fits else "jpeg"


class PreparedSet:
    """A finished prepared copy (or a subset of it): ``labels``, ``len``, ``subset(idx)`` like :class:`ImageSet`;
    ``pixels`` (memory-mapped) and ``index`` (offset, height, width, label per image) for batch sources."""

    def __init__(self, root: str | Path, rows: np.ndarray | None = None) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.root} is not a finished prepared copy (no meta.json); run prepare again")
        self.meta = json.loads(meta_path.read_text())
        index = np.load(self.root / "index.npy", allow_pickle=False)
        self.index = index
        self.encoding = self.meta.get("encoding", "raw")  # copies from before the compact encoding are raw
        # a finished copy is never empty
        self.pixels = np.memmap(self.root / DATA_FILE[self.encoding], dtype=np.uint8, mode="r")
        # each image's bytes end where the next one's begin (the last at the file's end)
        self.ends = np.append(index[1:, 0], len(self.pixels)) if self.encoding == "jpeg" else \
            index[:, 0] + index[:, 1] * index[:, 2] * 3
        self.rows = np.arange(len(index)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.class_names = tuple(self.meta["class_names"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:  # to a worker process: the file is mapped again there, not copied
        return {k: v for k, v in self.__dict__.items() if k != "pixels"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pixels = np.memmap(self.root / DATA_FILE[self.encoding], dtype=np.uint8, mode="r")

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.index[self.rows, 3].copy())

    @property
    def sizes(self) -> np.ndarray:
        """``(N, 2)`` heights and widths."""
        return self.index[self.rows][:, 1:3]

    def subset(self, idx) -> "PreparedSet":
        part = copy.copy(self)  # shares the memory map and the index
        part.rows = self.rows[np.asarray(idx, dtype=np.int64)]
        return part

    @property
    def nbytes(self) -> np.ndarray:
        """Stored bytes of each image."""
        return self.ends[self.rows] - self.index[self.rows, 0]

    def encoded(self, positions: np.ndarray) -> list[torch.Tensor]:
        """The stored bytes of images ``positions`` (JPEG files for a compact copy), one uint8 tensor each."""
        rows = self.rows[positions]
        return [torch.from_numpy(np.array(self.pixels[o:e])) for o, e in zip(self.index[rows, 0].tolist(),
                                                                             self.ends[rows].tolist())]

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as ``(h, w, 3)`` uint8 (decoded on the host for a compact copy)."""
        off, h, w, _ = self.index[self.rows[i]]
        if self.encoding == "jpeg":
            from torchvision.io import ImageReadMode, decode_jpeg

            return decode_jpeg(self.encoded(np.array([i]))[0], mode=ImageReadMode.RGB).permute(1, 2, 0).numpy()
        return np.asarray(self.pixels[off:off + h * w * 3]).reshape(h, w, 3)


def place(dst: np.ndarray, img: np.ndarray) -> None:
    """Put ``img`` ``(h, w, 3)`` at the top left of ``dst`` ``(H, W, 3)`` with its last row and column repeated
    once. A bilinear crop inside the image reads at most one pixel past its edge, which is then the edge itself;
    nothing further out is ever read, so the rest of ``dst`` is left as it is (no zeroing pass)."""
    h, w = img.shape[:2]
    dst[:h, :w] = img
    if h < dst.shape[0]:
        dst[h, :w] = img[h - 1]
    if w < dst.shape[1]:
        dst[:h + 1, w] = dst[:h + 1, w - 1]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-.")[-48:] or "data"


def location(reader: Reader, *, name: str, split: str, opts: PrepareOptions, root: Path | None = None) -> Path:
    """Where the prepared copy of ``reader`` with ``opts`` lives (a hash of its content and the options)."""
    key = {"format": FORMAT, "source": reader.fingerprint(), "short_side": opts.short_side,
           "max_aspect": opts.max_aspect, "on_bad": opts.on_bad}
    if opts.encoding != "raw":  # raw copies keep the folders they had before the compact encoding
        key.update(encoding=opts.encoding, quality=opts.quality)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (root or default_root()) / f"{_slug(name)}-{split}-{digest}"


class _Chunks(Dataset):
    """Chunk ``c`` of a reader, decoded: what one worker returns."""

    def __init__(self, reader: Reader, opts: PrepareOptions, first: int) -> None:
        self.reader, self.opts, self.first = reader, opts, first
        self.count = (len(reader) + CHUNK - 1) // CHUNK

    def __len__(self) -> int:
        return self.count - self.first

    def __getitem__(self, c: int):
        lo = (self.first + c) * CHUNK
        arrays, rows, bad = [], [], []
        for i in range(lo, min(lo + CHUNK, len(self.reader))):
            try:
                a = decode_item(self.reader, i, short_side=self.opts.short_side, max_aspect=self.opts.max_aspect)
            except BadImage as exc:
                bad.append(str(exc))
                continue
            data = encode(a, self.opts.quality) if self.opts.encoding == "jpeg" else a.reshape(-1)
            arrays.append(data)
            rows.append((a.shape[0], a.shape[1], int(self.reader.labels[i]), data.size))
        flat = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.zeros(0, dtype=torch.uint8)
        return flat, torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), bad


def encode(image: np.ndarray, quality: int) -> np.ndarray:
    """``(h, w, 3)`` uint8 as the bytes of a baseline JPEG (libjpeg-turbo through ``torchvision.io``; 4:2:0, which
    nvJPEG's hardware decoder takes)."""
    from torchvision.io import encode_jpeg

    return encode_jpeg(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), quality=quality).numpy()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def prepare(
    reader: Reader,
    *,
    name: str,
    split: str,
    class_names: tuple[str, ...],
    opts: PrepareOptions = PrepareOptions(),
    root: str | Path | None = None,
    progress: bool = False,
) -> PreparedSet:
    """Decode ``reader`` into a prepared copy (or reuse / resume the one already there) and open it.

    Args:
        reader: The encoded images (:func:`scenarios.decode.reader_for`).
        name: Dataset name (for messages and the folder name).
        split: ``train`` or ``test`` (part of the folder name).
        class_names: Stored with the copy.
        opts: Decoding options.
        root: Folder of prepared copies (default :func:`default_root`).
        progress: Show a rich progress bar.

    Raises:
        DatasetError: an image cannot be decoded and ``opts.on_bad`` is ``fail`` (the build so far is kept and
            resumes once the file is fixed or skipped).
    """
    out = location(reader, name=name, split=split, opts=opts, root=Path(root) if root else None)
    if (out / "meta.json").is_file():
        return PreparedSet(out)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out / ".lock", f"{name} ({split})"):  # DDP ranks, two shells: one builds, the others wait
        if (out / "meta.json").is_file():
            return PreparedSet(out)
        return _build(reader, out, name=name, split=split, class_names=class_names, opts=opts, progress=progress)


@contextlib.contextmanager
def _exclusive(path: Path, what: str):
    """An exclusive lock on ``path`` (``flock``: released by the OS if the holder dies)."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process is preparing this copy; waiting for it", what)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(reader: Reader, out: Path, *, name: str, split: str, class_names: tuple[str, ...], opts: PrepareOptions,
           progress: bool) -> PreparedSet:
    from .types import DatasetError

    # index rows are appended like the pixels (raw little-endian int64, 4 per image): linear in the dataset
    state_path, pixels_path, partial_index = out / "progress.json", out / DATA_FILE[opts.encoding], \
        out / "index.partial.i64"
    state = {"chunks": 0, "bytes": 0, "rows": 0, "bad": []}
    if state_path.is_file() and partial_index.is_file():
        state = json.loads(state_path.read_text())
        log.info("%s/%s: resuming a prepared copy at image %d of %d", name, split, state["chunks"] * CHUNK,
                 len(reader))
    t0 = time.perf_counter()
    workers = host_cores() if opts.workers is None else opts.workers
    chunks = _Chunks(reader, opts, state["chunks"])
    loader = DataLoader(chunks, batch_size=None, num_workers=min(workers, len(chunks)),
                        prefetch_factor=4 if workers else None)
    bar = _bar(progress, f"{name} ({split})", len(reader), min(len(reader), state["chunks"] * CHUNK))
    mode = "ab" if state["chunks"] else "wb"
    try:
        with open(pixels_path, mode) as f, open(partial_index, mode) as fi:
            for handle, size in ((f, state["bytes"]), (fi, state["rows"] * 4 * 8)):
                handle.truncate(size)  # drop whatever a crash wrote after the last recorded chunk
                handle.seek(size)
            for flat, chunk_rows, bad in loader:
                if bad and opts.on_bad == "fail":
                    raise DatasetError(bad_image_error(name, bad[0]))
                for message in bad:
                    log.warning("%s: %s; left out", name, message)
                n = len(chunk_rows)
                offsets = state["bytes"] + np.concatenate(
                    [[0], np.cumsum(chunk_rows[:, 3].numpy())[:-1]]) if n else np.zeros(0)
                f.write(flat.numpy().data)
                f.flush()
                fi.write(np.column_stack([offsets, chunk_rows[:, :3].numpy()]).astype("<i8").tobytes() if n else b"")
                fi.flush()
                state = {"chunks": state["chunks"] + 1, "bytes": state["bytes"] + flat.numel(),
                         "rows": state["rows"] + n, "bad": state["bad"] + bad}
                _write_json(state_path, state)
                if bar is not None:
                    bar[0].update(bar[1], completed=min(len(reader), state["chunks"] * CHUNK))
    finally:
        if bar is not None:
            bar[0].stop()
    index = np.fromfile(partial_index, dtype="<i8").reshape(-1, 4).astype(np.int64)
    if not len(index):
        raise DatasetError(f"{name}: no image of the {split} split could be decoded; check the files")
    np.save(out / "index.tmp.npy", index)
    os.replace(out / "index.tmp.npy", out / "index.npy")
    _write_json(out / "meta.json", {
        "format": FORMAT, "name": name, "split": split, "class_names": list(class_names), "count": len(index),
        "bad": state["bad"], "short_side": opts.short_side, "max_aspect": opts.max_aspect,
        "encoding": opts.encoding, "quality": opts.quality if opts.encoding == "jpeg" else None,
        "source": reader.fingerprint(), "bytes": state["bytes"], "seconds": time.perf_counter() - t0})
    for leftover in (state_path, partial_index):
        leftover.unlink(missing_ok=True)
    return PreparedSet(out)


def find(reader: Reader, *, name: str, split: str, opts: PrepareOptions = PrepareOptions(),
         root: str | Path | None = None) -> PreparedSet | None:
    """The finished prepared copy of ``reader`` with ``opts``, if there is one."""
    out = location(reader, name=name, split=split, opts=opts, root=Path(root) if root else None)
    return PreparedSet(out) if (out / "meta.json").is_file() else None


def _bar(enabled: bool, label: str, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(f"[bold]prepare {label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    tid = bar.add_task(label, total=total, completed=start)
    bar.start()
    return bar, tid
