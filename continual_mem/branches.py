"""Private passes of one task, as a mixin of :class:`~continual_mem.model.MemoryViT`: a late fork's branch (its
private stream: pooled or selected patches; the backbone's blocks or the task's fine-tuned copy, with memory and
adapters) and the own-pass regimes (full attention to memory, adapters, input memory and the Memory Transformer's
ablations). Each runs timm's own blocks; none of it touches the shared pass, which is why it may do anything."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .backbone import split_qkv
from .config import MEMORY_TRANSFORMER_REGIMES
from .layers import adapted_block
from .task import TaskModule


class PrivatePasses:
    """Needs ``self.backbone``, ``self.depth``, ``self.embed`` and ``self.pool_tokens`` (MemoryViT has them)."""

    def _branch(self, task: TaskModule, tokens: torch.Tensor, hidden: torch.Tensor, fork: int) -> torch.Tensor:
        """Late fork: blocks ``fork..depth-1`` on the task's private stream [its tokens, the backbone's registers and
        patches entering block ``fork``] through timm's own blocks, with full attention; per-layer memory is
        appended as extra tokens whose outputs are dropped (as in :meth:`separate_pass`)."""
        h = torch.cat([tokens, self.private_stream(task, hidden)], dim=1)  # the task's tokens take the CLS's place
        h = self._blocks_with_memory(task, h, fork)
        return self.pool_tokens(h[:, : task.config.task_tokens], task)

    def private_stream(self, task: TaskModule, hidden: torch.Tensor) -> torch.Tensor:
        """What a late-fork task's private stream starts from: the backbone's registers and patches entering the
        fork block (``hidden`` is ``[CLS, registers, patches]``), the patch grid average-pooled by ``fork_pool``
        when asked (position embeddings are already in the states, so pooling keeps them)."""
        p = task.config.fork_pool
        if task.config.fork_select:
            return self._select_patches(hidden, task.config.fork_select, self.depth - task.config.fork_layers)
        if p == (1, 1):
            return hidden[:, 1:]
        prefix = self.backbone.num_prefix_tokens
        patches = hidden[:, prefix:]
        B, _, D = patches.shape
        gh, gw = self.backbone.patch_embed.grid_size
        pooled = F.avg_pool2d(patches.transpose(1, 2).reshape(B, D, gh, gw), p)
        return torch.cat([hidden[:, 1:prefix], pooled.flatten(2).transpose(1, 2)], dim=1)

    def _select_patches(self, hidden: torch.Tensor, keep: int, block: int) -> torch.Tensor:
        """``[registers, the keep patches the class token attends to most at ``block``]``, patches in grid order:
        the class token's attention row of that block (softmax over every key, mean over heads), from the states
        entering it."""
        bb = self.backbone
        prefix = bb.num_prefix_tokens
        attn = bb.blocks[block].attn
        q, k, _ = split_qkv(attn, attn.qkv(bb.blocks[block].norm1(hidden)))  # (B, H, N, hd)
        row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, N)
        score = row[:, :, 0, prefix:].mean(dim=1)  # (B, patches)
        idx = score.topk(keep, dim=-1).indices.sort(dim=-1).values
        patches = hidden[:, prefix:].gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return torch.cat([hidden[:, 1:prefix], patches], dim=1)

    def _blocks_with_memory(self, task: TaskModule, h: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks ``start..depth-1`` of timm's own code on ``h``; where the task has per-layer memory, everyone
        attends to it and its outputs are dropped."""
        B, keep = h.shape[0], h.shape[1]
        for i in range(start, self.depth):
            blk = task.block_at(i, self.backbone)
            mem = task.memory_at(i) if task.memory is not None else None
            pair = task.adapters_at(i)
            run = blk if pair is None else functools.partial(adapted_block, blk, *pair)
            h = run(h) if mem is None else run(torch.cat([h, mem.expand(B, -1, -1)], dim=1))[:, :keep]
        return h

    def _memory_transformer(self, task: TaskModule, h: torch.Tensor, n_seq: int) -> torch.Tensor:
        """Burtsev et al.'s ablations on ``h = [sequence (n_seq tokens), propagated memory]``, timm's blocks.
        ``mem-bottleneck``: sequence rows attend only to memory, memory rows to everything. ``mem-ctrl``: the
        frozen block updates the sequence (which reads the memory), the task's controller copy the memory."""
        if task.config.regime == "mem-bottleneck":
            mask = bottleneck_mask(n_seq, h.shape[1] - n_seq, h.device)
            for blk in self.backbone.blocks:
                h = blk(h, attn_mask=mask)
            return h
        for blk, ctrl in zip(self.backbone.blocks, task.controllers):
            h = torch.cat([blk(h)[:, :n_seq], ctrl(h)[:, n_seq:]], dim=1)
        return h

    def separate_pass(self, task: TaskModule, x: torch.Tensor) -> torch.Tensor:
        """Logits of a non-preserving task, from a pass of its own through timm's blocks."""
        c = task.config
        if c.regime == "full":
            bb = task.backbone
            return task.head(bb.forward_head(bb.forward_features(x), pre_logits=True))
        bb = self.backbone
        h = self.embed(x)
        B = h.shape[0]
        if task.tokens is None:  # adapters alone: the backbone's own tokens and pooling, adapted blocks
            return task.head(bb.forward_head(bb.norm(self._blocks_with_memory(task, h, 0)), pre_logits=True))
        # The task's class token takes the original class token's place (patches attend to it).
        h = torch.cat([task.tokens.expand(B, -1, -1), h[:, 1:]], dim=1)
        if task.input_memory is not None:  # propagated memory: ordinary tokens from here on
            h = torch.cat([h, task.input_memory.expand(B, -1, -1)], dim=1)
        if c.regime in MEMORY_TRANSFORMER_REGIMES:
            h = self._memory_transformer(task, h, h.shape[1] - c.input_memory)
        else:
            h = self._blocks_with_memory(task, h, 0)
        return task.head(bb.fc_norm(bb.norm(h)[:, : c.task_tokens].mean(dim=1)))


def bottleneck_mask(n_seq: int, n_mem: int, device=None) -> torch.Tensor:
    """MemBottleneck's boolean mask (True = may attend), rows are queries: sequence -> memory only, memory -> all."""
    n = n_seq + n_mem
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:, n_seq:] = True
    mask[n_seq:, :] = True
    return mask
