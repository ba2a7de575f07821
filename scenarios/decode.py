"""Image files to uint8 arrays: what the fast input paths (:mod:`scenarios.prepared`, :mod:`scenarios.streaming`)
decode, whatever holds the bytes.

A *reader* is a picklable, random-access list of encoded images with labels (files of an image folder or of a
torchvision dataset, members of tar shards, or, as a fallback, any dataset of PIL images). Decoding goes through
``torchvision.io.decode_image`` (libjpeg-turbo, libpng, libwebp), falling back to PIL for other formats; the
image is then shrunk so its short side is at most ``short_side`` (antialiased, on uint8) and its aspect ratio is
capped, which keeps what travels to the GPU small without changing what a 224 px crop sees.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch


log = logging.getLogger(__name__)

# What every input path stores and ships: images shrunk to this short side (a 224 px crop stays sharp), aspect capped.
SHORT_SIDE = 256
MAX_ASPECT = 2.0


class BadImage(ValueError):
    """An encoded image that neither torchvision nor PIL can decode (corrupt, truncated, not an image)."""


class Reader(Protocol):
    """Random access to encoded images: ``read(i)`` gives bytes (or a PIL image), ``labels[i]`` the class."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes | object: ...

    def name(self, i: int) -> str: ...

    def fingerprint(self) -> dict: ...


def host_cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def digest(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass
class FilesReader:
    """Image files with labels (an image folder, or a torchvision dataset's own file list)."""

    paths: list[str]
    labels: np.ndarray
    _fingerprint: dict | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        try:
            return Path(self.paths[i]).read_bytes()
        except OSError as exc:
            raise BadImage(f"cannot read {self.paths[i]} ({exc})") from exc

    def name(self, i: int) -> str:
        return self.paths[i]

    def fingerprint(self) -> dict:
        """Paths, sizes, mtimes and labels, hashed; one pass over the files per reader (finding, building and
        describing a prepared copy all ask for it)."""
        def line(p: str, y: int) -> str:
            try:
                st = os.stat(p)
                return f"{p}\t{st.st_size}\t{st.st_mtime_ns}\t{y}"
            except OSError:
                return f"{p}\tmissing\t{y}"

        if self._fingerprint is None:
            self._fingerprint = {"kind": "files", "count": len(self),
                                 "files": digest(map(line, self.paths, self.labels.tolist()))}
        return self._fingerprint


@dataclass
class DatasetReader:
    """Fallback for datasets that expose no files: ``dataset[i]`` is ``(PIL image, label)``."""

    dataset: object
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int):
        return self.dataset[i][0]

    def name(self, i: int) -> str:
        return f"{type(self.dataset).__name__}[{i}]"

    def fingerprint(self) -> dict:
        root = getattr(self.dataset, "root", "")
        return {"kind": "dataset", "class": type(self.dataset).__name__, "root": str(root), "count": len(self),
                "labels": digest(map(str, self.labels.tolist()))}


@dataclass
class SubsetReader:
    """Items ``index`` of another reader (a split of a dataset without an official one)."""

    inner: Reader
    index: np.ndarray

    def __post_init__(self) -> None:
        self.labels = self.inner.labels[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int):
        return self.inner.read(int(self.index[i]))

    def name(self, i: int) -> str:
        return self.inner.name(int(self.index[i]))

    def fingerprint(self) -> dict:
        return {"kind": "subset", "inner": self.inner.fingerprint(),
                "index": digest(map(str, self.index.tolist()))}


def is_reader(obj) -> bool:
    """True for a reader of encoded images (as opposed to an ImageSet, a prepared copy or a PIL dataset)."""
    return hasattr(obj, "read") and hasattr(obj, "fingerprint")


def reader_for(ds) -> Reader:
    """The reader behind a dataset: its files where the dataset lists them (torchvision's ImageFolder, Food101,
    SUN397, DTD, Flowers102, Oxford-IIIT Pet, Places365, iNaturalist, ...), else the dataset itself."""
    from .types import IndexSubset, targets_of

    if hasattr(ds, "reader"):
        return ds.reader
    if isinstance(ds, IndexSubset):
        return SubsetReader(reader_for(ds.inner), np.asarray(ds.idx, dtype=np.int64))
    inner = getattr(ds, "inner", None)  # _CheckedImageFolder
    if inner is not None and hasattr(inner, "samples"):
        ds = inner
    pairs = None
    if hasattr(ds, "samples"):  # ImageFolder / DatasetFolder (EuroSAT too)
        pairs = ds.samples
    elif hasattr(ds, "imgs"):  # Places365
        pairs = ds.imgs
    elif hasattr(ds, "_image_files") and hasattr(ds, "_labels"):  # Food101, SUN397, DTD, Flowers102
        pairs = list(zip(ds._image_files, ds._labels))
    elif hasattr(ds, "_images") and hasattr(ds, "_labels"):  # OxfordIIITPet
        pairs = list(zip(ds._images, ds._labels))
    elif hasattr(ds, "index") and hasattr(ds, "all_categories"):  # INaturalist
        pairs = [(os.path.join(ds.root, ds.all_categories[c], f), c) for c, f in ds.index]
    if pairs is not None:
        return FilesReader([str(p) for p, _ in pairs], np.array([int(y) for _, y in pairs], dtype=np.int64))
    return DatasetReader(ds, targets_of(ds).numpy().astype(np.int64))


