"""From a dataset to normalised batches on the device.

Small decoded datasets (:class:`ImageSet`) live on the device as uint8 and are augmented there, batch by batch
(random resized crops with ``torchvision.ops.roi_align``, flips, resize, normalise), so the data pipeline never
starves the GPU. PIL datasets go through timm's own transforms and a DataLoader. Batch ``s`` of a run depends only
on ``(seed, s)``, so a resumed run sees exactly the batches the interrupted one would have.
"""
from __future__ import annotations

from collections.abc import Iterator

import timm.data
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from continual_mem.distributed import SINGLE, Shard

from .augment import Preprocess, crop_batch, step_generator, step_indices  # noqa: F401
from .decode import host_cores, is_reader
from .eval_cache import EvalCache
from .types import ImageSet


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

    def batch(self, idx: torch.Tensor, *, train: bool, g: torch.Generator | None = None,
              part: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` as a normalised batch. With ``part=(lo, hi)`` the random augmentation is drawn for all
        of ``idx`` (so it does not depend on how a batch is split across ranks) and only ``idx[lo:hi]`` is
        decoded."""
        lo, hi = part if part is not None else (0, len(idx))
        x = self._to_float(idx[lo:hi])
        _, _, H, W = self.images.shape
        side = torch.ones(len(x), device=self.device)
        x = crop_batch(x, side * H, side * W, self.pre, train=train, g=g, n=len(idx), lo=lo)
        return (x - self.mean) / self.std, self.labels[idx[lo:hi]]

    def train_batch(self, step: int, batch_size: int, seed: int, shard: Shard = SINGLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` of an endless shuffled stream (a new permutation every epoch); ``batch_size`` is the
        global batch, of which ``shard`` gets its contiguous part."""
        idx = step_indices(len(self), step, batch_size, seed).to(self.device)
        return self.batch(idx, train=True, g=step_generator(seed, step, self.device), part=shard.bounds(len(idx)))

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
    """A PIL dataset through timm's transforms (inception-style for training, resize + centre crop for eval);
    ``eval_cache``: bytes of held-out batches kept on the device (:class:`~scenarios.eval_cache.EvalCache`)."""

    def __init__(self, data: Dataset, pre: Preprocess, device: str | torch.device = "cpu", *, workers: int = 4,
                 eval_cache: int | None = None) -> None:
        from torchvision import transforms as T

        self.data, self.pre, self.device, self.workers = data, pre, torch.device(device), workers
        self.eval_cache = EvalCache(self.device, pre.img_size, eval_cache)
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
        lo, hi = shard.bounds(len(self.data))
        return self.eval_cache.batches((batch_size, shard), hi - lo, lambda: self._stream_eval(batch_size, shard))

    def _stream_eval(self, batch_size: int, shard: Shard) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
            name: str = "dataset", workers: int | None = None, decoder: str = "auto"):
    """The batch source for ``data``: on the device for an :class:`ImageSet`, streamed for a prepared copy or a
    reader of image files (:mod:`scenarios.streaming`), a PIL DataLoader for any other dataset. ``decoder``: where
    JPEGs (of a compact copy, or image files) are decoded (:func:`~scenarios.gpu_jpeg.choose_decoder`)."""
    from .compact import prepared_images
    from .gpu_decoded import GpuDecodedImages
    from .gpu_jpeg import choose_decoder
    from .prepared import PreparedSet
    from .streaming import DecodedImages

    if isinstance(data, ImageSet):
        return DeviceImages(data, pre, device)
    if isinstance(data, PreparedSet):
        return prepared_images(data, pre, device, decoder=decoder)
    if is_reader(data):
        if choose_decoder(decoder, device=str(device)) == "device":
            return GpuDecodedImages(data, pre, device, on_bad=on_bad, name=name)
        return DecodedImages(data, pre, device, on_bad=on_bad, name=name, workers=workers)
    return LoaderImages(data, pre, device, workers=workers or max(1, host_cores() - 1))
