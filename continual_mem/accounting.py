"""Parameter and FLOP accounting from the model's shapes (paper Table 5 style).

FLOPs count a multiply-add as 2 and cover matrix products (linear layers, attention scores and weighted
sums); norms, softmax and elementwise work are ignored, as usual.
"""
from __future__ import annotations

from dataclasses import dataclass

from .model import MemoryViT
from .task import TaskModule


@dataclass(frozen=True)
class Cost:
    """Cost of one task (or the backbone).

    Attributes:
        params: Parameters the task adds.
        flops: Incremental FLOPs per image.
        batch_flops: FLOPs per forward independent of the batch size (memory keys/values).
        shared_pass: Whether the task rides in the shared single pass.
    """

    name: str
    regime: str
    params: int
    flops: int
    batch_flops: int
    shared_pass: bool


def _dims(model: MemoryViT) -> tuple[int, int, int, int]:
    bb = model.backbone
    attn = bb.blocks[0].attn
    hidden = bb.blocks[0].mlp.fc1.out_features
    return bb.embed_dim, attn.num_heads * attn.head_dim, hidden, bb.num_prefix_tokens + bb.patch_embed.num_patches


def _block_flops(d: int, a: int, hidden: int, queries: int, keys: int) -> int:
    return 2 * queries * (3 * d * a + a * d + 2 * d * hidden) + 4 * queries * keys * a


def _adapter_flops(tokens: int, d: int, r: int) -> int:
    """Two bottleneck adapters (down and up projections) on ``tokens`` tokens: one block's worth."""
    return 2 * tokens * (2 * d * r * 2)


def backbone_flops(model: MemoryViT) -> int:
    """FLOPs per image of the frozen backbone (patch embedding, blocks, head)."""
    bb = model.backbone
    d, a, hidden, n = _dims(model)
    pe = bb.patch_embed.proj
    patch = 2 * bb.patch_embed.num_patches * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] * d
    head = 2 * bb.num_features * bb.num_classes if bb.num_classes else 0
    return patch + model.depth * _block_flops(d, a, hidden, n, n) + head


def task_cost(model: MemoryViT, name: str) -> Cost:
    task: TaskModule = model.tasks[name]
    c = task.config
    d, a, hidden, n = _dims(model)
    params = sum(p.numel() for p in task.parameters())
    head = 2 * task.head.in_features * task.head.out_features
    batch = 0
    if c.regime == "head":
        flops = head
    elif c.has_tokens:
        flops = head
        owners = [task, *(model.tasks[s] for s in c.sees)]
        fork = model.depth - c.fork_layers
        for i in range(model.depth):
            if i >= fork:  # private branch: the whole stream [tokens, registers, patches] + memory, own pass
                bb = model.backbone
                patches = c.fork_select or bb.patch_embed.num_patches // (c.fork_pool[0] * c.fork_pool[1])
                if c.fork_select and i == fork:  # the class token's attention row that picks the patches
                    flops += 2 * n * d * 2 * a + 2 * n * a
                seq = c.task_tokens + bb.num_prefix_tokens - 1 + patches + (c.memory if i in task.layer_to_slot else 0)
                flops += _block_flops(d, a, hidden, seq, seq)
                if task.adapters_at(i) is not None:
                    flops += _adapter_flops(seq, d, c.adapter_dim)
                continue
            keys = n + sum(t.config.task_tokens for t in owners)
            for t in owners:
                if (mem := t.memory_at(i) if t.memory is not None else None) is not None:
                    keys += mem.shape[1]
            flops += _block_flops(d, a, hidden, c.task_tokens, keys)
            if task.memory is not None and i in task.layer_to_slot:
                batch += 2 * c.memory * d * 2 * a  # memory K/V: computed once per forward
    elif c.regime == "full":
        flops = backbone_flops(model) - (2 * model.backbone.num_features * model.backbone.num_classes
                                         if model.backbone.num_classes else 0) + head
    else:  # own pass over [task cls, patches, input memory] with per-layer memory as extra tokens
        bb = model.backbone
        pe = bb.patch_embed.proj
        flops = 2 * bb.patch_embed.num_patches * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] * d + head
        base = n + c.input_memory
        for i in range(model.depth):
            seq = base + (c.memory if i in task.layer_to_slot else 0)
            # mem-ctrl: the controller copy runs the whole block too (only its memory rows are kept)
            flops += _block_flops(d, a, hidden, seq, seq) * (2 if c.regime == "mem-ctrl" else 1)
            if task.adapters_at(i) is not None:
                flops += _adapter_flops(seq, d, c.adapter_dim)
    return Cost(name, c.regime, params, flops, batch, c.preserving)


def cost_table(model: MemoryViT) -> list[dict]:
    """Rows for every task plus the backbone, the empty slots of task groups (computed all the same, so that
    a group's shapes never change) and the whole multi-task pass."""
    base = backbone_flops(model)
    rows = [{"name": "backbone", "regime": "frozen", "params": sum(p.numel() for p in model.backbone.parameters()),
             "gflops": base / 1e9, "ratio_to_backbone": 1.0, "shared_pass": True}]
    total = base
    for name in model.task_names:
        cost = task_cost(model, name)
        total += cost.flops
        rows.append({"name": name, "regime": cost.regime, "params": cost.params, "gflops": cost.flops / 1e9,
                     "ratio_to_backbone": cost.flops / base, "shared_pass": cost.shared_pass})
    empty = [(u, u.names.count(None)) for u in model.plan() if u.kind == "group" and None in u.names]
    if empty:
        flops = 0
        for unit, count in empty:
            member = next(n for n in unit.names if n)  # every slot of a group has this shape; empty ones no head
            head = model.tasks[member].head
            flops += count * (task_cost(model, member).flops - 2 * head.in_features * head.out_features)
        total += flops
        rows.append({"name": f"empty group slots ({sum(c for _, c in empty)})", "regime": "-", "params": 0,
                     "gflops": flops / 1e9, "ratio_to_backbone": flops / base, "shared_pass": True})
    rows.append({"name": "all tasks, one call", "regime": "-", "params": sum(r["params"] for r in rows),
                 "gflops": total / 1e9, "ratio_to_backbone": total / base, "shared_pass": True})
    return rows
