"""Dataset loaders on tiny fake on-disk copies in the real layouts, plus the offline real datasets."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scenarios import datasets
from scenarios.datasets import DatasetError, ImageSet, load, read_idx


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if gz else open)(path, "wb").write(data)


def fake_idx_dataset(folder: Path, *, n_train=30, n_test=10, gz=True) -> None:
    rng = np.random.default_rng(0)
    suffix = "-ubyte.gz" if gz else "-ubyte"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3{suffix}", rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1{suffix}", np.arange(n) % 10, gz=gz)


def write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_fashion_mnist_from_debian_layout(tmp_path, monkeypatch):
    fake_idx_dataset(tmp_path / "debian")
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    data = load("fashion-mnist", root=tmp_path / "none")
    assert data.num_classes == 10 and data.class_names[0] == "T-shirt/top"
    assert isinstance(data.train, ImageSet) and data.train.images.shape == (30, 1, 28, 28)
    assert data.test.labels.tolist() == list(range(10))
    assert data.augment == "none"


def test_fashion_mnist_missing_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist`, or pass --download"):
        load("fashion-mnist", root=tmp_path)


def test_idx_reader_rejects_damaged_files(tmp_path):
    write_idx(tmp_path / "ok", np.zeros((2, 3, 3)), gz=False)
    assert read_idx(tmp_path / "ok").shape == (2, 3, 3)
    data = (tmp_path / "ok").read_bytes()
    (tmp_path / "short").write_bytes(data[:-4])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(DatasetError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "magic")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_real_offline_digit_datasets():
    mnist = load("mnist-5k")
    assert len(mnist.train) + len(mnist.test) == 5000 and len(mnist.test) == 1000
    assert mnist.train.images.shape[1:] == (1, 28, 28) and mnist.train.images.max() > 200
    assert torch.bincount(mnist.test.labels).min() >= 80  # stratified
    digits = load("digits")
    assert len(digits.train) + len(digits.test) == 1797
    assert digits.train.images.shape[1:] == (1, 8, 8) and digits.train.images.max() == 255


@pytest.mark.skipif(not (datasets.DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    data = load("fashion-mnist")
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10


def test_imagefolder_train_test_layout(tmp_path):
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(3):
                write_png(tmp_path / split / cls / f"{i}.png", seed=c * 10 + i)
    data = load(f"imagefolder:{tmp_path}")
    assert data.class_names == ("cat", "dog") and len(data.train) == 6 and len(data.test) == 6
    img, label = data.train[4]
    assert img.size == (12, 12) and label == 1


def test_imagefolder_flat_layout_splits_and_reports_corrupt_images(tmp_path):
    for c, cls in enumerate(("a", "b", "c")):
        for i in range(5):
            write_png(tmp_path / cls / f"{i}.png", seed=c * 10 + i)
    (tmp_path / "b" / "9.png").write_bytes(b"not a png")
    data = load(f"imagefolder:{tmp_path}")
    assert len(data.train) + len(data.test) == 16
    errors = []
    for part in (data.train, data.test):
        for i in range(len(part)):
            try:
                part[i]
            except DatasetError as exc:
                errors.append(str(exc))
    assert len(errors) == 1
    assert "cannot read image" in errors[0] and "9.png" in errors[0] and "remove or replace" in errors[0]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        load(f"imagefolder:{tmp_path / 'empty'}")


def test_torchvision_mnist_layout(tmp_path):
    fake_idx_dataset(tmp_path / "MNIST" / "raw", gz=False)
    data = load("mnist", root=tmp_path)
    assert data.num_classes == 10 and len(data.train) == 30 and len(data.test) == 10


def test_torchvision_sun397_layout_gets_a_fixed_test_split(tmp_path):
    root = tmp_path / "SUN397"
    root.mkdir()
    (root / "ClassName.txt").write_text("/a/abbey\n/b/bakery\n")
    for cls in ("a/abbey", "b/bakery"):
        for i in range(5):
            write_png(root / cls / f"sun_{i}.jpg", seed=i)
    data = load("sun397", root=tmp_path)
    assert data.class_names == ("abbey", "bakery")
    assert len(data.train) == 8 and len(data.test) == 2
    again = load("sun397", root=tmp_path)
    assert again.test.idx == data.test.idx


def test_missing_torchvision_dataset_says_download(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10: not found .*rerun with --download"):
        load("cifar10", root=tmp_path)


def test_unknown_dataset_lists_the_catalog():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet-99'.*sun397"):
        load("imagenet-99")
    assert {"cifar10", "sun397", "fashion-mnist", "mnist-5k", "digits", "imagefolder:PATH"} <= set(datasets.catalog())


def test_packed_copy_round_trips_and_bad_files_fail_clearly(tmp_path):
    import numpy as np
    import torch

    from scenarios.datasets import DatasetError, ImageSet, TaskData, load, save_packed

    g = torch.Generator().manual_seed(0)
    part = lambda n: ImageSet(torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g),  # noqa: E731
                              torch.randint(0, 3, (n,), generator=g))
    data = TaskData("toy", ("a", "b", "c"), part(12), part(5), "flip")
    path = save_packed(data, tmp_path / "toy.npz")
    back = load(f"packed:{path}")
    assert (back.name, back.class_names, back.augment) == ("toy", ("a", "b", "c"), "flip")
    assert torch.equal(back.train.images, data.train.images) and torch.equal(back.test.labels, data.test.labels)
    with pytest.raises(DatasetError, match="no file"):
        load(f"packed:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "partial.npz", train_images=np.zeros((1, 1, 2, 2), np.uint8))
    with pytest.raises(DatasetError, match="lacks"):
        load(f"packed:{tmp_path / 'partial.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable packed dataset"):
        load(f"packed:{tmp_path / 'junk.npz'}")
