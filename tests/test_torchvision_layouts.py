"""Every torchvision-backed catalog family loads from a tiny fake copy in its real on-disk layout (file names,
annotation formats, folder structure), offline. Where torchvision checks MD5 sums, the expected sums are set to
those of the fake files, so its integrity check still runs (and a damaged file still fails, with our message).

Images are coloured by class (class c has red value 40 * c + 20), so each test can check that labels and pixels
belong together after our loader: a mix-up between files and labels fails.
"""
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from PIL import Image

from scenarios.datasets import DatasetError, TORCHVISION, load


def red(c: int) -> int:
    return 40 * c + 20


def jpg(path: Path, c: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (red(c), 90, 160)).save(path, quality=100)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def check(data, *, name: str, classes: int, train: int, test: int, augment: str, class_names=None) -> None:
    """Sizes, class names and the augmentation policy; every item's pixels match its label."""
    assert data.name == name and data.num_classes == classes and data.augment == augment
    assert (len(data.train), len(data.test)) == (train, test)
    if class_names is not None:
        assert data.class_names == tuple(class_names)
    for part in (data.train, data.test):
        for i in range(len(part)):
            img, label = part[i]
            assert 0 <= int(label) < classes
            r = np.asarray(img.convert("RGB"))[..., 0].astype(int)
            assert abs(int(np.median(r)) - red(int(label))) <= 6, (name, i, int(label), int(np.median(r)))


def cifar_batch(path: Path, labels: list[int], key: str) -> None:
    data = np.stack([np.concatenate([np.full(1024, red(c)), np.full(1024, 90), np.full(1024, 160)]) for c in labels])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"data": data.astype(np.uint8), key: labels}, f)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar(tmp_path, monkeypatch, name):
    cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    base = tmp_path / cls.base_folder
    key, names_key = ("labels", "label_names") if name == "cifar10" else ("fine_labels", "fine_label_names")
    train_files = [f for f, _ in cls.train_list]
    for j, f in enumerate(train_files):
        cifar_batch(base / f, [0, 1, 2, j % 3], key)
    cifar_batch(base / cls.test_list[0][0], [2, 1], key)
    with open(base / cls.meta["filename"], "wb") as f:
        pickle.dump({names_key: ["apple", "bus", "cat"]}, f)
    monkeypatch.setattr(cls, "train_list", [[f, md5(base / f)] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[cls.test_list[0][0], md5(base / cls.test_list[0][0])]])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(base / cls.meta["filename"])})
    check(load(name, root=tmp_path), name=name, classes=3, train=4 * len(train_files), test=2, augment="flip",
          class_names=["apple", "bus", "cat"])
    with open(base / cls.test_list[0][0], "r+b") as f:  # a damaged file fails torchvision's MD5 check
        f.seek(40)
        f.write(b"\xff")
    with pytest.raises(DatasetError, match=rf"{name}: not found or incomplete .*--download"):
        load(name, root=tmp_path)


def test_svhn(tmp_path, monkeypatch):
    from scipy.io import savemat

    def mat(path: Path, labels: list[int]) -> None:
        x = np.zeros((32, 32, 3, len(labels)), np.uint8)
        for i, c in enumerate(labels):
            x[..., 0, i], x[..., 1, i], x[..., 2, i] = red(c), 90, 160
        savemat(path, {"X": x, "y": np.array([[10 if c == 0 else c] for c in labels])})  # SVHN stores 0 as 10

    mat(tmp_path / "train_32x32.mat", [0, 1, 2, 3, 0])
    mat(tmp_path / "test_32x32.mat", [3, 0])
    split = {k: [v[0], v[1], md5(tmp_path / v[1]) if (tmp_path / v[1]).exists() else v[2]]
             for k, v in tvd.SVHN.split_list.items()}
    monkeypatch.setattr(tvd.SVHN, "split_list", split)
    check(load("svhn", root=tmp_path), name="svhn", classes=10, train=5, test=2, augment="none")


def test_flowers102(tmp_path, monkeypatch):
    from scipy.io import savemat

    base = tmp_path / "flowers-102"
    labels = [1, 2, 3, 1, 2, 3, 1]  # 1-based, as in imagelabels.mat
    for i, c in enumerate(labels, 1):
        jpg(base / "jpg" / f"image_{i:05d}.jpg", c - 1)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    savemat(base / "setid.mat", {"trnid": np.array([1, 2, 3, 4]), "valid": np.array([5]), "tstid": np.array([6, 7])})
    files = {k: (f, md5(base / f)) if k != "image" else (f, m) for k, (f, m) in tvd.Flowers102._file_dict.items()}
    monkeypatch.setattr(tvd.Flowers102, "_file_dict", files)
    data = load("flowers102", root=tmp_path)
    check(data, name="flowers102", classes=102, train=4, test=2, augment="inception")
    assert data.class_names[:2] == ("pink primrose", "hard-leaved pocket orchid")


