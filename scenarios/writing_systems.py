"""``scripts``: name the writing system of a letter never seen in training, rendered from installed fonts.

Classes are writing systems (Unicode scripts: Latin, Devanagari, Ethiopic, Old Italic, ...); a sample is one
letter drawn by one font that maps it, with the same drawing as :mod:`scenarios.glyphs` (64×64 grey, one size, one
baseline). A letter's script is the part of its Unicode name before ``LETTER``/``SYLLABLE``/``CHARACTER``/
``IDEOGRAPH`` (``TAI THAM LETTER HIGH KA`` → Tai Tham), letter case and presentation forms (``SMALL``,
``SUBSCRIPT``, ...) aside. Train and test letters are disjoint (a letter's hash puts 25% of them in test), so
the task is to tell scripts apart by the shapes their letters share, as a page-level script detector must.

A script needs letters in at least :data:`MIN_FONTS` font files (else the task is telling one font from others);
each keeps at most :data:`FONTS_PER_SCRIPT` fonts and :data:`LETTERS_PER_SCRIPT` letters, both picked by hash,
so Latin's hundreds of fonts do not outweigh the rest. Written to ``ROOT/scripts/`` in the layout of the glyph
sets, whole or not at all, with every font file's sha256 in ``meta.json``.
"""
from __future__ import annotations

import hashlib
import unicodedata
from collections import defaultdict
from pathlib import Path

from .glyphs import (EM, FONT_DIRS, FONT_PACKAGES, INSTALL, SIDE, TEST_SHARE, GlyphDataError, draw, font_files,
                     font_record, split_of, write_set)

MIN_FONTS = 2
FONTS_PER_SCRIPT = 8
LETTERS_PER_SCRIPT = 48
MIN_TRAIN, MIN_TEST = 20, 5  # drawings a script needs in each part
NAME_ENDS = (" LETTER ", " SYLLABLE ", " CHARACTER ", " IDEOGRAPH")
FORMS = {"CAPITAL", "SMALL", "SUBSCRIPT", "EPIGRAPHIC", "MODIFIER", "MTAVRULI"}  # forms of a script, not scripts
NOT_SCRIPTS = {"FULLWIDTH", "HALFWIDTH", "CIRCLED", "PARENTHESIZED", "SQUARED", "NEGATIVE", "MATHEMATICAL",
               "SUPERSCRIPT", "COMBINING", "DOUBLE-STRUCK"}


def script_of(ch: str) -> str | None:
    """The script of letter ``ch`` from its Unicode name (``"LATIN"``, ``"TAI THAM"``), or None for anything
    that is not a letter of a script (digits, marks, symbols, presentation forms such as circled letters)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "") + " "
    end = min((name.index(e) for e in NAME_ENDS if e in name), default=-1)
    if end < 0:
        return None
    words = name[:end].split()
    if not words or words[0] in NOT_SCRIPTS:
        return None
    words = [w for w in words if w not in FORMS]
    return " ".join(words) or None


def class_name(script: str) -> str:
    """A folder name: ``TAI THAM`` → ``tai-tham``."""
    return script.lower().replace(" ", "-")


def _rank(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()


def _letters_by_script(path: Path) -> dict[str, set[str]]:
    """The letters ``path`` maps, by script (empty if fontTools cannot read it)."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(str(path), lazy=True, fontNumber=0) as font:
            cmap = font.getBestCmap() or {}
    except Exception:  # noqa: BLE001 - an unreadable font is left out, whatever fontTools raised
        return {}
    out: dict[str, set[str]] = defaultdict(set)
    for code in cmap:
        script = script_of(chr(code))
        if script:
            out[script].add(chr(code))
    return out


def choose(fonts_by_script: dict[str, dict[Path, set[str]]]) -> dict[str, dict[Path, list[str]]]:
    """Per script with letters in :data:`MIN_FONTS` fonts or more: up to :data:`FONTS_PER_SCRIPT` fonts and, of
    the letters those fonts map, up to :data:`LETTERS_PER_SCRIPT`, both by hash; each font with the chosen letters
    it maps. A pure function of the fonts' letters, so a build is reproducible for the same font files."""
    chosen = {}
    for script, fonts in sorted(fonts_by_script.items()):
        if len(fonts) < MIN_FONTS:
            continue
        paths = sorted(fonts, key=lambda p: _rank(f"{script}:{p.name}"))[:FONTS_PER_SCRIPT]
        letters = sorted(set().union(*(fonts[p] for p in paths)), key=lambda c: _rank(f"{script}:{c}"))
        keep = set(letters[:LETTERS_PER_SCRIPT])
        chosen[script] = {p: sorted(fonts[p] & keep) for p in paths}
    return chosen


def build(root: Path = Path("data"), *, dirs=FONT_DIRS, min_scripts: int = 20) -> Path:
    """Build ``root/scripts`` from the fonts under ``dirs`` (skipped if already complete); returns the folder."""
    from PIL import ImageFont

    out = root / "scripts"
    if (out / "meta.json").is_file():
        return out
    fonts_by_script: dict[str, dict[Path, set[str]]] = defaultdict(dict)
    for path in font_files(dirs):
        for script, letters in _letters_by_script(path).items():
            fonts_by_script[script][path] = letters
    seen: set[str] = set()
    by_script: dict[str, list] = {}
    for script, fonts in choose(fonts_by_script).items():
        samples = []
        for path, letters in fonts.items():
            font = ImageFont.truetype(str(path), EM)
            for ch in letters:
                pixels = draw(font, ch)
                digest = hashlib.sha1(pixels.tobytes()).hexdigest() if pixels is not None else None
                if digest is None or digest in seen:
                    continue
                seen.add(digest)
                samples.append((split_of(ch), class_name(script), pixels, digest, path, ch))
        parts = [part for part, *_ in samples]
        if parts.count("train") >= MIN_TRAIN and parts.count("test") >= MIN_TEST:
            by_script[script] = samples
    if len(by_script) < min_scripts:
        raise GlyphDataError(f"scripts: {len(by_script)} scripts with letters in {MIN_FONTS}+ fonts under "
                             f"{', '.join(map(str, dirs))} (need {min_scripts}); install Debian's font packages "
                             f"first: {INSTALL}")
    kept = [s for script in sorted(by_script) for s in by_script[script]]
    records: dict[Path, dict] = {}
    letters: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"train": set(), "test": set()})
    for part, cls, _, _, path, ch in kept:
        if path not in records:  # font_record hashes the whole file: once per font, not once per drawing
            records[path] = font_record(path, path.stem, None, 0)
        records[path]["drawn"] += 1
        letters[cls][part].add(ch)
    meta = {"name": "scripts", "classes": [class_name(s) for s in sorted(by_script)], "side": SIDE, "em": EM,
            "test_share": TEST_SHARE, "fonts_per_script": FONTS_PER_SCRIPT, "letters_per_script": LETTERS_PER_SCRIPT,
            "fonts": sorted(records.values(), key=lambda r: r["file"]), "packages": list(FONT_PACKAGES),
            "letters": {c: {part: "".join(sorted(v)) for part, v in parts.items()}
                        for c, parts in sorted(letters.items())}}
    return write_set(root, "scripts", [s[:4] for s in kept], meta)
