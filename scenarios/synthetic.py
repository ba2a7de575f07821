"""Generated JPEG image folders with the statistics of real photo datasets (for tests and input benchmarks).

Each image is a smooth random colour field (a small random image upsampled bicubically) plus sensor-like noise,
tinted by its class, saved as a quality-90 JPEG: at 500x375 that is about 60 KB, the size of a SUN397 or Places
photo, and it costs libjpeg about as much to decode.
"""
from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def photo(seed: int, *, label: int, size: tuple[int, int] = (500, 375), quality: int = 90) -> bytes:
    """One synthetic photo of ``size`` (width, height) as JPEG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC), dtype=np.int16)
    tint = np.array([(label * 53) % 96, (label * 97) % 96, (label * 29) % 96], dtype=np.int16) - 48
    img = img + tint + rng.integers(-12, 13, img.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write(job: tuple[str, int, int, tuple[int, int], int]) -> int:
    path, seed, label, size, quality = job
    data = photo(seed, label=label, size=size, quality=quality)
    Path(path).write_bytes(data)
    return len(data)


def make_image_folder(
    root: str | Path,
    *,
    classes: int = 10,
    per_class: int = 20,
    size: tuple[int, int] = (500, 375),
    portrait_every: int = 0,
    quality: int = 90,
    seed: int = 0,
    workers: int = 1,
) -> int:
    """Write ``classes`` x ``per_class`` JPEGs as ``root/class_XX/img_XXXXX.jpg``; return the bytes written.

    Args:
        portrait_every: Every this-many-th image is portrait (height and width swapped); 0: none.
        workers: Processes writing files.
    """
    root = Path(root)
    jobs = []
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            k = c * per_class + i
            s = size[::-1] if portrait_every and k % portrait_every == 0 else size
            jobs.append((str(folder / f"img_{i:05d}.jpg"), seed * 1_000_003 + k, c, s, quality))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return sum(pool.map(_write, jobs, chunksize=64))
    return sum(map(_write, jobs))
