"""The glyph set: characters across typefaces, train and test fonts disjoint. Built here from the fonts matplotlib
ships (DejaVu, STIX, Computer Modern), so the test needs no system font package."""
import json
from pathlib import Path

import matplotlib
import pytest
import torch

from scenarios import datasets, glyphs

MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs")
    return root, glyphs.build(root, dirs=[MPL_FONTS], min_fonts=4)


def test_build_writes_disjoint_font_parts_and_keeps_case(built):
    root, folder = built
    meta = json.loads((folder / "meta.json").read_text())
    assert len(meta["classes"]) == 62 and meta["classes"][10] == "upper-A" and meta["classes"][36] == "lower-a"
    parts = {}
    for f in meta["fonts"]:
        parts.setdefault(f["family"], set()).add(f["part"])
        assert len(f["sha256"]) == 64
    assert all(len(p) == 1 for p in parts.values())  # a family is in one part only
    assert {p for ps in parts.values() for p in ps} == {"train", "test"}
    names = {Path(f["file"]).name for f in meta["fonts"]}
    assert "cmex10.ttf" not in names and "STIXSizOneSymReg.ttf" not in names  # symbol fonts lack the letters
    data = datasets.load("glyphs", root=root)
    assert data.train.images.shape[1:] == (1, 64, 64) and data.train.images.dtype == torch.uint8
    assert len(data.class_names) == 62 and data.augment == "none"
    upper, lower = data.class_names.index("upper-O"), data.class_names.index("lower-o")
    big = data.train.images[data.train.labels == upper].float().mean()
    small = data.train.images[data.train.labels == lower].float().mean()
    assert big > 1.2 * small  # drawn at one size on one baseline: an O is bigger than an o
    assert glyphs.build(root, dirs=[]) == folder  # complete already: not rebuilt


def test_no_duplicate_drawings(built):
    _, folder = built
    files = sorted(folder.glob("*/*/*.png"))
    assert len({f.stem for f in files}) == len(files)


def test_without_fonts_it_says_which_packages_to_install(tmp_path):
    with pytest.raises(glyphs.GlyphDataError, match="apt-get install fonts-urw-base35"):
        glyphs.build(tmp_path, dirs=[tmp_path / "none"])
    assert not (tmp_path / "glyphs").exists() and not (tmp_path / ".glyphs.partial").exists()
    with pytest.raises(datasets.DatasetError, match="build-dataset glyphs"):
        datasets.load("glyphs", root=tmp_path)


def test_typefaces_classes_are_faces_and_test_characters_are_unseen_in_training(tmp_path):
    folder = glyphs.build_typefaces(tmp_path, dirs=[MPL_FONTS], min_faces=4)
    meta = json.loads((folder / "meta.json").read_text())
    classes = meta["classes"]
    assert classes == sorted(f["class"] for f in meta["fonts"]) and len(set(classes)) == len(classes) >= 4
    assert "DejaVu-Sans-Bold" in classes and all(glyphs.face_name(c) == c for c in classes)  # safe folder names
    unseen = set(meta["test_characters"])
    assert unseen and unseen == {c for c in glyphs.CHARACTERS if glyphs.split_of(c) == "test"}
    assert all(sum(meta["counts"][p].values()) for p in ("train", "test"))
    names = {Path(f["file"]).name for f in meta["fonts"]}
    assert "cmex10.ttf" not in names  # a symbol font is no face of Latin text
    data = datasets.load("typefaces", root=tmp_path)
    assert data.class_names == tuple(classes) and data.train.images.shape[1:] == (1, 64, 64)
    assert len(data.train) == sum(meta["counts"]["train"].values()) and data.augment == "none"
    # a face's samples are split by character: at most the unseen ones in test, at most the others in train
    for face in classes:
        assert 0 < meta["counts"]["test"].get(face, 0) <= len(unseen)
        assert meta["counts"]["train"].get(face, 0) <= len(glyphs.CHARACTERS) - len(unseen)
    with pytest.raises(glyphs.GlyphDataError, match="typefaces: 0 usable Latin faces"):
        glyphs.build_typefaces(tmp_path / "none", dirs=[tmp_path / "none"])
    with pytest.raises(datasets.DatasetError, match="build-dataset typefaces"):
        datasets.load("typefaces", root=tmp_path / "none")
