"""From a dataset to normalised batches on the device.

Small decoded datasets (:class:`ImageSet`) live on the device as uint8 and are augmented there, batch by batch
(random resized crops with ``torchvision.ops.roi_align``, flips, resize, normalise), so the data pipeline never
starves the GPU. PIL datasets go through timm's own transforms and a DataLoader. Batch ``s`` of a run depends only
on ``(seed, s)``, so a resumed run sees exactly the batches the interrupted one would have.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import timm.data
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from continual_mem.distributed import SINGLE, Shard

from .datasets import Augment, ImageSet
from .decode import host_cores, is_reader


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


def _generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def step_indices(n: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The images of global batch ``step`` of an endless shuffled stream over ``n`` images: a new permutation
    every epoch, drawn from ``(seed, epoch)`` alone (CPU tensor)."""
    per_epoch = max(1, n // batch_size)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=_generator(seed, -1 - epoch, torch.device("cpu")))
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


def random_flip(x: torch.Tensor, g: torch.Generator | None, n: int, lo: int, hi: int) -> torch.Tensor:
    """Flip each image with probability 1/2; the coins are drawn for all ``n`` images of the global batch, of
    which ``x`` holds ``lo:hi``."""
    flip = (torch.rand(n, device=x.device, generator=g) < 0.5)[lo:hi]
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


class DeviceImages:
    """An :class:`ImageSet` resident on ``device``; batches are augmented and normalised there."""

    def __init__(self, data: ImageSet, pre: Preprocess, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.pre = pre
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(pre.mean, device=self.device).view(shape)
        self.std = torch.tensor(pre.std, device=self.device).view(shape)

    def __len__(self) -> int:
        return len(self.labels)

    def _to_float(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.images[idx].float().div_(255.0)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # grayscale -> 3 channels

    def _crop_boxes(self, B: int, g: torch.Generator) -> torch.Tensor:
        _, _, H, W = self.images.shape
        full = torch.ones(B, device=self.device)
        return inception_boxes(full * H, full * W, g)

    def _resize(self, x: torch.Tensor, *, center_crop: bool) -> torch.Tensor:
        s = self.pre.img_size
        if not center_crop:
            return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        scale = int(math.floor(s / self.pre.crop_pct))  # timm eval: resize to s / crop_pct, centre crop s
        x = F.interpolate(x, size=(scale, scale), mode="bilinear", align_corners=False, antialias=True)
        off = (scale - s) // 2
        return x[:, :, off:off + s, off:off + s]

    def batch(self, idx: torch.Tensor, *, train: bool, g: torch.Generator | None = None,
              part: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` as a normalised batch. With ``part=(lo, hi)`` the random augmentation is drawn for all
        of ``idx`` (so it does not depend on how a batch is split across ranks) and only ``idx[lo:hi]`` is
        decoded."""
        lo, hi = part if part is not None else (0, len(idx))
        x = self._to_float(idx[lo:hi])
        if train and self.pre.augment == "inception":
            x = crop_resize(x, self._crop_boxes(len(idx), g)[lo:hi], self.pre.img_size)
        else:
            x = self._resize(x, center_crop=not train and self.pre.augment == "inception")
        if train and self.pre.augment in ("inception", "flip"):
            x = random_flip(x, g, len(idx), lo, hi)
        return (x - self.mean) / self.std, self.labels[idx[lo:hi]]

    def train_batch(self, step: int, batch_size: int, seed: int, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` of an endless shuffled stream (a new permutation every epoch); ``batch_size`` is the
        global batch, of which ``shard`` gets its contiguous part."""
        idx = step_indices(len(self), step, batch_size, seed).to(self.device)
        return self.batch(idx, train=True, g=_generator(seed, step, self.device), part=shard.bounds(len(idx)))

    def eval_batches(self, batch_size: int, shard: Shard = SINGLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches of ``shard``'s contiguous part of the set (every image is in exactly one part)."""
        lo, hi = shard.bounds(len(self))
        for start in range(lo, hi, batch_size):
            idx = torch.arange(start, min(start + batch_size, hi), device=self.device)
            yield self.batch(idx, train=False)


class _Transformed(Dataset):
    def __init__(self, inner: Dataset, transform) -> None:
        self.inner, self.transform = inner, transform

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        img, label = self.inner[i]
        return self.transform(img.convert("RGB")), int(label)


class LoaderImages:
    """A PIL dataset through timm's transforms (inception-style for training, resize + centre crop for eval)."""

    def __init__(self, data: Dataset, pre: Preprocess, device: str | torch.device = "cpu", *, workers: int = 4) -> None:
        from torchvision import transforms as T

        self.data, self.pre, self.device, self.workers = data, pre, torch.device(device), workers
        common = dict(input_size=(3, pre.img_size, pre.img_size), mean=pre.mean, std=pre.std, crop_pct=pre.crop_pct)
        if pre.augment == "inception":
            self.train_tf = timm.data.create_transform(**common, is_training=True, hflip=0.5, color_jitter=None,
                                                       auto_augment=None, re_prob=0.0)
        else:
            flip = [T.RandomHorizontalFlip()] if pre.augment == "flip" else []
            self.train_tf = T.Compose([T.Resize((pre.img_size, pre.img_size)), *flip, T.ToTensor(),
                                       T.Normalize(pre.mean, pre.std)])
        self.eval_tf = timm.data.create_transform(**common, is_training=False)
        self._epoch: int | None = None
        self._it: Iterator | None = None
        self._batch_size = 0
        self._pos = 0

    def __len__(self) -> int:
        return len(self.data)

    def _loader(self, train: bool, batch_size: int, seed: int = 0, epoch: int = 0, shard: Shard = SINGLE) -> DataLoader:
        tf = self.train_tf if train else self.eval_tf
        common = dict(num_workers=self.workers, pin_memory=self.device.type == "cuda", persistent_workers=False)
        if not train:
            lo, hi = shard.bounds(len(self.data))
            return DataLoader(_Transformed(Subset(self.data, range(lo, hi)), tf), batch_size=batch_size, **common)
        g = torch.Generator().manual_seed(seed * 1_000_003 - epoch)
        # workers' augmentation seeds follow (seed, epoch, rank); the global order is the same on every rank
        return DataLoader(_Transformed(self.data, tf), batch_sampler=_GlobalBatches(len(self.data), batch_size, g, shard),
                          generator=torch.Generator().manual_seed(g.initial_seed() + shard.rank), **common)

    def train_batch(self, step: int, batch_size: int, seed: int, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` (``shard``'s part of the global batch): the epoch's order and its workers' augmentation
        seeds come from ``(seed, epoch)``."""
        per_epoch = max(1, len(self) // batch_size)
        epoch, pos = divmod(step, per_epoch)
        if (self._epoch, self._batch_size, self._pos) != (epoch, batch_size, pos):
            self._it = iter(self._loader(True, batch_size, seed, epoch, shard))
            self._epoch, self._batch_size = epoch, batch_size
            for _ in range(pos):  # resuming mid-epoch: skip what was already seen
                next(self._it)
        x, y = next(self._it)
        self._pos = pos + 1
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def eval_batches(self, batch_size: int, shard: Shard = SINGLE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self._loader(False, batch_size, shard=shard):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _GlobalBatches(Sampler[list[int]]):
    """One epoch of full global batches in a seeded random order; each rank takes its contiguous part of each."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, shard: Shard) -> None:
        self.n, self.batch_size, self.generator, self.shard = n, batch_size, generator, shard

    def __len__(self) -> int:
        return max(1, self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        size = min(self.batch_size, self.n)
        for b in range(len(self)):
            batch = perm[b * size:(b + 1) * size]
            lo, hi = self.shard.bounds(len(batch))
            yield batch[lo:hi]


def batches(data, pre: Preprocess, device: str | torch.device = "cpu", *, on_bad: str = "skip",
            name: str = "dataset", workers: int | None = None):
    """The batch source for ``data``: on the device for an :class:`ImageSet`, streamed for a prepared copy or a
    reader of image files (:mod:`scenarios.streaming`), a PIL DataLoader for any other dataset."""
    from .prepared import PreparedSet
    from .streaming import DecodedImages, PreparedImages

    if isinstance(data, ImageSet):
        return DeviceImages(data, pre, device)
    if isinstance(data, PreparedSet):
        return PreparedImages(data, pre, device)
    if is_reader(data):
        return DecodedImages(data, pre, device, on_bad=on_bad, name=name, workers=workers)
    return LoaderImages(data, pre, device, workers=workers or max(1, host_cores() - 1))
