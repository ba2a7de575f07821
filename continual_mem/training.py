"""Optimisation primitives: the one place where a task's trainable parameters become an optimizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import MemoryViT


def build_optimizer(
    model: MemoryViT,
    task: str,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's optimizer) over ``task``'s parameters only.

    Everything else in the model (backbone, other tasks) is set to ``requires_grad=False``.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    params = model.trainable_parameters(task)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(
    model: MemoryViT,
    task: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None = 1.0,
) -> torch.Tensor:
    """One SGD step on ``task``: forward only that task (and what it reads), cross-entropy, backward, step."""
    logits = model(images, tasks=[task], original=False)[task]
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    return loss.detach()
