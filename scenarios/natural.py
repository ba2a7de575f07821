"""Natural-image suite available offline: colour photo and illustration classification sets built from image
collections that ship *inside* registry packages (Debian's, npm's), so they can be had with no dataset host.

==============  ===============================================  ==============================================
name            source package                                   images, classes
==============  ===============================================  ==============================================
``tuxpaint``    Debian ``tuxpaint-stamps-default`` 2022.06.04-1  photo cut-outs and drawings, by stamp category
``openclipart`` Debian ``openclipart-png`` 0.18+dfsg-19          clip-art illustrations, by library category
``emoji-apple`` npm ``emoji-datasource-apple`` 16.0.0            Apple's emoji artwork, by Unicode emoji group
==============  ===============================================  ==============================================

:func:`build` fetches the package (``apt-get download`` / ``npm pack``, or a file given by hand), reads it with
no install (a ``.deb`` is an ``ar`` archive around a tarball), drops exact duplicates, paints transparency onto
white, pads each image to a square (these are objects on a blank background: padding loses nothing, cropping
would) and writes 224 px JPEGs (64 px for the emoji, their own size) as ``ROOT/NAME/{train,test}/CLASS/*.jpg`` with a fixed stratified 25% test part
and a ``meta.json`` (package, version, sha256, counts). The folder appears whole or not at all (built under a
temporary name, then renamed). :func:`load` decodes it into memory for device-resident training.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import subprocess
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

log = logging.getLogger(__name__)

SIDE = 224  # stored square side (px), the input size of the paper's models
TEST_SHARE = 0.25
JPEG_QUALITY = 80
MAX_PIXELS = 25_000_000  # a few clip-art files are posters of 100M+ pixels: left out rather than decoded


class NaturalDataError(ValueError):
    """A suite dataset cannot be built or loaded; the message names the file and the fix."""


@dataclass(frozen=True)
class Source:
    """One registry package and how its files become labelled images.

    Attributes:
        registry: ``debian`` or ``npm``.
        package: Package name in that registry.
        version: Exact version (the suite is reproducible only for it).
        label: Member path -> class name, or None to leave the file out.
        max_per_class: Cap per class (largest classes are sub-sampled, by content hash, so deterministically).
        min_per_class: Classes with fewer images are left out.
        side: Stored square side in px (never above the artwork's own size, e.g. 64 px emoji).
        description: One line for the catalog.
    """

    registry: str
    package: str
    version: str
    label: Callable[[PurePosixPath], str | None]
    max_per_class: int = 250
    min_per_class: int = 30
    side: int = SIDE
    description: str = ""

    @property
    def file_name(self) -> str:
        if self.registry == "npm":
            return f"{self.package}-{self.version}.tgz"
        return f"{self.package}_{self.version.replace(':', '%3a')}_all.deb"


def _tuxpaint_label(p: PurePosixPath) -> str | None:
    parts = p.parts
    if p.suffix != ".png" or "stamps" not in parts:
        return None
    rest = parts[parts.index("stamps") + 1:]
    return rest[0] if len(rest) > 1 else None


# clip-art categories that name objects; icon sets, shapes, signs and logos are left out (not natural images)
_CLIPART = ("animals", "food", "people", "transportation", "plants", "buildings", "tools", "office", "recreation",
            "geography", "education", "electronics")


def _openclipart_label(p: PurePosixPath) -> str | None:
    parts = p.parts
    if p.suffix != ".png" or "png" not in parts:
        return None
    rest = parts[parts.index("png") + 1:]
    return rest[0] if len(rest) > 1 and rest[0] in _CLIPART else None


def _emoji_label(p: PurePosixPath) -> str | None:
    # labels come from emoji.json (see _emoji_labels); here only the file filter
    return "?" if p.suffix == ".png" and p.parent.name == "64" and "apple" in p.parts else None


SOURCES: dict[str, Source] = {
    "tuxpaint": Source("debian", "tuxpaint-stamps-default", "2022.06.04-1", _tuxpaint_label,
                       description="Tux Paint stamps: photo cut-outs and drawings, by category"),
    "openclipart": Source("debian", "openclipart-png", "1:0.18+dfsg-19", _openclipart_label,
                          description="Open Clip Art Library: illustrations, by category"),
    "emoji-apple": Source("npm", "emoji-datasource-apple", "16.0.0", _emoji_label, max_per_class=400,
                          side=64, description="Apple emoji artwork (64 px), by Unicode emoji group"),
}


# ----------------------------------------------------------------------------- reading packages
def _deb_data(path: Path) -> tarfile.TarFile:
    """The ``data.tar.*`` member of a ``.deb`` (an ``ar`` archive), opened from memory."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise NaturalDataError(f"{path} is not a Debian package (no ar header); download it again")
    pos = 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = raw[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(body), mode="r:*")
        pos += 60 + size + (size & 1)
    raise NaturalDataError(f"{path} has no data.tar member; download it again")


def _members(path: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    tar = _deb_data(path) if path.suffix == ".deb" else tarfile.open(path, mode="r:*")
    with tar:
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                if f is not None:
                    yield PurePosixPath(m.name), f.read()


def _emoji_labels(path: Path) -> dict[str, str]:
    """Image file name -> Unicode emoji group, from the package's ``emoji.json`` (base emoji only: skin-tone
    variants would put near-copies in both splits). The ``Component`` group (skin swatches) is left out."""
    for name, data in _members(path):
        if name.name == "emoji.json":
            table = json.loads(data)
            return {e["image"]: e["category"] for e in table
                    if e.get("has_img_apple") and e["category"] != "Component"}
    raise NaturalDataError(f"{path} has no emoji.json; it is not emoji-datasource-apple, download it again")


def fetch(source: Source, cache: Path) -> Path:
    """The package file in ``cache``, downloaded with the registry's own client if missing."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / source.file_name
    if target.is_file():
        return target
    if source.registry == "debian":
        cmd = ["apt-get", "download", f"{source.package}={source.version}"]
        hint = "on a Debian/Ubuntu host"
    else:
        cmd = ["npm", "pack", f"{source.package}@{source.version}"]
        hint = "with Node.js installed"
    if shutil.which(cmd[0]) is None:
        raise NaturalDataError(f"{source.package}: {cmd[0]} not found; run `{' '.join(cmd)}` {hint} and pass the "
                               f"file with --package-file, or put it at {target}")
    log.info("fetching %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
    if done.returncode != 0 or not target.is_file():
        raise NaturalDataError(f"{source.package}: `{' '.join(cmd)}` failed ({done.stderr.strip()[-200:]}); "
                               f"download {source.file_name} by hand and pass it with --package-file")
    return target


# ----------------------------------------------------------------------------- images
def square_rgb(data: bytes, side: int = SIDE) -> np.ndarray | None:
    """Decode any PIL image, paint transparency onto white, pad to a centred white square, resize to ``side``
    (bicubic, antialiased). ``(side, side, 3)`` uint8, or None if the file is not a readable image or has more
    than :data:`MAX_PIXELS` pixels."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.size[0] * im.size[1] > MAX_PIXELS:
                return None
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    im = im.convert("RGBA")
    canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(canvas, im).convert("RGB")
    w, h = im.size
    n = max(w, h)
    square = Image.new("RGB", (n, n), (255, 255, 255))
    square.paste(im, ((n - w) // 2, (n - h) // 2))
    return np.asarray(square.resize((side, side), Image.Resampling.BICUBIC))


def split_name(digest: str, test_share: float = TEST_SHARE) -> str:
    """Train or test, from the image's content hash: fixed, and independent of which other files exist."""
    return "test" if int(digest[:8], 16) < test_share * 16 ** 8 else "train"


def build(name: str, root: Path = Path("data"), *, package_file: Path | None = None,
          cache: Path | None = None) -> Path:
    """Build suite dataset ``name`` under ``root/name`` (skipped if it is already complete); returns the folder."""
    from PIL import Image

    if name not in SOURCES:
        raise NaturalDataError(f"unknown suite dataset {name!r}; known: {', '.join(SOURCES)}")
    src = SOURCES[name]
    out = root / name
    if (out / "meta.json").is_file():
        return out
    path = package_file or fetch(src, cache or root / "packages")
    if not path.is_file():
        raise NaturalDataError(f"{name}: package file {path} does not exist")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    emoji = _emoji_labels(path) if name == "emoji-apple" else None
    by_class: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    seen: set[str] = set()
    skipped = Counter()
    for member, data in _members(path):
        label = src.label(member)
        if label is None:
            continue
        if emoji is not None:
            label = emoji.get(member.name)
            if label is None:
                continue
        pixels = square_rgb(data, src.side)
        if pixels is None:
            skipped["unreadable or too large"] += 1
            continue
        digest = hashlib.sha1(pixels.tobytes()).hexdigest()
        if digest in seen:  # the same picture twice (clip-art copies under two names) would leak into the test part
            skipped["duplicate"] += 1
            continue
        seen.add(digest)
        by_class[label][digest] = pixels
    classes = sorted(c for c, imgs in by_class.items() if len(imgs) >= src.min_per_class)
    if len(classes) < 2:
        raise NaturalDataError(f"{name}: {path} gave fewer than 2 classes with {src.min_per_class}+ images; "
                               "is it the right package version?")
    tmp = root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for c in classes:
        # the cap ranks by a second hash: the split's own hash would keep mostly test images
        keep = sorted(by_class[c], key=lambda d: hashlib.sha1(f"keep:{d}".encode()).hexdigest())[: src.max_per_class]
        for part in ("train", "test"):
            (tmp / part / c).mkdir(parents=True, exist_ok=True)
        for digest in keep:
            part = split_name(digest)
            Image.fromarray(by_class[c][digest]).save(tmp / part / c / f"{digest[:16]}.jpg", quality=JPEG_QUALITY)
            counts[part][c] = counts[part].get(c, 0) + 1
    meta = {"name": name, "registry": src.registry, "package": src.package, "version": src.version,
            "package_sha256": sha, "side": src.side, "test_share": TEST_SHARE, "classes": classes, "counts": counts,
            "left_out": dict(skipped), "left_out_classes": sorted(set(by_class) - set(classes)),
            "description": src.description}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("%s: %d train / %d test images, %d classes -> %s", name, sum(counts["train"].values()),
             sum(counts["test"].values()), len(classes), out)
    return out


def load(name: str, root: Path = Path("data")):
    """Suite dataset ``name`` decoded into memory (uint8 ``(N, 3, side, side)``), as a :class:`TaskData`."""
    from .types import DatasetError, TaskData

    folder = root / name
    if not (folder / "meta.json").is_file():
        raise DatasetError(f"{name}: not built under {root}; run `continual-mem build-dataset {name} "
                           f"--data-root {root}` (fetches Debian's/npm's package once)")
    meta = json.loads((folder / "meta.json").read_text())
    classes = tuple(meta["classes"])

    return TaskData(name, classes, read_class_folders(folder / "train", classes, name=name),
                    read_class_folders(folder / "test", classes, name=name), "inception")


def read_class_folders(folder: Path, classes: tuple[str, ...], *, name: str, pattern: str = "*.jpg",
                       grey: bool = False):
    """``folder/CLASS/<pattern>`` decoded into one uint8 :class:`ImageSet` (label = the class's index), files in
    name order; a built dataset with no images there is broken and says how to rebuild it."""
    from torchvision.io import ImageReadMode, decode_image

    from .types import DatasetError, ImageSet

    mode = ImageReadMode.GRAY if grey else ImageReadMode.RGB
    images, labels = [], []
    for y, c in enumerate(classes):
        for f in sorted((folder / c).glob(pattern)):
            images.append(decode_image(str(f), mode=mode))
            labels.append(y)
    if not images:
        raise DatasetError(f"{name}: no images in {folder}; delete {folder.parent} and build it again")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long))
