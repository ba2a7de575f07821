"""``glyphs``: character classification across typefaces, rendered from the fonts that Debian's font packages
install (a domain-shifted dataset that needs no dataset host).

Classes are the 62 characters ``0-9 A-Z a-z``; a sample is one character drawn by one font file at a fixed size
on a fixed baseline (so case stays visible as size and position), white on black, 64×64 grey. Train and test fonts
are disjoint: a font's family name decides its part from a hash (25% test), so the task is to read characters in
typefaces never seen in training. Fonts that lack a character (by their ``cmap``) draw nothing for it; symbol
and non-Latin fonts are left out. Exact duplicate drawings (the same outlines under two names) are kept once.

:func:`build` writes ``ROOT/glyphs/{train,test}/CLASS/*.png`` and ``meta.json`` (every font file with its sha256,
so a build is reproducible for the same packages), whole or not at all. :func:`load` decodes it into memory.
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


def _font_info(path: Path) -> tuple[str, set[int]] | None:
    """The font's family name (name table id 1) and the characters of :data:`CHARACTERS` it draws as themselves,
    or None if fontTools cannot read it. A letter's glyph must carry the letter's own name (``a``, ``a.alt``), so
    symbol fonts that put Greek or dingbats at Latin code points (Standard Symbols PS's ``a`` is an alpha) draw
    nothing."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as font:
            family, cmap = font["name"].getDebugName(1), font.getBestCmap() or {}
    except Exception:  # noqa: BLE001 - an unreadable font is left out, whatever fontTools raised
        return None
    if family is None:
        return None
    return family, {ord(c) for c in CHARACTERS if ord(c) in cmap and (c.isdigit() or cmap[ord(c)].split(".")[0] == c)}


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


def split_of(family: str) -> str:
    digest = hashlib.sha1(family.encode()).hexdigest()
    return "test" if int(digest[:8], 16) < TEST_SHARE * 16 ** 8 else "train"


def build(root: Path = Path("data"), *, dirs=FONT_DIRS, min_fonts: int = 40) -> Path:
    """Build ``root/glyphs`` from the fonts under ``dirs`` (skipped if already complete); returns the folder."""
    from PIL import Image, ImageFont

    out = root / "glyphs"
    if (out / "meta.json").is_file():
        return out
    fonts, seen, counts = [], set(), {"train": {}, "test": {}}
    tmp = root / ".glyphs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for path in font_files(dirs):
        info = _font_info(path)
        if info is None or len(info[1]) < MIN_CHARACTERS:
            continue
        family, cmap = info
        part = split_of(family)
        font = ImageFont.truetype(str(path), EM)
        drawn = 0
        for ch in CHARACTERS:
            pixels = draw(font, ch) if ord(ch) in cmap else None
            digest = hashlib.sha1(pixels.tobytes()).hexdigest() if pixels is not None else None
            if digest is None or digest in seen:
                continue
            seen.add(digest)
            folder = tmp / part / class_name(ch)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{digest[:16]}.png")
            counts[part][class_name(ch)] = counts[part].get(class_name(ch), 0) + 1
            drawn += 1
        if drawn:
            fonts.append({"file": str(path), "family": family, "part": part, "drawn": drawn,
                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    families = {f["family"] for f in fonts}
    if len(fonts) < min_fonts or not counts["test"]:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GlyphDataError(f"glyphs: {len(fonts)} usable Latin fonts under {', '.join(map(str, dirs))} (need "
                             f"{min_fonts}); install Debian's font packages first: {INSTALL}")
    meta = {"name": "glyphs", "classes": [class_name(c) for c in CHARACTERS], "side": SIDE, "em": EM,
            "test_share": TEST_SHARE, "families": len(families), "fonts": fonts, "counts": counts,
            "packages": list(FONT_PACKAGES)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("glyphs: %d fonts (%d families), %d train / %d test images -> %s", len(fonts), len(families),
             sum(counts["train"].values()), sum(counts["test"].values()), out)
    return out


def load(root: Path = Path("data")):
    """The built glyph set decoded into memory (uint8 ``(N, 1, 64, 64)``), as a :class:`TaskData`."""
    from .natural import read_class_folders
    from .types import DatasetError, TaskData

    folder = root / "glyphs"
    if not (folder / "meta.json").is_file():
        raise DatasetError(f"glyphs: not built under {root}; run `continual-mem build-dataset glyphs --data-root "
                           f"{root}` (after `{INSTALL}`)")
    classes = tuple(json.loads((folder / "meta.json").read_text())["classes"])

    train, test = (read_class_folders(folder / part, classes, name="glyphs", pattern="*.png", grey=True)
                   for part in ("train", "test"))
    return TaskData("glyphs", classes, train, test, "none")
