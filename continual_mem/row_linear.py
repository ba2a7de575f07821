"""A linear layer whose rows do not depend on their batch neighbours.

A row's result must not depend on which rows share its batch (serving hands each image the row it gets alone).
On the CPU, torch 2.14's GEMM takes another path for fewer than 4 output features, and there a row's bits depend
on its position in the batch (measured: 1-3 outputs, batches of 2-514 rows; 4 or more outputs never). A narrower
layer therefore runs as a 4-wide one (zero rows added) and keeps its own columns; a layer of 4 or more outputs
is ``nn.Linear`` exactly, bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_OUT = 4


class RowLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) whose outputs are padded to :data:`MIN_OUT` inside the
    product when it has fewer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = MIN_OUT - self.out_features
        if pad <= 0:
            return F.linear(x, self.weight, self.bias)
        weight = torch.cat([self.weight, self.weight.new_zeros(pad, self.in_features)])
        bias = None if self.bias is None else torch.cat([self.bias, self.bias.new_zeros(pad)])
        return F.linear(x, weight, bias)[..., :self.out_features]


def head_width(classes: int) -> int:
    """The padded width of a gathered head (policy, pure): a power of two, at least 16. A task's width depends
    on its own class count only, so a task added with more classes never changes another task's product."""
    return max(16, 1 << (classes - 1).bit_length())
