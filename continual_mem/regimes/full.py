"""Full fine-tuning: the task trains its own copy of the whole backbone (own pass; layer-wise rate decay 0.75)."""
from __future__ import annotations

import torch

from ..flops import backbone_flops, backbone_head_flops, head_flops
from .registry import register
from .spec import RegimeSpec


def full_pass(model, task, x: torch.Tensor) -> torch.Tensor:
    bb = task.backbone
    return task.head(bb.forward_head(bb.forward_features(x), pre_logits=True))


def full_reference(bb, task, x: torch.Tensor) -> torch.Tensor:
    """timm's own forward of the task's copy: the copy is the whole of the task, so the oracle is timm itself."""
    copy = task.backbone
    return task.head(copy.forward_head(copy.norm(copy.blocks(copy.norm_pre(copy.patch_drop(
        copy._pos_embed(copy.patch_embed(x)))))), pre_logits=True))


def full_flops(model, task) -> tuple[int, int]:
    return backbone_flops(model) - backbone_head_flops(model) + head_flops(task.head), 0


register(RegimeSpec("full", "own", "fine-tune a copy of the whole backbone (own pass)", full_flops,
                    backbone_copy=True, layer_decay=0.75, own_pass=full_pass, reference=full_reference))
