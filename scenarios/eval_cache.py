"""Held-out batches kept on the device after their first pass.

Training evaluates the same held-out split again and again (``fit`` every ``eval_every`` steps, then the final
score), and its batches do not change: no random crop, the same order. A source that streams its images (a
prepared copy, a compact copy decoded by nvJPEG, image files) decodes, lays out and normalises each of them on
every pass; when the split's model-ready batches fit a budget of device memory they are kept after the first full
pass and later passes hand them back, so evaluation runs at device-resident speed (FFCV's ``os_cache`` and DALI's
decoder cache keep decoded data for the same reason). A pass that stops early keeps nothing. Batches handed back
are the very tensors of the first pass: bit for bit what streaming would give, and not to be modified in place.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator

import torch

log = logging.getLogger(__name__)
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]

# the part of a CUDA device's free memory held-out batches may keep by default: they stay there while training
# runs, so a tenth (8 GB of an 80 GB card: ~13,000 images at 224 px; add-task's 5% held-out split of SUN397 is
# ~4,300)
DEVICE_SHARE = 0.1


def default_budget(device: torch.device, *, free: int | None = None) -> int:
    """Bytes of held-out batches a source keeps on ``device`` by default (policy, pure given ``free``): a tenth
    of the free memory of a CUDA device (measured when the source is made), none on a CPU, whose batches are in
    host memory already and where the budget would compete with the data itself."""
    if device.type != "cuda":
        return 0
    if free is None:
        free = torch.cuda.mem_get_info(device)[0]
    return int(DEVICE_SHARE * free)


def batch_bytes(images: int, img_size: int) -> int:
    """Device bytes of ``images`` model-ready images (float32, 3 x img_size^2) and their labels."""
    return images * (3 * img_size * img_size * 4 + 8)


class EvalCache:
    """Model-ready evaluation batches per key (batch size, shard), kept once a full pass has produced them.

    Args:
        device: Where the batches are.
        img_size: Their images' side.
        budget: Bytes all kept passes may hold together (0: keep nothing; None: :func:`default_budget`).
    """

    def __init__(self, device: torch.device, img_size: int, budget: int | None = None) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"the evaluation cache budget must be >= 0 bytes (0 keeps nothing), got {budget}")
        self.budget = default_budget(device) if budget is None else budget
        self.img_size = img_size
        self.used = 0
        self._kept: dict[Hashable, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def batches(self, key: Hashable, images: int, produce: Callable[[], Batches]) -> Batches:
        """The pass ``key`` over ``images`` images: the kept batches if there are, else ``produce()``'s, kept when
        the pass ends and they fit what is left of the budget."""
        if key in self._kept:
            yield from self._kept[key]
            return
        nbytes = batch_bytes(images, self.img_size)
        keep = nbytes <= self.budget - self.used
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in produce():
            if keep:
                seen.append(batch)
            yield batch
        if keep and key not in self._kept:  # the pass ran to its end (a generator closed early stops above)
            self._kept[key], self.used = seen, self.used + nbytes
            log.debug("kept %d evaluation batches (%.2f GB) on the device", len(seen), nbytes / 1e9)

    def holds(self, key: Hashable) -> bool:
        """Whether pass ``key`` is kept (its next pass decodes nothing)."""
        return key in self._kept

    def clear(self) -> None:
        """Forget every kept pass (frees their device memory)."""
        self._kept.clear()
        self.used = 0
