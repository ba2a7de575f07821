"""Datasets shipped inside PyPI packages: read through an unpickler that builds numpy arrays only."""
import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from scenarios import datasets
from scenarios.package_data import ANIMAL_CLASSES, load_animal_mnist, read_array_pickle
from scenarios.types import DataOptions, DatasetError


def _write(folder, images, labels):
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("animal_data_version_3.gz", images), ("animal_label_version_3.gz", labels)):
        with gzip.open(folder / name, "wb") as f:
            pickle.dump(value, f)


def test_animal_mnist_layout_is_read_deduplicated_and_split(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 20).astype(np.int64)
    images[1] = images[0]  # an exact copy (same class): kept once
    _write(tmp_path, images, labels)
    data = load_animal_mnist(DataOptions(), folder=tmp_path)
    assert data.class_names == ANIMAL_CLASSES and len(data.train) + len(data.test) == 199
    assert data.test.labels.bincount().tolist() == [4] * 10  # 20% of every class
    assert data.train.images.shape[1:] == (1, 28, 28) and data.train.images.dtype == torch.uint8
    seen = {bytes(x.numpy().tobytes()) for x in data.train.images}
    assert not any(bytes(x.numpy().tobytes()) in seen for x in data.test.images)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(DatasetError, match="refusing .*system: only numpy arrays are read"):
        read_array_pickle(path)


def test_wrong_arrays_and_a_missing_package_say_what_to_do(tmp_path, monkeypatch):
    _write(tmp_path, np.zeros((4, 28, 28), np.float32), np.zeros(4, np.int64))
    with pytest.raises(DatasetError, match="unexpected arrays"):
        load_animal_mnist(DataOptions(), folder=tmp_path)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install --no-deps animal-mnist==0.4"):
        datasets.load("animal-mnist")
