"""The scripts set: writing systems told apart by letters never seen in training. Built here from the fonts
matplotlib ships (DejaVu, STIX, Computer Modern), so the test needs no system font package."""
import json
from pathlib import Path

import pytest
import torch
from test_glyphs import MPL_FONTS

from scenarios import datasets, glyphs, writing_systems as ws


@pytest.mark.parametrize("ch, script", [
    ("a", "LATIN"), ("Ж", "CYRILLIC"), ("ω", "GREEK"), ("ᨠ", "TAI THAM"), ("ⴰ", "TIFINAGH"),
    ("ₐ", "LATIN"),  # a subscript form of a Latin letter
    ("Ა", "GEORGIAN"),  # Mtavruli: Georgian capitals
    ("가", "HANGUL"), ("ꀀ", "YI"), ("ሀ", "ETHIOPIC"), ("ก", "THAI"),  # SYLLABLE and CHARACTER names
    ("1", None), ("Ⓐ", None), ("𝐀", None), ("ｱ", None), ("́", None), ("ʰ", None), ("$", None),
])
def test_a_letter_s_script_comes_from_its_unicode_name(ch, script):
    assert ws.script_of(ch) == script


def test_choose_keeps_scripts_in_two_fonts_and_caps_fonts_and_letters():
    many = {Path(f"f{i}.ttf"): {chr(0x61 + j) for j in range(26)} for i in range(12)}
    fonts = {"LATIN": many, "OGHAM": {Path("one.ttf"): {"ᚁ", "ᚂ"}},
             "GREEK": {Path("g1.ttf"): {"α", "β"}, Path("g2.ttf"): {"β", "γ"}}}
    got = ws.choose(fonts)
    assert set(got) == {"LATIN", "GREEK"}  # one font only: telling a font apart, not a script
    assert len(got["LATIN"]) == ws.FONTS_PER_SCRIPT and all(len(v) == 26 for v in got["LATIN"].values())
    assert got["GREEK"] == {Path("g1.ttf"): ["α", "β"], Path("g2.ttf"): ["β", "γ"]}  # each font: the letters it maps
    assert ws.choose(fonts) == got  # by hash, not by chance
    wide = {"YI": {Path(f"y{i}.ttf"): {chr(0xA000 + j) for j in range(200)} for i in range(2)}}
    letters = ws.choose(wide)["YI"]
    assert all(len(v) == ws.LETTERS_PER_SCRIPT for v in letters.values())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """``scripts`` built from matplotlib's fonts: DejaVu and STIX draw 14 scripts."""
    return ws.build(tmp_path_factory.mktemp("scripts"), dirs=[MPL_FONTS], min_scripts=5)


def test_build_writes_scripts_with_unseen_test_letters(folder):
    root = folder.parent
    meta = json.loads((folder / "meta.json").read_text())
    assert {"latin", "greek", "cyrillic", "armenian", "hebrew"} <= set(meta["classes"])
    assert meta["classes"] == sorted(meta["classes"]) and set(meta["letters"]) == set(meta["classes"])
    for cls in meta["classes"]:
        train, test = (set(meta["letters"][cls][p]) for p in ("train", "test"))
        assert train and test and not train & test  # test letters never seen in training
        assert {ws.class_name(ws.script_of(c)) for c in train | test} == {cls}
        assert meta["counts"]["train"][cls] >= ws.MIN_TRAIN and meta["counts"]["test"][cls] >= ws.MIN_TEST
    assert all(len(f["sha256"]) == 64 and f["drawn"] > 0 for f in meta["fonts"])
    files = sorted(folder.glob("*/*/*.png"))
    assert len({f.stem for f in files}) == len(files)  # no drawing twice
    data = datasets.load("scripts", root=root)
    assert data.train.images.shape[1:] == (1, 64, 64) and data.train.images.dtype == torch.uint8
    assert list(data.class_names) == meta["classes"] and data.augment == "none"
    assert len(data.train) == sum(meta["counts"]["train"].values())
    assert ws.build(root, dirs=[]) == folder  # complete already: not rebuilt


def test_without_fonts_it_says_which_packages_to_install(tmp_path):
    with pytest.raises(glyphs.GlyphDataError, match="scripts: 0 scripts .* apt-get install fonts-urw-base35"):
        ws.build(tmp_path, dirs=[tmp_path / "none"])
    assert not (tmp_path / "scripts").exists() and not (tmp_path / ".scripts.partial").exists()
    with pytest.raises(datasets.DatasetError, match="build-dataset scripts"):
        datasets.load("scripts", root=tmp_path)
    assert "scripts" in datasets.catalog()


def test_font_sets_are_built_and_read_in_one_place(folder, tmp_path):
    from scenarios import font_sets

    root = folder.parent
    assert font_sets.build("scripts", root) == folder  # complete already: the builder returns it as is
    assert font_sets.load("scripts", root).class_names == datasets.load("scripts", root=root).class_names
    assert set(font_sets.NAMES) <= set(datasets.catalog())
    with pytest.raises(ValueError, match="unknown font set 'glyph'; choose one of glyphs, typefaces, scripts"):
        font_sets.build("glyph", tmp_path)
