"""The shared pass's task paths, as a mixin of :class:`~continual_mem.model.MemoryViT`: a single task's tokens
(the per-task path), a fixed-capacity group of tasks in one set of kernels per block, and every group of one shape
stacked into one set of launches per block (:mod:`continual_mem.stacked`). All read the backbone's K/V in place;
none changes what an existing task computes when tasks are added."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import stacked
from .cache_keys import KVKey
from .layers import group_block, memory_kv
from .task import TaskModule


class TaskPaths:
    """Needs ``self.backbone``, ``self.depth``, ``self.tasks``, ``self._kv_cache``, ``self._group_block``,
    ``self._task_block``, ``self.stack_groups``, ``self._trains`` and ``self._branch`` (MemoryViT has them)."""

    def _cached(self, key: KVKey, params: list[nn.Parameter], compute, local: dict):
        """``compute()`` once per forward, and across forwards while none of ``params`` trains or changes."""
        if key in local:
            return local[key]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            value = compute()
        else:
            dev = params[0].device.type
            stamp = (tuple((p._version, id(p)) for p in params), params[0].device,
                     torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            hit = self._kv_cache.get(key)
            if hit is None or hit[0] != stamp:
                with torch.no_grad():
                    hit = (stamp, compute())
                self._kv_cache[key] = hit
            value = hit[1]
        local[key] = value
        return value

    def _memory_kv(self, task: TaskModule, layer: int, local: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Memory K/V of a single-path task at ``layer`` (image-independent)."""
        mem = task.memory_at(layer)
        if mem is None:
            return None
        return self._cached(KVKey.task(task.name, layer), [task.memory],
                            lambda: memory_kv(self.backbone.blocks[layer], task.memory_at(layer)), local)

    def _token_task(
        self,
        task: TaskModule,
        backbone_kv: list[tuple[torch.Tensor, torch.Tensor]],
        token_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        mem_kv: dict,
        keep_kv: bool,
        block_inputs: dict[int, torch.Tensor],
    ) -> torch.Tensor:
        """One task on the per-task path (extension-mode tasks, and any task while it trains): its tokens attend
        to the backbone, itself, its memory and the tokens and memory of the earlier tasks it sees."""
        B = backbone_kv[0][0].shape[0]
        tokens = task.tokens.expand(B, -1, -1)  # (B, n, D)
        own: list[tuple[torch.Tensor, torch.Tensor]] = []
        fork = self.depth - task.config.fork_layers
        for i, blk in enumerate(self.backbone.blocks):
            if i >= fork:
                return self._branch(task, tokens, block_inputs[fork], fork)
            ks: list[torch.Tensor] = []
            vs: list[torch.Tensor] = []
            self._memory_kv(task, i, mem_kv)  # stored in mem_kv under KVKey.task(name, i)
            for owner in (task.name, *task.config.sees):
                if owner != task.name:
                    tk, tv = token_kv[owner][i]
                    ks.append(tk)
                    vs.append(tv)
                if (key := KVKey.task(owner, i)) in mem_kv:
                    ks.append(mem_kv[key][0])
                    vs.append(mem_kv[key][1])
            tokens, k, v = self._task_block(blk, tokens, *backbone_kv[i], ks, vs)
            if keep_kv:
                own.append((k, v))
        if keep_kv:
            token_kv[task.name] = own
        return self.pool_tokens(tokens, task)

    def _group_memory(self, names: tuple[str | None, ...], tasks: list, layer: int,
                      local: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every slot's memory K/V of a group at ``layer``, ``(1, H, slots * m, hd)`` (zeros for empty slots;
        image-independent, cached); each task's share is also put in ``local`` under ``KVKey.task(name, layer)``."""
        first = next(t for t in tasks if t is not None)
        if layer not in first.layer_to_slot:
            return None
        blk = self.backbone.blocks[layer]
        empty_mem = first.tokens.new_zeros(first.config.memory, self.backbone.embed_dim)

        def stacked() -> tuple[torch.Tensor, torch.Tensor]:
            mem = torch.cat([t.memory[t.layer_to_slot[layer]] if t is not None else empty_mem for t in tasks])
            return memory_kv(blk, mem.unsqueeze(0))  # (1, H, G * m, hd)

        params = [t.memory for t in tasks if t is not None and t.memory is not None]
        mk, mv = self._cached(KVKey.group(names, layer), params, stacked, local)
        m = first.config.memory
        for s, t in enumerate(tasks):
            if t is not None:
                local[KVKey.task(t.name, layer)] = (mk[:, :, s * m:(s + 1) * m], mv[:, :, s * m:(s + 1) * m])
        return mk, mv

    @staticmethod
    def _group_tokens(tasks: list, batch: int) -> torch.Tensor:
        """A group's starting token states ``(batch, slots * n, D)`` (zeros in empty slots)."""
        ref = next(t for t in tasks if t is not None).tokens
        empty = torch.zeros_like(ref)
        return torch.cat([t.tokens if t is not None else empty for t in tasks], dim=1).expand(batch, -1, -1)

    def _heads(self, tasks: list, tokens: torch.Tensor, normed: bool) -> dict[str, torch.Tensor]:
        """Each slot's logits from a group's final token states ``(B, slots * n, D)``."""
        bb, G = self.backbone, len(tasks)
        B, L, D = tokens.shape
        pooled = bb.fc_norm((tokens if normed else bb.norm(tokens)).view(B, G, L // G, D).mean(dim=2))
        return {t.name: t.head(pooled[:, s]) for s, t in enumerate(tasks) if t is not None}

    def _group(
        self,
        names: tuple[str | None, ...],
        backbone_kv: list[tuple[torch.Tensor, torch.Tensor]],
        token_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        mem_kv: dict,
        keep_kv: set[str],
    ) -> dict[str, torch.Tensor]:
        """A fixed-capacity group of concatenation-mode tasks, in one set of kernels per block."""
        tasks = [self.tasks[n] if n is not None else None for n in names]
        n, G = next(t for t in tasks if t is not None).config.task_tokens, len(names)
        tokens = self._group_tokens(tasks, backbone_kv[0][0].shape[0])
        keep = [(s, t.name) for s, t in enumerate(tasks) if t is not None and t.name in keep_kv]
        kept: dict[str, list] = {name: [] for _, name in keep}
        for i, blk in enumerate(self.backbone.blocks):
            mk, mv = self._group_memory(names, tasks, i, mem_kv) or (None, None)
            tokens, k, v = self._group_block(blk, tokens, *backbone_kv[i], mk, mv, G)
            for s, name in keep:
                kept[name].append((k[:, :, s * n:(s + 1) * n], v[:, :, s * n:(s + 1) * n]))
        token_kv.update(kept)
        return self._heads(tasks, tokens, normed=False)

    def _stack(
        self,
        units: list[tuple[str | None, ...]],
        backbone_kv: list[tuple[torch.Tensor, torch.Tensor]],
        token_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
        mem_kv: dict,
        keep_kv: set[str],
    ) -> dict[str, torch.Tensor]:
        """Several groups of one shape in one set of launches per block (:mod:`continual_mem.stacked`); each
        group's results are those it would have alone on this path, bit for bit."""
        groups = [[self.tasks[n] if n is not None else None for n in names] for names in units]
        G, slots, B = len(groups), len(units[0]), backbone_kv[0][0].shape[0]
        start = [self._group_tokens(tasks, B) for tasks in groups]
        tokens = stacked.group_buffer(G, start[0].shape[0] * start[0].shape[1], start[0].shape[2], start[0])
        for g, t in enumerate(start):
            tokens[g].view_as(t).copy_(t)
        params = [t.memory for tasks in groups for t in tasks if t is not None and t.memory is not None]
        memory = []
        for i in range(self.depth):
            per = [self._group_memory(names, tasks, i, mem_kv) for names, tasks in zip(units, groups)]
            if per[0] is None:
                memory.append(None)
                continue
            memory.append(self._cached(KVKey.stack(tuple(units), i), params,
                                       lambda per=per: tuple(torch.cat(kv, dim=2) for kv in zip(*per)), mem_kv))
        keep = [(g, s, t.name) for g, tasks in enumerate(groups) for s, t in enumerate(tasks)
                if t is not None and t.name in keep_kv]
        normed, kept = stacked.run_blocks(self.backbone, tokens, backbone_kv, memory, batch=B, slots=slots,
                                          keep=bool(keep))
        n = tokens.shape[1] // B // slots
        for g, s, name in keep:
            token_kv[name] = [(qkv[g, :, s * n:(s + 1) * n, 1].transpose(1, 2), qkv[g, :, s * n:(s + 1) * n, 2]
                               .transpose(1, 2)) for qkv in kept]
        out: dict[str, torch.Tensor] = {}
        for g, tasks in enumerate(groups):
            out.update(self._heads(tasks, normed[g].view(B, -1, normed.shape[2]), normed=True))
        return out

    def pool_tokens(self, tokens: torch.Tensor, task: TaskModule) -> torch.Tensor:
        """Final norm, average over the task's tokens, fc_norm, head: ``(B, n, D) -> (B, classes)``."""
        bb = self.backbone
        return task.head(bb.fc_norm(bb.norm(tokens).mean(dim=1)))

    def _stacks(self, units: Sequence[tuple], x: torch.Tensor) -> dict[tuple, list]:
        """The groups the stacked path runs, by shape (memory, layers, tokens): inference groups, when
        :func:`~continual_mem.stacked.supported` holds and the task path is not compiled."""
        if not self.stack_groups or self._group_block is not group_block:
            return {}
        groups = [(unit, members) for unit, members in units if unit.kind == "group" and not self._trains(members)]
        if not groups or not stacked.supported(self.backbone, groups[0][1][0].tokens.dtype, x.device):
            return {}
        out: dict[tuple, list] = {}
        for unit, members in groups:
            out.setdefault(members[0].config.group_shape, []).append(unit.names)
        return out