def test_oxford_pets(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rows = {"trainval": [("Abyssinian_1", 1, 1), ("american_bulldog_1", 2, 2), ("Abyssinian_2", 1, 1),
                         ("american_bulldog_2", 2, 2)],
            "test": [("Abyssinian_3", 1, 1), ("american_bulldog_3", 2, 2)]}
    for split, items in rows.items():
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("".join(f"{i} {c} {s} 1\n" for i, c, s in items))
        for image_id, c, _ in items:
            jpg(base / "images" / f"{image_id}.jpg", c - 1)
    check(load("oxford-pets", root=tmp_path), name="oxford-pets", classes=2, train=4, test=2, augment="inception",
          class_names=["Abyssinian", "American Bulldog"])


DTD_CLASSES = ["banded", "blotchy", "braided"]


def fake_dtd(root: Path) -> None:
    data_dir = root / "dtd" / "dtd"
    classes = DTD_CLASSES
    for c, cls in enumerate(classes):
        for i in range(3):
            jpg(data_dir / "images" / cls / f"{cls}_{i:04d}.jpg", c)
    (data_dir / "labels").mkdir()
    (data_dir / "labels" / "train1.txt").write_text("".join(f"{c}/{c}_{i:04d}.jpg\n" for c in classes for i in (0, 1)))
    (data_dir / "labels" / "test1.txt").write_text("".join(f"{c}/{c}_0002.jpg\n" for c in classes))


def test_dtd(tmp_path):
    fake_dtd(tmp_path)
    check(load("dtd", root=tmp_path), name="dtd", classes=3, train=6, test=3, augment="inception",
          class_names=DTD_CLASSES)


def test_eurosat_gets_a_fixed_stratified_test_split(tmp_path):
    classes = ["AnnualCrop", "Forest", "River"]
    for c, cls in enumerate(classes):
        for i in range(5):
            jpg(tmp_path / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg", c)
    data = load("eurosat", root=tmp_path)
    check(data, name="eurosat", classes=3, train=12, test=3, augment="inception", class_names=classes)
    assert sorted(int(data.test[i][1]) for i in range(3)) == [0, 1, 2]  # stratified
    assert load("eurosat", root=tmp_path).test.idx == data.test.idx  # fixed


def test_food101(tmp_path):
    base = tmp_path / "food-101"
    classes = ["apple_pie", "baby_back_ribs"]
    meta = {"train": {c: [f"{c}/{i}" for i in range(3)] for c in classes},
            "test": {c: [f"{c}/{10 + i}" for i in range(2)] for c in classes}}
    (base / "meta").mkdir(parents=True)
    for split, entries in meta.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(entries))
        for c, items in entries.items():
            for item in items:
                jpg(base / "images" / f"{item}.jpg", classes.index(c))
    check(load("food101", root=tmp_path), name="food101", classes=2, train=6, test=4, augment="inception",
          class_names=classes)


def test_places365_small(tmp_path, monkeypatch):
    cats = ["/a/airfield", "/b/bakery/shop"]
    (tmp_path / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(cats)))
    train = [(f"{c}/{i:08d}.jpg", k) for k, c in enumerate(cats) for i in range(3)]
    (tmp_path / "places365_train_standard.txt").write_text("".join(f"{f} {k}\n" for f, k in train))
    val = [(f"Places365_val_{i:08d}.jpg", i % 2) for i in range(1, 5)]
    (tmp_path / "places365_val.txt").write_text("".join(f"{f} {k}\n" for f, k in val))
    for f, k in train:
        jpg(tmp_path / "data_256_standard" / f.lstrip("/"), k)
    for f, k in val:
        jpg(tmp_path / "val_256" / f, k)
    cls = tvd.Places365
    monkeypatch.setattr(cls, "_CATEGORIES_META", (cls._CATEGORIES_META[0], md5(tmp_path / cls._CATEGORIES_META[0])))
    monkeypatch.setattr(cls, "_FILE_LIST_META", {k: (f, md5(tmp_path / f) if (tmp_path / f).exists() else m)
                                                 for k, (f, m) in cls._FILE_LIST_META.items()})
    check(load("places365", root=tmp_path), name="places365", classes=2, train=6, test=4, augment="inception",
          class_names=cats)


def test_inaturalist_2021_mini(tmp_path):
    dirs = ["00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris",
            "00001_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina"]
    for c, d in enumerate(dirs):
        for i in range(3):
            jpg(tmp_path / "2021_train_mini" / d / f"train_{i}.jpg", c)
        jpg(tmp_path / "2021_valid" / d / "valid_0.jpg", c)
    data = load("inaturalist", root=tmp_path)
    check(data, name="inaturalist", classes=2, train=6, test=2, augment="inception",
          class_names=["Lumbricus terrestris", "Rosa canina"])


@pytest.mark.parametrize("name", sorted(set(TORCHVISION) - {"fashion-mnist"}))  # its own test: Debian's files first
def test_every_torchvision_family_missing_says_what_to_do(tmp_path, name):
    with pytest.raises(DatasetError, match=rf"{name}: not found or incomplete under .*rerun with --download"):
        load(name, root=tmp_path / "empty")


def test_pil_datasets_reach_the_model_through_timm_transforms(tmp_path):
    """A file-backed family (DTD layout) through LoaderImages: normalised 3-channel batches of the model's size,
    the same batch for the same (seed, step), ranks splitting each global batch, evaluation covering the set once."""
    import torch

    from continual_mem.distributed import Shard
    from scenarios.pipeline import LoaderImages, Preprocess

    fake_dtd(tmp_path)
    data = load("dtd", root=tmp_path)
    pre = Preprocess(img_size=16, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875, augment=data.augment)
    src = LoaderImages(data.train, pre, workers=0)
    torch.manual_seed(0)
    x, y = src.train_batch(1, 4, seed=3)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and -1.01 <= float(x.min()) <= float(x.max()) <= 1.01
    y_again = LoaderImages(data.train, pre, workers=0).train_batch(1, 4, seed=3)[1]
    assert torch.equal(y, y_again)
    parts = [LoaderImages(data.train, pre, workers=0).train_batch(1, 4, seed=3, shard=Shard(r, 2))[1] for r in range(2)]
    assert torch.equal(torch.cat(parts), y)
    ev = LoaderImages(data.test, pre, workers=0)
    labels = torch.cat([b for _, b in ev.eval_batches(2)])
    assert sorted(labels.tolist()) == [0, 1, 2]
    shards = [torch.cat([b for _, b in ev.eval_batches(2, shard=Shard(r, 2))]) for r in range(2)]
    assert torch.equal(torch.cat(shards), labels)
