"""The served model and its swaps: loaded from the registry, replaced whole when the registry's model version
changes. The batch worker reads :attr:`ModelHolder.current` once per batch, so a swap lands between batches and a
request is answered by exactly one model."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from continual_mem import MemoryViT, fork_batch, paging
from continual_mem.class_stats import TaskAgnostic
from registry import RegistryError
from scenarios.pipeline import Preprocess
from scenarios.streaming import DeviceStage

from .settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One loaded model: the network on its device, its version, its preprocessing and task metadata."""

    net: MemoryViT
    version: int
    stage: DeviceStage
    classes: dict[str, tuple[str, ...]]
    tasks: list[dict]
    # bucket -> GraphedForward: captured before the model serves (start-up, or the loader's thread before a swap),
    # else by the batch worker on first use
    graphs: dict = field(default_factory=dict)
    paged_tasks: frozenset[str] = frozenset()  # tasks in host memory (``page_forks``; serving.admission)
    agnostic: TaskAgnostic | None = None  # every task's class statistics, when every task has them

    @property
    def paged(self) -> bool:
        """Some task lives in host memory: every pass routes."""
        return bool(self.paged_tasks)


class ModelHolder:
    def __init__(self, settings: ServeSettings) -> None:
        from registry import Registry

        self.settings = settings
        self.registry = Registry(settings.registry)
        self.device = torch.device(settings.device)
        self.current: Served | None = None
        self.swaps = 0
        # run on a freshly loaded model before it is swapped in (the app's: capture its CUDA graphs), so the batch
        # worker never stalls on a new model's first passes while requests wait
        self.prepare: Callable[[Served], None] | None = None
        # called with each model right after it is swapped in (metrics, the shared model process's announcements)
        self.on_swap: list[Callable[[Served], None]] = []
        # On the CPU a pass and a model load run torch ops in two threads of one process, and a pass's float32
        # bits then depend on how the cores were shared (seen: an old task's logits changed during a load). So
        # on the CPU the two take turns; on CUDA the load runs beside the passes (their bits are the GPU's).
        self.cpu_turns = threading.Lock() if self.device.type == "cpu" else contextlib.nullcontext()

    def load(self) -> Served:
        """The registry's model as it is now (version read before and after, so a change during the load is
        picked up by the next poll)."""
        for _ in range(5):
            version = self.registry.model_version(self.settings.model)
            net = self.registry.load(self.settings.model).eval()
            if self.settings.page_forks:  # into pinned host packs before the rest goes to the device
                fork_batch.offload(net)
            fork_batch.place(net, self.device).resident_tasks = self.settings.resident_tasks
            if self.registry.model_version(self.settings.model) == version:
                break
        pre = Preprocess.for_backbone(net.backbone, "inception")  # timm's eval crop, as `eval` and `predict`
        agnostic, with_stats = self._agnostic(net)
        tasks = [{"name": n, "classes": net.tasks[n].config.num_classes, "regime": net.tasks[n].config.regime,
                  "preserving": net.tasks[n].config.preserving, "dataset": net.tasks[n].config.dataset,
                  "class_stats": n in with_stats} for n in net.task_names]
        classes = {n: net.tasks[n].config.class_labels for n in net.task_names}
        return Served(net, version, DeviceStage(pre, self.device), classes, tasks,
                      paged_tasks=frozenset(paging.paged_names(net.tasks.values())), agnostic=agnostic)

    def _agnostic(self, net) -> tuple[TaskAgnostic | None, set[str]]:
        """Task-agnostic scores on the device when every task has class statistics, and the tasks that have them."""
        with_stats = self.registry.tasks_with_class_stats(name=self.settings.model) & set(net.task_names)
        if not net.task_names or len(with_stats) < len(net.task_names):
            return None, with_stats
        try:
            stats = self.registry.class_stats(net.task_names, name=self.settings.model)
        except RegistryError:  # changed since the flags were read: the next poll reloads
            return None, set()
        return TaskAgnostic(stats).to(self.device), with_stats

    def _load_prepared(self) -> Served:
        with self.cpu_turns:
            fresh = self.load()
            if self.prepare is not None:
                try:
                    self.prepare(fresh)
                except Exception:  # noqa: BLE001 - a model that could not be prepared ahead is prepared on first use
                    log.exception("preparing model %s version %d before the swap failed; its graphs will be "
                                  "captured on first use", self.settings.model, fresh.version)
                    fresh.graphs.clear()
        return fresh

    async def watch(self) -> None:
        """Poll the registry; load a changed model in a thread and swap it in."""
        interval = self.settings.poll_interval_s
        while interval > 0:
            await asyncio.sleep(interval)
            try:
                version = await asyncio.to_thread(self.registry.model_version, self.settings.model)
                if self.current is not None and version != self.current.version:
                    fresh = await asyncio.to_thread(self._load_prepared)
                    old, self.current = self.current, fresh
                    self.swaps += 1
                    for hook in self.on_swap:
                        hook(fresh)
                    log.info("model %s: version %d -> %d (%d tasks)", self.settings.model, old.version,
                             fresh.version, len(fresh.tasks))
            except Exception:  # noqa: BLE001 - a failed reload keeps serving the model in hand
                log.exception("reloading model %s failed; still serving version %s", self.settings.model,
                              self.current.version if self.current else None)
