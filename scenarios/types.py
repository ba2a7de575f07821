"""The data types every scenario module shares (images in memory, a task's data, the options, dataset errors)
and small adapters over torch datasets. No loading here: :mod:`scenarios.datasets` dispatches, the readers and
loaders build these types."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

Augment = Literal["inception", "flip", "none"]
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
DIGIT_CLASSES = tuple(str(i) for i in range(10))


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message names the dataset, the path and what to do."""


@dataclass
class ImageSet:
    """Decoded images in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx])


@dataclass
class TaskData:
    """One dataset, ready for a task.

    Attributes:
        name: Catalog name.
        class_names: One name per class (defines ``num_classes``).
        train: Training part (the official train split).
        test: The official test/validation split (final accuracy is reported on it).
        augment: ``inception`` (random resized crop + flip, natural images), ``flip`` (flips only, CIFAR-like
            low resolution, as the paper), or ``none`` (digits: a flipped 2 is not a 2).
    """

    name: str
    class_names: tuple[str, ...]
    train: ImageSet | Dataset
    test: ImageSet | Dataset
    augment: Augment

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DataOptions:
    """Where datasets live and whether torchvision may download them."""

    root: Path = Path("data")
    download: bool = False


class ReaderDataset(Dataset):
    """A reader (:mod:`scenarios.decode`) as a dataset of ``(PIL image, label)``, for the PIL loader path."""

    def __init__(self, reader) -> None:
        self.reader = reader
        self.targets = torch.from_numpy(np.asarray(reader.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        import io

        from PIL import Image

        raw = self.reader.read(i)
        try:
            return Image.open(io.BytesIO(raw)).convert("RGB"), int(self.targets[i])
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise DatasetError(f"cannot read image {self.reader.name(i)} ({exc}); remove or replace it") from exc


class IndexSubset(Dataset):
    """Items ``idx`` of a dataset, with its ``targets`` (labels) picked alike."""

    def __init__(self, inner: Dataset, idx: torch.Tensor) -> None:
        self.inner, self.idx = inner, idx.tolist()
        self.targets = torch.as_tensor(inner.targets)[idx]

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):
        return self.inner[self.idx[i]]


def targets_of(ds) -> torch.Tensor:
    """A torchvision-style dataset's labels, whatever attribute holds them."""
    if hasattr(ds, "index") and hasattr(ds, "all_categories"):  # INaturalist: (category, file) pairs, no labels list
        return torch.tensor([cat for cat, _ in ds.index], dtype=torch.long)
    for attr in ("targets", "labels", "_labels", "y"):
        if hasattr(ds, attr):
            return torch.as_tensor(getattr(ds, attr)).long()
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def classes_of(ds, name: str) -> tuple[str, ...]:
    """A torchvision-style dataset's class names."""
    classes = getattr(ds, "classes", None)
    if classes is None and hasattr(ds, "all_categories"):  # INaturalist 2021: "00042_Kingdom_..._Genus_species"
        return tuple(" ".join(d.split("_")[-2:]) for d in ds.all_categories)
    if classes is None:  # SVHN has none
        return DIGIT_CLASSES if name == "svhn" else tuple(str(c) for c in sorted(set(targets_of(ds).tolist())))
    return tuple(str(c) for c in classes)
