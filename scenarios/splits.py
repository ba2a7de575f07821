"""Deterministic, class-stratified splits (the paper's 95% train / 5% held-out protocol)."""
from __future__ import annotations

import torch


def stratified_split(labels: torch.Tensor, *, holdout: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(keep, held_out)``: every class contributes ``round(holdout * n_class)`` (at least 1 when it has
    2+ examples) to the held-out part. Uses its own generator (never the global RNG); sorted indices.

    Args:
        labels: ``(N,)`` integer labels.
        holdout: Fraction held out, in (0, 1).
        seed: Seed of the split.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    labels = torch.as_tensor(labels).long().cpu()
    g = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(holdout * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        held.append(idx[:k])
    held_out = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).flatten(), held_out
