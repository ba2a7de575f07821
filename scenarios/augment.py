"""Input geometry and the augmentation maths shared by every input path: the preprocessing policy from the
backbone's timm data config, the per-step random streams, crop boxes, one-kernel crop-and-resize and flips."""
from __future__ import annotations

import math
from dataclasses import dataclass

import timm.data
import torch

from .types import Augment


@dataclass(frozen=True)
class Preprocess:
    """Input geometry and normalisation (from the backbone's timm data config) plus the augmentation policy."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    augment: Augment

    @classmethod
    def for_backbone(cls, backbone, augment: Augment) -> "Preprocess":
        cfg = timm.data.resolve_data_config({}, model=backbone)
        size = int(backbone.patch_embed.img_size[0])  # the model as built, not its pretrained config's default
        return cls(size, tuple(cfg["mean"]), tuple(cfg["std"]), float(cfg["crop_pct"]), augment)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of batch ``step`` of a run seeded ``seed``: a batch depends on ``(seed, step)`` alone."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def step_indices(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The images of global batch ``step`` of an endless shuffled stream over ``n`` images: a new permutation
    every epoch, drawn from ``(seed, epoch)`` alone (CPU tensor)."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, -1 - epoch, torch.device("cpu")))
    return perm[pos * batch_size:(pos + 1) * batch_size]


def inception_boxes(h: torch.Tensor, w: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Inception-style crop boxes (scale 0.08-1, ratio 3/4-4/3) inside images of heights ``h`` and widths ``w``
    (float, one per image, on the device): one ``(x0, y0, x1, y1)`` row per image, drawn from ``g``."""
    B, dev = len(h), h.device
    area = h * w * torch.empty(B, device=dev).uniform_(0.08, 1.0, generator=g)
    log_r = torch.empty(B, device=dev).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
    ratio = torch.exp(log_r)
    bw = torch.minimum(torch.sqrt(area * ratio).clamp(min=1), w)
    bh = torch.minimum(torch.sqrt(area / ratio).clamp(min=1), h)
    x0 = torch.rand(B, device=dev, generator=g) * (w - bw)
    y0 = torch.rand(B, device=dev, generator=g) * (h - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)


def center_boxes(h: torch.Tensor, w: torch.Tensor, size: int, crop_pct: float) -> torch.Tensor:
    """timm's evaluation crop as boxes: resize the short side to ``floor(size / crop_pct)`` and centre-crop
    ``size``, i.e. a centred square of ``size / floor(size / crop_pct)`` of the short side."""
    side = torch.minimum(h, w) * (size / math.floor(size / crop_pct))
    x0, y0 = (w - side) / 2, (h - side) / 2
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1)


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Resample each image's box to ``size`` x ``size`` with ``roi_align`` (one kernel for the whole batch)."""
    from torchvision.ops import roi_align

    rows = torch.arange(len(x), device=x.device, dtype=x.dtype).unsqueeze(1)
    return roi_align(x, torch.cat([rows, boxes.to(x.dtype)], dim=1), output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


def crop_batch(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, pre: Preprocess, *, train: bool,
               g: torch.Generator | None = None, n: int | None = None, lo: int = 0) -> torch.Tensor:
    """The one crop of every device input path (resident sets, prepared copies, decoded files, the server):
    images ``x`` (B, C, H, W; each image's top-left ``h`` x ``w``) to ``pre.img_size`` squares.

    Training with ``inception`` takes random resized crops, evaluation with it timm's centre crop, anything else
    the whole image; ``flip`` and ``inception`` training flip. ``x`` holds images ``lo:lo+B`` of a global batch
    of ``n``: the random draws cover all ``n``, so a row's crop does not depend on how the batch is split."""
    s, aug, b = pre.img_size, pre.augment, len(x)
    n = b if n is None else n
    if train and aug == "inception":
        full_h, full_w = torch.ones(n, device=x.device), torch.ones(n, device=x.device)  # other ranks': any size
        full_h[lo:lo + b], full_w[lo:lo + b] = h, w
        boxes = inception_boxes(full_h, full_w, g)[lo:lo + b]
    elif aug == "inception":
        boxes = center_boxes(h, w, s, pre.crop_pct)
    else:  # whole image, resized (digits, CIFAR-like)
        zero = torch.zeros_like(h)
        boxes = torch.stack([zero, zero, w, h], dim=1)
    x = crop_resize(x, boxes, s)
    return random_flip(x, g, n, lo, lo + b) if train and aug in ("inception", "flip") else x


def random_flip(x: torch.Tensor, g: torch.Generator | None, n: int, lo: int, hi: int) -> torch.Tensor:
    """Flip each image with probability 1/2; the coins are drawn for all ``n`` images of the global batch, of
    which ``x`` holds ``lo:hi``."""
    flip = (torch.rand(n, device=x.device, generator=g) < 0.5)[lo:hi]
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
