"""``webdataset:PATTERN``: tar-sharded datasets in the WebDataset layout (extra ``webdataset``).

A shard is a plain tar file whose members are grouped into samples by key, WebDataset's own convention
(``webdataset.tariterators.base_plus_ext``: ``n01/img42.jpg`` and ``n01/img42.cls`` are one sample). Each sample
needs an image (``jpg``, ``jpeg``, ``png``, ``webp``) and an integer class (``cls``). The shards are indexed once
(member offsets, a few milliseconds a shard) so that images are read by offset: the same random-access readers,
prepared copies and GPU decoding path as image folders, and DDP ranks read only their part of each batch.

``PATTERN`` is a brace pattern of local shards (``/data/train-{000000..000099}.tar``; a fixed stratified 20% test
split is held out) or a folder holding ``train-*.tar`` and ``test-*.tar`` (or ``val-*.tar``); class names come from
``classes.txt`` (one per line) beside the shards, else the class numbers.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .types import DataOptions, DatasetError, ReaderDataset, TaskData
from .decode import digest
from .splits import stratified_split

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class TarReader:
    """Images inside tar shards, read by offset (``os.pread``; one descriptor per shard and process)."""

    shards: list[str]
    members: np.ndarray  # (N, 3): shard number, data offset, size
    keys: list[str]
    labels: np.ndarray
    _fds: dict = field(default_factory=dict, repr=False, compare=False)
    _fingerprint: dict | None = field(default=None, repr=False, compare=False)

    def __getstate__(self):  # descriptors do not travel to worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_fds"} | {"_fds": {}}

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int) -> bytes:
        shard, offset, size = (int(v) for v in self.members[i])
        key = (os.getpid(), shard)
        if key not in self._fds:
            self._fds[key] = os.open(self.shards[shard], os.O_RDONLY)
        return os.pread(self._fds[key], size, offset)

    def name(self, i: int) -> str:
        return f"{self.shards[int(self.members[i, 0])]}:{self.keys[i]}"

    def fingerprint(self) -> dict:
        def line(p: str) -> str:
            st = os.stat(p)
            return f"{p}\t{st.st_size}\t{st.st_mtime_ns}"

        if self._fingerprint is None:  # once per reader, as FilesReader
            self._fingerprint = {"kind": "webdataset", "count": len(self), "shards": digest(map(line, self.shards))}
        return self._fingerprint


def index_shards(shards: list[str], *, name: str) -> TarReader:
    """Index the samples of ``shards`` (in shard order, then tar order)."""
    from webdataset.tariterators import base_plus_ext

    members, keys, labels = [], [], []
    for s, path in enumerate(shards):
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = base_plus_ext(m.name)
                    if key is None:
                        continue
                    entry = samples.setdefault(key, {})
                    ext = ext.lower()
                    if ext in IMAGE_EXTS:
                        entry["image"] = (m.offset_data, m.size)
                    elif ext == "cls":
                        entry["cls"] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError) as exc:
            raise DatasetError(f"{name}: cannot read shard {path} ({exc}); write it again") from exc
        for key, entry in samples.items():
            if "image" not in entry or "cls" not in entry:
                continue
            try:
                label = int(entry["cls"].decode().strip())
            except ValueError:
                raise DatasetError(f"{name}: sample {key} of {path} has a non-integer class "
                                   f"{entry['cls'][:20]!r}; store the class number in its .cls member") from None
            members.append((s, *entry["image"]))
            keys.append(key)
            labels.append(label)
    if not keys:
        raise DatasetError(f"{name}: no sample with an image (.jpg/.png/.webp) and a class (.cls) in "
                           f"{len(shards)} shard(s); write them with webdataset.TarWriter")
    return TarReader(list(shards), np.array(members, dtype=np.int64).reshape(-1, 3), keys,
                     np.array(labels, dtype=np.int64))


def _expand(pattern: str, *, name: str) -> list[str]:
    import braceexpand

    paths = [p for p in braceexpand.braceexpand(pattern)]
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise DatasetError(f"{name}: no shard file {missing[0] if missing else pattern}; give local .tar shards "
                           "(e.g. webdataset:/data/train-{000000..000009}.tar) or a folder with train-*.tar")
    return paths


def _class_names(folder: Path, labels: np.ndarray, name: str) -> tuple[str, ...]:
    path = folder / "classes.txt"
    if path.is_file():
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if labels.max() >= len(names) or labels.min() < 0:
            raise DatasetError(f"{name}: classes.txt names {len(names)} classes but the shards use class "
                               f"{int(labels.max())}; fix classes.txt")
        return names
    if labels.min() < 0:
        raise DatasetError(f"{name}: negative class numbers in the shards")
    return tuple(str(i) for i in range(int(labels.max()) + 1))


def load_webdataset(spec: str, opts: DataOptions) -> TaskData:
    """``webdataset:PATTERN`` (see the module docstring)."""
    try:
        import webdataset  # noqa: F401
    except ImportError as exc:
        raise DatasetError("webdataset: sources need the webdataset package: pip install "
                           "'continual-mem[webdataset]'") from exc
    name = spec
    target = spec.split(":", 1)[1]
    root = Path(target).expanduser()
    if root.is_dir():
        train = sorted(str(p) for p in root.glob("train-*.tar"))
        test = sorted(str(p) for p in root.glob("test-*.tar")) or sorted(str(p) for p in root.glob("val-*.tar"))
        if not train or not test:
            raise DatasetError(f"{name}: {root} needs train-*.tar and test-*.tar (or val-*.tar) shards")
        tr, te = index_shards(train, name=name), index_shards(test, name=name)
        classes = _class_names(root, np.concatenate([tr.labels, te.labels]), name)
        return TaskData(name, classes, ReaderDataset(tr), ReaderDataset(te), "inception")
    shards = _expand(str(root), name=name)
    full = index_shards(shards, name=name)
    classes = _class_names(Path(shards[0]).parent, full.labels, name)
    import torch

    train_idx, test_idx = stratified_split(torch.from_numpy(full.labels), holdout=0.2, seed=0)
    from .decode import SubsetReader

    return TaskData(name, classes, ReaderDataset(SubsetReader(full, train_idx.numpy())),
                    ReaderDataset(SubsetReader(full, test_idx.numpy())), "inception")
