"""FLOP counts from a ViT's shapes, shared by the accounting and every regime's own count.

A multiply-add counts 2; matrix products only (linear layers, attention scores and weighted sums); norms, softmax
and elementwise work are ignored, as usual. Functions take the model duck-typed (``backbone``, ``depth``).
"""
from __future__ import annotations


def dims(model) -> tuple[int, int, int, int]:
    """``(embed dim, attention width, MLP hidden, tokens)`` of the backbone's blocks."""
    bb = model.backbone
    attn = bb.blocks[0].attn
    hidden = bb.blocks[0].mlp.fc1.out_features
    return bb.embed_dim, attn.num_heads * attn.head_dim, hidden, bb.num_prefix_tokens + bb.patch_embed.num_patches


def block_flops(d: int, a: int, hidden: int, queries: int, keys: int) -> int:
    """One transformer block for ``queries`` query rows over ``keys`` keys."""
    return 2 * queries * (3 * d * a + a * d + 2 * d * hidden) + 4 * queries * keys * a


def adapter_flops(tokens: int, d: int, r: int) -> int:
    """Two bottleneck adapters (down and up projections) on ``tokens`` tokens: one block's worth."""
    return 2 * tokens * (2 * d * r * 2)


def patch_flops(model) -> int:
    """The patch embedding's convolution."""
    bb = model.backbone
    pe = bb.patch_embed.proj
    return 2 * bb.patch_embed.num_patches * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] * bb.embed_dim


def head_flops(linear) -> int:
    """A linear head."""
    return 2 * linear.in_features * linear.out_features


def backbone_head_flops(model) -> int:
    """The backbone's own classifier, 0 without one."""
    bb = model.backbone
    return 2 * bb.num_features * bb.num_classes if bb.num_classes else 0


def backbone_flops(model) -> int:
    """FLOPs per image of the frozen backbone (patch embedding, blocks, head)."""
    d, a, hidden, n = dims(model)
    return patch_flops(model) + model.depth * block_flops(d, a, hidden, n, n) + backbone_head_flops(model)


def own_sequence_flops(model, task, *, block_copies: int = 1) -> int:
    """An own pass over ``[task tokens, registers, patches, input memory]`` with per-layer memory as extra tokens,
    each block run ``block_copies`` times over the whole sequence (MemCtrl's controller copy makes it 2)."""
    c = task.config
    d, a, hidden, n = dims(model)
    flops = patch_flops(model) + head_flops(task.head)
    base = n + c.input_memory
    for i in range(model.depth):
        seq = base + (c.memory if i in task.layer_to_slot else 0)
        flops += block_flops(d, a, hidden, seq, seq) * block_copies
        if task.adapters_at(i) is not None:
            flops += adapter_flops(seq, d, c.adapter_dim)
    return flops
