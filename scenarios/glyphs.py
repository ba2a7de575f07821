"""Datasets rendered from the fonts that Debian's font packages install (domain-shifted data that needs no
dataset host): ``glyphs`` reads characters across typefaces, ``typefaces`` names the typeface of a character.

``glyphs``:
Classes are the 62 characters ``0-9 A-Z a-z``; a sample is one character drawn by one font file at a fixed size
on a fixed baseline (so case stays visible as size and position), white on black, 64×64 grey. Train and test fonts
are disjoint: a font's family name decides its part from a hash (25% test), so the task is to read characters in
typefaces never seen in training. Fonts that lack a character (by their ``cmap``) draw nothing for it; symbol
and non-Latin fonts are left out. Exact duplicate drawings (the same outlines under two names) are kept once.

:func:`build` writes ``ROOT/glyphs/{train,test}/CLASS/*.png`` and ``meta.json`` (every font file with its sha256,
so a build is reproducible for the same packages), whole or not at all. :func:`load` decodes it into memory.

``typefaces`` (:func:`build_typefaces`): the same drawings, the other way round. Classes are the faces (a font file:
family and style, e.g. "Lato Light Italic"), a sample is one character; train and test characters are disjoint (a
character's hash puts 25% of them in test), so the task is to name a typeface from characters never seen in it.
Faces derived from another installed face's outlines (TeX Gyre from URW, GNU FreeFont from URW) are left out: a
class must be a design of its own. Written to ``ROOT/typefaces/`` in the same layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import string
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CHARACTERS = string.digits + string.ascii_uppercase + string.ascii_lowercase
SIDE = 64
EM = 40  # font size in px
BASELINE = 48  # y of the baseline
TEST_SHARE = 0.25
MIN_CHARACTERS = 60  # a font drawing fewer of the 62 is not a Latin text font: left out
FONT_DIRS = (Path("/usr/share/fonts"),)
FONT_PACKAGES = ("fonts-urw-base35", "fonts-liberation", "fonts-dejavu-core", "fonts-dejavu-extra", "fonts-noto-core",
                 "fonts-freefont-ttf", "fonts-crosextra-carlito", "fonts-crosextra-caladea", "fonts-linuxlibertine",
                 "fonts-cantarell", "fonts-open-sans", "fonts-roboto", "fonts-lato", "fonts-ebgaramond",
                 "fonts-texgyre")
INSTALL = f"apt-get install {' '.join(FONT_PACKAGES)}"


class GlyphDataError(ValueError):
    """The glyph set cannot be built or loaded; the message says how to fix it."""


def class_name(ch: str) -> str:
    """A folder name that stays distinct on case-insensitive file systems."""
    return f"digit-{ch}" if ch.isdigit() else f"upper-{ch}" if ch.isupper() else f"lower-{ch}"


def font_files(dirs=FONT_DIRS) -> list[Path]:
    return sorted(p for d in dirs if d.is_dir() for p in d.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))


CLONE_FAMILIES = ("TeX Gyre", "Free")  # outlines copied from URW's base 35: not designs of their own


def font_info(path: Path) -> tuple[str, str, set[int]] | None:
    """The font's family name (name table id 1), its full name (id 4, e.g. "Lato Light Italic") and the characters
    of :data:`CHARACTERS` it draws as themselves, or None if fontTools cannot read it. A letter's glyph must carry
    the letter's own name (``a``, ``a.alt``), so symbol fonts that put Greek or dingbats at Latin code points
    (Standard Symbols PS's ``a`` is an alpha) draw nothing."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as font:
            names = font["name"]
            family, full, cmap = names.getDebugName(1), names.getDebugName(4), font.getBestCmap() or {}
    except Exception:  # noqa: BLE001 - an unreadable font is left out, whatever fontTools raised
        return None
    if family is None:
        return None
    drawn = {ord(c) for c in CHARACTERS if ord(c) in cmap and (c.isdigit() or cmap[ord(c)].split(".")[0] == c)}
    return family, full or family, drawn


def draw(font, ch: str) -> np.ndarray | None:
    """``ch`` in ``font`` (PIL's, at size :data:`EM`): ``(SIDE, SIDE)`` uint8, horizontally centred on the fixed
    baseline, or None if it draws nothing or does not fit."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(ch, anchor="ls")
    if right <= left or bottom <= top or right - left > SIDE or bottom - top > SIDE:
        return None
    image = Image.new("L", (SIDE, SIDE), 0)
    ImageDraw.Draw(image).text(((SIDE - (right - left)) / 2 - left, BASELINE), ch, fill=255, font=font, anchor="ls")
    pixels = np.asarray(image)
    return pixels if pixels.any() else None


def split_of(key: str) -> str:
    """``test`` for a fixed :data:`TEST_SHARE` of keys (font families for glyphs, characters for typefaces)."""
    digest = hashlib.sha1(key.encode()).hexdigest()
    return "test" if int(digest[:8], 16) < TEST_SHARE * 16 ** 8 else "train"


def face_name(full: str) -> str:
    """A folder name for a face: its full name with anything but letters and digits as ``-``."""
    return "-".join("".join(c if c.isalnum() else " " for c in full).split())


def _drawings(dirs):
    """Every usable Latin font under ``dirs`` (file order) with its drawings: ``(path, family, full name,
    [(character, pixels), ...])``, exact duplicate drawings (across all fonts) kept once."""
    from PIL import ImageFont

    seen: set[str] = set()
    for path in font_files(dirs):
        info = font_info(path)
        if info is None or len(info[2]) < MIN_CHARACTERS:
            continue
        family, full, cmap = info
        font = ImageFont.truetype(str(path), EM)
        drawn = []
        for ch in CHARACTERS:
            pixels = draw(font, ch) if ord(ch) in cmap else None
            digest = hashlib.sha1(pixels.tobytes()).hexdigest() if pixels is not None else None
            if digest is None or digest in seen:
                continue
            seen.add(digest)
            drawn.append((ch, pixels, digest))
        if drawn:
            yield path, family, full, drawn


def write_set(root: Path, name: str, samples, meta: dict) -> Path:
    """Write ``samples`` (part, class, pixels, digest) as ``root/name/{train,test}/CLASS/*.png`` plus ``meta.json``,
    whole or not at all; returns the folder."""
    from PIL import Image

    out, tmp = root / name, root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for part, cls, pixels, digest in samples:
        folder = tmp / part / cls
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{digest[:16]}.png")
        counts[part][cls] = counts[part].get(cls, 0) + 1
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "meta.json").write_text(json.dumps({**meta, "counts": counts}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("%s: %d train / %d test images -> %s", name, sum(counts["train"].values()),
             sum(counts["test"].values()), out)
    return out


def font_record(path: Path, family: str, part: str | None, drawn: int) -> dict:
    return {"file": str(path), "family": family, **({"part": part} if part else {}), "drawn": drawn,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def build(root: Path = Path("data"), *, dirs=FONT_DIRS, min_fonts: int = 40) -> Path:
    """Build ``root/glyphs`` from the fonts under ``dirs`` (skipped if already complete); returns the folder."""
    out = root / "glyphs"
    if (out / "meta.json").is_file():
        return out
    fonts, samples = [], []
    for path, family, _, drawn in _drawings(dirs):
        part = split_of(family)
        fonts.append(font_record(path, family, part, len(drawn)))
        samples += [(part, class_name(ch), pixels, digest) for ch, pixels, digest in drawn]
    families = {f["family"] for f in fonts}
    if len(fonts) < min_fonts or not any(part == "test" for part, *_ in samples):
        raise GlyphDataError(f"glyphs: {len(fonts)} usable Latin fonts under {', '.join(map(str, dirs))} (need "
                             f"{min_fonts}); install Debian's font packages first: {INSTALL}")
    meta = {"name": "glyphs", "classes": [class_name(c) for c in CHARACTERS], "side": SIDE, "em": EM,
            "test_share": TEST_SHARE, "families": len(families), "fonts": fonts, "packages": list(FONT_PACKAGES)}
    return write_set(root, "glyphs", samples, meta)


def build_typefaces(root: Path = Path("data"), *, dirs=FONT_DIRS, min_faces: int = 40) -> Path:
    """Build ``root/typefaces`` from the fonts under ``dirs`` (skipped if already complete); returns the folder.
    A face drawing fewer than 5 test characters, or a second file with the same full name, is left out."""
    out = root / "typefaces"
    if (out / "meta.json").is_file():
        return out
    fonts, samples, faces = [], [], set()
    for path, family, full, drawn in _drawings(dirs):
        cls = face_name(full)
        if family.startswith(CLONE_FAMILIES) or cls in faces:
            continue
        if sum(split_of(ch) == "test" for ch, _, _ in drawn) < 5:
            continue
        faces.add(cls)
        fonts.append({**font_record(path, family, None, len(drawn)), "class": cls})
        samples += [(split_of(ch), cls, pixels, digest) for ch, pixels, digest in drawn]
    if len(fonts) < min_faces:
        raise GlyphDataError(f"typefaces: {len(fonts)} usable Latin faces under {', '.join(map(str, dirs))} (need "
                             f"{min_faces}); install Debian's font packages first: {INSTALL}")
    classes = sorted(f["class"] for f in fonts)
    meta = {"name": "typefaces", "classes": classes, "side": SIDE, "em": EM, "test_share": TEST_SHARE,
            "test_characters": "".join(c for c in CHARACTERS if split_of(c) == "test"), "fonts": fonts,
            "packages": list(FONT_PACKAGES)}
    return write_set(root, "typefaces", samples, meta)


def load(root: Path = Path("data"), name: str = "glyphs"):
    """A built set (``glyphs`` or ``typefaces``) decoded into memory (uint8 ``(N, 1, 64, 64)``), as a
    :class:`TaskData`."""
    from .natural import read_class_folders
    from .types import DatasetError, TaskData

    folder = root / name
    if not (folder / "meta.json").is_file():
        raise DatasetError(f"{name}: not built under {root}; run `continual-mem build-dataset {name} --data-root "
                           f"{root}` (after `{INSTALL}`)")
    classes = tuple(json.loads((folder / "meta.json").read_text())["classes"])

    train, test = (read_class_folders(folder / part, classes, name=name, pattern="*.png", grey=True)
                   for part in ("train", "test"))
    return TaskData(name, classes, train, test, "none")
