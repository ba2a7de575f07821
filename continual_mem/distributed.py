"""Data-parallel training across processes started by ``torchrun`` (PyTorch's own launcher and
DistributedDataParallel; no process management of our own).

Each process trains the same task on its slice of every global batch; DDP averages the task's gradients, so all
ranks hold the same parameters after every step and the run matches a one-process run with the same global batch
(up to the order of floating-point sums). Evaluation is split across ranks and the counts are summed, so every
rank takes the same best-state / early-stopping decision. Only rank 0 writes (registry, checkpoints, output).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank={self.rank}, world={self.world}")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """The contiguous part ``[lo, hi)`` of ``n`` items that this rank owns (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)


SINGLE = Shard()


def launched() -> bool:
    """True inside a multi-process ``torchrun`` job (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> tuple[Shard, str]:
    """Join the ``torchrun`` job (NCCL on GPUs, gloo on CPUs) and pick this rank's device.

    Outside torchrun (or with one process) this is a no-op returning ``(SINGLE, device)``.

    Returns:
        The shard and the device string (``cuda:LOCAL_RANK`` on GPUs).
    """
    if not launched():
        return SINGLE, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} wants GPU {local} but only {torch.cuda.device_count()} are visible; "
                             "use as many processes per node as GPUs (torchrun --nproc-per-node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    log.info("rank %d of %d on %s", rank, world, device)
    return Shard(rank, world), device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float | int], device: torch.device | str) -> list[float]:
    """Sum ``values`` over all ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def current() -> Shard:
    """The shard of the initialised process group (``SINGLE`` when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return SINGLE