def _decode(raw) -> torch.Tensor:
    """``(3, H, W)`` uint8 RGB from bytes (torchvision first, PIL for what it does not read) or a PIL image."""
    from PIL import Image

    if not isinstance(raw, (bytes, bytearray)):  # a PIL image from a DatasetReader
        return _from_pil(raw)
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as first:
        try:
            with Image.open(io.BytesIO(raw)) as im:
                return _from_pil(im)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise BadImage(_reason(str(first), str(exc))) from exc
    # a 16-bit PNG decodes to uint16: keep its 8 most significant bits (PIL's convert("RGB") clips at 255 instead)
    return img if img.dtype == torch.uint8 else (img.to(torch.int32) >> 8).to(torch.uint8)


def _from_pil(im) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def torchvision_reason(message: str) -> str:
    """The reason in a torchvision decoding error (``decode_jpeg, file.cpp:171, Image is ... truncated``)."""
    return message.splitlines()[0].split(", ", 2)[-1]


def _reason(torchvision_error: str, pil_error: str) -> str:
    """A short reason when neither torchvision nor PIL could decode a file."""
    if "Unsupported image file" in torchvision_error:
        if "cannot identify image file" in pil_error:
            return "not an image file that torchvision or PIL can read"
        return f"not a JPEG, PNG, WebP or GIF file, and PIL cannot read it: {pil_error}"
    return torchvision_reason(torchvision_error)


def shrink(img: torch.Tensor, *, short_side: int | None, max_aspect: float) -> torch.Tensor:
    """Centre-crop the long side to at most ``max_aspect`` times the short one, then scale down (never up) so the
    short side is at most ``short_side`` (antialiased bilinear on uint8). ``img``: ``(3, H, W)``, or a batch
    ``(B, 3, H, W)`` of images of one size."""
    from torchvision.transforms.v2 import functional as TF

    h, w = img.shape[-2:]
    short, long_ = min(h, w), max(h, w)
    cap = int(short * max_aspect)
    if long_ > cap:
        img = TF.center_crop(img, [h, cap] if w > h else [cap, w])
        h, w = img.shape[-2:]
    if short_side is not None and short > short_side:
        scale = short_side / short
        img = TF.resize(img, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return img


def shrink_by_size(images: list[torch.Tensor | BadImage], *, short_side: int,
                   max_aspect: float) -> list[torch.Tensor | BadImage]:
    """:func:`shrink` for each image (on any device), one call per distinct size (uploads from one camera or
    pipeline share a size; a call per image is a handful of kernel launches per image); an empty image becomes a
    :class:`BadImage`, and a :class:`BadImage` stays one."""
    out = list(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        if not isinstance(img, BadImage):
            by_size.setdefault(tuple(img.shape), []).append(i)
    for size, members in by_size.items():
        if size[1] == 0 or size[2] == 0:
            for i in members:
                out[i] = BadImage("empty image")
            continue
        batch = torch.stack([images[i] for i in members])
        for i, img in zip(members, shrink(batch, short_side=short_side, max_aspect=max_aspect)):
            out[i] = img
    return out


def decode_shrunk(raw, *, short_side: int | None, max_aspect: float) -> np.ndarray:
    """Encoded bytes (or a PIL image) as an ``(H, W, 3)`` uint8 array shrunk by :func:`shrink`; :class:`BadImage`
    with the reason if it cannot be decoded."""
    img = _decode(raw)
    if img.shape[1] == 0 or img.shape[2] == 0:
        raise BadImage("empty image")
    return shrink(img, short_side=short_side, max_aspect=max_aspect).permute(1, 2, 0).contiguous().numpy()


def decode_item(reader: Reader, i: int, *, short_side: int | None, max_aspect: float) -> np.ndarray:
    """Item ``i`` as an ``(H, W, 3)`` uint8 array; :class:`BadImage` naming the item if it cannot be decoded."""
    try:
        return decode_shrunk(reader.read(i), short_side=short_side, max_aspect=max_aspect)
    except BadImage as exc:
        raise BadImage(f"cannot decode image {reader.name(i)} ({exc})") from None


def bad_image_error(dataset: str, message: str) -> str:
    """The one-line error for a bad image under ``--on-bad-image fail``."""
    return f"{dataset}: {message}; remove or replace the file, or pass --on-bad-image skip to leave it out"
