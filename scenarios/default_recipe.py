"""What `add-task DATASET` with no flags trains, as pure functions of the model and the data.

The default is the best preserving recipe measured at a realistic training length (docs/domain_shift.md): a
fine-tuned late fork over the last 2/3 of the blocks, run on the 3/8 of the patches the class token attends to most
(ViT-S/14 at 224 px: 8 of 12 blocks, 96 of 256 patches, 0.26x a backbone's FLOPs), with masked memory. Its rate
comes from a short sweep: each rate of :data:`SHORT_RATES` trains for :func:`short_steps` steps from the same
initial state, :func:`scenarios.protocol.choose_lr` picks one on the held-out split (never a diverged one), and the
task then trains for all its steps at that rate.

Its length follows the data (:func:`training_steps`): :data:`EPOCHS` passes over the training split, at least
:data:`MIN_STEPS` (the realistic length every accuracy claim was measured at) and at most :data:`MAX_STEPS` (the
paper's schedule).

A value the user gives is kept as given: ``--fork-layers K`` alone is the plain fork it always was.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import ceil

FORK_SHARE = 2 / 3  # of the blocks: measured on 12-block ViTs
SELECT_SHARE = 3 / 8  # of the patches: measured at 224 px (256 patches)
SHORT_RATES = (0.05, 0.1, 0.2)
SHORT_SHARE = 0.2  # of the task's steps, per rate
EPOCHS = 32  # passes over the training split: the measured 2,000 × 128 runs were 32-41 on 6,000-8,000 images
MIN_STEPS = 2000  # below it nothing beat a linear head (100-1,000 steps); every accuracy claim was measured at it
MAX_STEPS = 20000  # the paper's schedule (20,000 steps)


@dataclass(frozen=True)
class Fork:
    """A resolved late fork: blocks, selected patches (0: all) and whether the branch fine-tunes its blocks."""

    layers: int
    select: int
    finetune: bool


def resolve_fork(*, depth: int, patches: int, has_tokens: bool, mode: str, layers: int | None,
                 select: int | None, finetune: bool | None, pooled: bool) -> Fork:
    """The fork a task gets. ``None`` fields take the default: the default fork for a concatenation-mode token
    regime (none for other regimes and for extension mode); patch selection and fine-tuning with it. Given fields
    are kept; with a given ``layers`` the others default to off, as before the default fork existed."""
    if depth < 1 or patches < 1:
        raise ValueError(f"need depth >= 1 and patches >= 1, got {depth} and {patches}")
    default = layers is None
    if default:
        layers = max(1, round(FORK_SHARE * depth)) if has_tokens and mode == "concatenation" else 0
    on = default and layers > 0
    if select is None:
        select = max(1, round(SELECT_SHARE * patches)) if on and not pooled else 0
    if finetune is None:
        finetune = on
    return Fork(layers, select, finetune)


def short_steps(steps: int) -> int:
    """Steps of each rate's short run: :data:`SHORT_SHARE` of the task's, at least one."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return max(1, round(SHORT_SHARE * steps))


def training_steps(*, train_images: int, batch_size: int, steps: int | None = None,
                   epochs: float | None = None) -> int:
    """Optimizer steps of a task: ``steps`` as given; else ``epochs`` passes over ``train_images``; else
    :data:`EPOCHS` passes, clamped to [:data:`MIN_STEPS`, :data:`MAX_STEPS`]."""
    if train_images < 1 or batch_size < 1:
        raise ValueError(f"need train_images >= 1 and batch_size >= 1, got {train_images} and {batch_size}")
    if steps is not None and epochs is not None:
        raise ValueError("give steps or epochs, not both")
    if steps is not None:
        return steps
    if epochs is not None:
        return max(1, ceil(epochs * train_images / batch_size))
    return min(MAX_STEPS, max(MIN_STEPS, ceil(EPOCHS * train_images / batch_size)))
