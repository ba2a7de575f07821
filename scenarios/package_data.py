"""Image data shipped inside PyPI packages, for the domain-shifted suite: data far from DINOv2's pretraining
that an offline machine can install by name.

``animal-mnist``: 10,000 28×28 grey animal silhouettes in 10 classes (the PyPI package ``animal-mnist``, MIT; its
files are two gzipped numpy pickles); exact duplicates are dropped, then 20% is a fixed stratified test split.
Install it without its declared dependencies (TensorFlow is only used by its own MNIST helpers):
``pip install --no-deps animal-mnist==0.4``. The pickles are read with an unpickler that builds
numpy arrays and nothing else.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch

from .splits import stratified_split
from .types import DataOptions, DatasetError, ImageSet, TaskData

# the package's description lists the classes in this order; its files carry labels 0..9 only
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds numpy arrays and refuses every other global (a pickle can otherwise run code)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are read")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):  # numpy 2 moved it (the old path warns)
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def read_array_pickle(path: Path) -> np.ndarray:
    """One numpy array from a gzipped pickle, through :class:`_ArrayUnpickler`."""
    try:
        with gzip.open(path, "rb") as f:
            value = _ArrayUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}; reinstall the package that ships it") from exc
    if not isinstance(value, np.ndarray):
        raise DatasetError(f"{path} holds a {type(value).__name__}, not a numpy array; reinstall the package")
    return value


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"{package.replace('_', '-')} is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def load_animal_mnist(opts: DataOptions, *, folder: Path | None = None) -> TaskData:
    """``animal-mnist``: the package's 10,000 silhouettes; 20% (stratified, fixed, seed 0) is the test split."""
    if folder is None:
        folder = _package_dir("animal_mnist", "pip install --no-deps animal-mnist==0.4") / "data" / "Animal_MNIST"
    images = read_array_pickle(folder / "animal_data_version_3.gz")
    labels = read_array_pickle(folder / "animal_label_version_3.gz")
    if images.dtype != np.uint8 or images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DatasetError(f"animal-mnist: unexpected arrays in {folder} (images {images.dtype} {images.shape}, "
                           f"labels {labels.shape}); reinstall animal-mnist==0.4")
    if labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise DatasetError(f"animal-mnist: labels outside 0..{len(ANIMAL_CLASSES) - 1} in {folder}")
    # about 2% of the images are exact copies of another; keep the first of each, so none is in train and test
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)
    full = ImageSet(torch.from_numpy(images[keep].copy()).unsqueeze(1), torch.from_numpy(labels[keep].astype(np.int64)))
    train_idx, test_idx = stratified_split(full.labels, holdout=0.2, seed=0)
    return TaskData("animal-mnist", ANIMAL_CLASSES, full.subset(train_idx), full.subset(test_idx), "none")
