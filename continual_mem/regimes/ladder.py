"""Ladder side-tuning (Sung et al., NeurIPS 2022, "LST"): a narrow private network fed by the frozen backbone's
states at every block, preserving by construction.

The side network runs beside the shared pass on its states (read under no-grad, never written): before each of
its ``depth`` blocks (width ``D / 8``) a learned gate mixes its own state with a down-projection of the state
entering the backbone's block of the same index, and after its last block with the backbone's final features. Its
class-token state, normed and projected back to ``D`` (zero-initialised, so a new task starts as ``head`` does),
is added to the backbone's pooled features under the task's head. Training never back-propagates through the
backbone, so a step costs about a ``head`` step plus the narrow network.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..flops import block_flops, dims, head_flops
from ..reference_ops import embed
from .registry import register
from .spec import RegimeSpec

REDUCTION = 8  # side width = backbone width / 8 (the paper's default)
HEAD_DIM = 16


class Ladder(nn.Module):
    """The side network: ``depth + 1`` down-projections (one per block input, one for the final features),
    ``depth`` narrow timm blocks, ``depth`` gates, a final norm and the up-projection."""

    def __init__(self, embed_dim: int, depth: int, **factory) -> None:
        super().__init__()
        width = max(HEAD_DIM, embed_dim // REDUCTION)
        self.down = nn.ModuleList(nn.Linear(embed_dim, width, **factory) for _ in range(depth + 1))
        self.blocks = nn.ModuleList(Block(width, max(1, width // HEAD_DIM), qkv_bias=True) for _ in range(depth))
        self.blocks.to(**factory)
        self.gates = nn.Parameter(torch.zeros(depth, **factory))  # sigmoid(0): half side state, half the backbone
        self.norm = nn.LayerNorm(width, **factory)
        self.up = nn.Linear(width, embed_dim, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, taps: list[torch.Tensor], pre_logits: torch.Tensor) -> torch.Tensor:
        """``taps``: the states entering each backbone block, then the final normed states, ``(B, N, D)`` each;
        ``pre_logits``: the backbone's pooled features. Returns the features the task's head reads."""
        h = self.down[0](taps[0])
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            gate = torch.sigmoid(self.gates[i])
            h = gate * h + (1 - gate) * self.down[i + 1](taps[i + 1])
        return pre_logits + self.up(self.norm(h[:, 0]))


def build(config, backbone) -> Ladder:
    ref = backbone.cls_token
    return Ladder(backbone.embed_dim, len(backbone.blocks), device=ref.device, dtype=ref.dtype)


def side_pass(model, task, state) -> torch.Tensor:
    """The ladder on what the shared pass recorded (block inputs by forward pre-hooks, ``forward_features``)."""
    taps = [state.block_inputs[i] for i in range(model.depth)] + [state.features]
    return task.head(task.side(taps, state.pre_logits))


@torch.no_grad()
def reference(bb, task, x: torch.Tensor) -> torch.Tensor:
    """The backbone run block by block here (no hooks, no shared pass), its states handed to the ladder."""
    h = embed(bb, x)
    taps = []
    for blk in bb.blocks:
        taps.append(h)
        h = blk(h)
    feats = bb.norm(h)
    taps.append(feats)
    return task.head(task.side(taps, bb.forward_head(feats, pre_logits=True)))


def ladder_flops(model, task) -> tuple[int, int]:
    """The narrow blocks over every token, the down-projections of every tap, the up-projection and the head."""
    d, _, _, n = dims(model)
    side = task.side
    width = side.norm.normalized_shape[0]
    hidden = side.blocks[0].mlp.fc1.out_features
    flops = len(side.blocks) * block_flops(width, width, hidden, n, n) + len(side.down) * 2 * n * d * width
    return flops + 2 * width * d + head_flops(task.head), 0


register(RegimeSpec("ladder", "side", "ladder side network (LST) on the backbone's states at every block "
                    "(preserving, no backward through the backbone)", ladder_flops, modules=build,
                    side_pass=side_pass, reference=reference))
