"""The datasets rendered from installed fonts, in one place: their names, how each is built, how each is read."""
from __future__ import annotations

from pathlib import Path

NAMES = ("glyphs", "typefaces", "scripts")


def build(name: str, root: Path) -> Path:
    """Build font set ``name`` under ``root`` (skipped if already complete); returns its folder."""
    from . import glyphs, writing_systems

    builders = {"glyphs": glyphs.build, "typefaces": glyphs.build_typefaces, "scripts": writing_systems.build}
    if name not in builders:
        raise ValueError(f"unknown font set {name!r}; choose one of {', '.join(NAMES)}")
    return builders[name](root)


def load(name: str, root: Path):
    """A built font set decoded into memory, as a ``TaskData``."""
    from . import glyphs

    return glyphs.load(root, name)
