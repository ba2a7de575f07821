"""Every task group of one shape in one set of launches per block: the CUDA fast path of the single pass.

The per-group path (:func:`~continual_mem.layers.group_block`) launches about twelve kernels per group and block,
and its attention reads the backbone's keys and values once per group; with a few groups that is most of a task's
cost (``benchmarks/profile_single_pass.py``). Here the groups of one shape share buffers laid out group-major:
each group's rows contiguous, groups a fixed, aligned stride apart. The row-wise work (residual add with layer
scale, then the next layer norm, fused into one Triton kernel; GELU) runs once over every group's rows, the
attention runs once for every group (neighbouring programs read the same image's backbone K/V from L2), and only
the matrix products stay one cuBLAS call per group, on the very shapes, strides and alignment a group has alone.

Exactness: each kernel's work for a row depends on that row (and its group's fixed capacity) only, never on how
many groups share the launch, so adding a task, or a group, leaves every existing task's bits unchanged
(``tests/test_stacked.py``, and ``pytest -m gpu``). The numerics differ from the per-group path (one rounding for
``x + gamma * delta`` instead of three), like any other kernel choice; both match the oracle (``allclose``).

Taken for inference on CUDA with Triton (``CONTINUAL_MEM_ATTENTION`` not ``torch``), when the model runs in one
dtype (no autocast: cast it, e.g. ``model.to(torch.bfloat16)``) and every block is timm's pre-norm ``Block`` with
plain attention, a GELU ``Mlp`` and layer norms (:func:`supported`); anything else takes the per-group path.
"""
from __future__ import annotations

import torch
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .kernels import add_layer_norm_triton, stacked_attention_triton

ALIGN = 256  # elements between group starts: every group's slice starts equally aligned whatever the group count


def plain_block(blk: nn.Module) -> bool:
    """timm's pre-norm block with the pieces the fused path reproduces (nothing else hidden in it)."""
    if type(blk) is not Block:
        return False
    a, mlp = blk.attn, blk.mlp
    if getattr(a, "gate", None) is not None:
        return False
    if not all(isinstance(m, nn.Identity) for m in (a.q_norm, a.k_norm, a.norm)):
        return False
    if type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
        return False
    if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
        return False
    if not all(type(m) is nn.Linear for m in (a.qkv, a.proj, mlp.fc1, mlp.fc2)):
        return False
    norms = all(isinstance(m, nn.LayerNorm) and m.weight is not None and m.bias is not None
                for m in (blk.norm1, blk.norm2))
    return norms and all(isinstance(m, (LayerScale, nn.Identity)) for m in (blk.ls1, blk.ls2))


def supported(backbone: VisionTransformer, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the stacked path can run this backbone, token dtype and device's autocast state (see the module
    doc); it needs the Triton kernels too, which the call's plan decides (:mod:`continual_mem.forward_plan`)."""
    if torch.is_autocast_enabled(device.type):
        return False
    norm = backbone.norm
    if not (isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None):
        return False
    return all(plain_block(b) and b.attn.qkv.weight.dtype == dtype for b in backbone.blocks)


def group_buffer(groups: int, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``(groups, rows, cols)`` buffer; group starts ``ALIGN``-rounded elements apart."""
    return _view(_storage(groups, rows * cols, like), rows, cols)


def _storage(groups: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """``(groups, size rounded up to ALIGN)``: the storage behind a :func:`group_buffer`."""
    return like.new_empty(groups, -(-size // ALIGN) * ALIGN)


def _view(storage: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return storage[:, :rows * cols].view(storage.shape[0], rows, cols)


def _linear(layer: nn.Linear, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[g] = layer(x[g])``: one cuBLAS call per group, each the call a group alone makes."""
    w = layer.weight.t()
    for g in range(x.shape[0]):
        if layer.bias is None:
            torch.mm(x[g], w, out=out[g])
        else:
            torch.addmm(layer.bias, x[g], w, out=out[g])
    return out


def _gamma(ls: nn.Module) -> torch.Tensor | None:
    return ls.gamma if isinstance(ls, LayerScale) else None


def run_blocks(
    backbone: VisionTransformer,
    tokens: torch.Tensor,
    backbone_kv: list[tuple[torch.Tensor, torch.Tensor]],
    memory: list[tuple[torch.Tensor, torch.Tensor] | None],
    *,
    batch: int,
    slots: int,
    keep: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Advance every group's tokens through all blocks, then the final norm.

    Args:
        backbone: The frozen timm ViT (:func:`supported`).
        tokens: ``(G, batch * slots * n, D)`` token states entering block 0, group-major (a :func:`group_buffer`);
            updated in place.
        backbone_kv: Per block, the backbone's keys and values ``(batch, H, N, hd)`` (views, any row stride).
        memory: Per block, every group's memory keys and values ``(1, H, G * slots * m, hd)`` (group after
            group), or None where the tasks have no memory.
        batch: Images in the batch.
        slots: The groups' capacity.
        keep: Also return each block's qkv output ``(G, batch, L, 3, H, hd)`` (its token K/V, for readers).

    Returns:
        The normed final token states ``(G, batch * L, D)`` and the kept qkv outputs (empty unless ``keep``).
    """
    G, R, D = tokens.shape
    L = R // batch
    blocks = list(backbone.blocks)
    h = group_buffer(G, R, D, tokens)
    add_layer_norm_triton(tokens, None, None, blocks[0].norm1, h)
    kept: list[torch.Tensor] = []
    for i, blk in enumerate(blocks):
        a, mlp = blk.attn, blk.mlp
        H, hd = a.num_heads, a.head_dim
        qkv = _linear(a.qkv, h, group_buffer(G, R, 3 * H * hd, tokens)).view(G, batch, L, 3, H, hd)
        att = group_buffer(G, R, H * hd, tokens)
        mk, mv = memory[i] if memory[i] is not None else (None, None)
        stacked_attention_triton(qkv, *backbone_kv[i], mk, mv, att.view(G, batch, L, H, hd), slots=slots,
                                 scale=a.scale)
        if keep:
            kept.append(qkv)
        add_layer_norm_triton(tokens, _linear(a.proj, att, group_buffer(G, R, D, tokens)), _gamma(blk.ls1),
                              blk.norm2, h)
        flat = _storage(G, R * mlp.fc1.out_features, tokens)
        hidden = _linear(mlp.fc1, h, _view(flat, R, mlp.fc1.out_features))
        torch.ops.aten.gelu_(flat)  # the whole buffer in one launch (its padding is never read)
        delta = _linear(mlp.fc2, hidden, group_buffer(G, R, D, tokens))
        add_layer_norm_triton(tokens, delta, _gamma(blk.ls2),
                              blocks[i + 1].norm1 if i + 1 < len(blocks) else backbone.norm, h)
    return h, kept
