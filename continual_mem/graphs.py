"""CUDA-graph replay of the multi-task forward for inference, and of a task's training step.

The eager single pass launches ~20 small kernels per task per block; on a GPU that is dispatch-bound (Python and
launch overhead, not FLOPs). Capturing the whole forward for a fixed input shape removes that overhead. The
graph replays exactly the kernels it captured, so outputs are deterministic from call to call; after any change
of tasks or parameters the runner refuses to run stale and must be re-captured.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from .model import MemoryViT
from .sm_partition import side_stream
from .step import train_step

# Input pipelines pin host memory in their own threads (DataLoader's pin-memory thread, prepared-copy prefetch)
# while a step is captured; only this thread's calls must be capture-safe, so other threads may allocate.
CAPTURE_MODE = "thread_local"


def inference_context(autocast_dtype: torch.dtype | None) -> contextlib.ExitStack:
    """Inference mode, and CUDA autocast to ``autocast_dtype`` when given: what a captured forward runs under."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    if autocast_dtype is not None:
        stack.enter_context(torch.autocast("cuda", dtype=autocast_dtype))
    return stack


class ModelStamp:
    """What a captured graph depends on, checked before each replay: the model's cache generation, which task
    objects it holds, and every task parameter's version counter. The parameters are listed once, at capture
    (walking K tasks' modules per replay cost ~20 ms at K = 1,000); a replaced parameter changes its task's
    object or the list, never silently."""

    def __init__(self, model: MemoryViT) -> None:
        self.model = model
        self.tasks = tuple(model.tasks.values())
        self.params = [p for t in self.tasks for p in t.parameters()]
        self.value = self._now()

    def _now(self) -> tuple:
        return (self.model.generation, [p._version for p in self.params])

    def changed(self) -> bool:
        tasks = self.model.tasks
        return (len(tasks) != len(self.tasks) or any(a is not b for a, b in zip(tasks.values(), self.tasks))
                or self._now() != self.value)


class GraphedForward:
    """Capture ``model(x, tasks)`` once for ``example``'s shape, then replay it.

    Args:
        model: The model (on a CUDA device, in eval mode).
        example: An input of the shape and dtype that will be used.
        tasks: Tasks to compute (default all).
        autocast_dtype: Run under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``), or None.
        warmup: Eager warm-up iterations before capture (fills the memory K/V cache, selects kernels).
    """

    def __init__(
        self,
        model: MemoryViT,
        example: torch.Tensor,
        *,
        tasks: Sequence[str] | None = None,
        autocast_dtype: torch.dtype | None = None,
        warmup: int = 3,
    ) -> None:
        if example.device.type != "cuda":
            raise ValueError("CUDA graphs need the model and input on a CUDA device")
        self.model = model.eval()
        self.tasks = list(tasks) if tasks is not None else None
        self.autocast_dtype = autocast_dtype
        self.static_x = example.clone()
        self._stamp = ModelStamp(self.model)
        stream = side_stream() or torch.cuda.Stream()  # inside a partition: on its SMs (see sm_partition)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._context():
            for _ in range(warmup):
                self.model(self.static_x, tasks=self.tasks)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with self._context(), torch.cuda.graph(self.graph, stream=side_stream(), capture_error_mode=CAPTURE_MODE):
            self.static_out = self.model(self.static_x, tasks=self.tasks)

    def _context(self):
        return inference_context(self.autocast_dtype)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._stamp.changed():
            raise RuntimeError("tasks or parameters changed since capture; build a new GraphedForward")
        if x.shape != self.static_x.shape or x.dtype != self.static_x.dtype:
            raise ValueError(f"captured for input {tuple(self.static_x.shape)} {self.static_x.dtype}, got "
                             f"{tuple(x.shape)} {x.dtype}")
        self.static_x.copy_(x)
        self.graph.replay()
        return {k: v.clone() for k, v in self.static_out.items()}


class GraphedTrainStep:
    """One training step of ``task`` (forward, cross-entropy, backward, gradient clipping, SGD update) captured as a
    CUDA graph for a fixed batch shape, then replayed: the per-task path's hundreds of small kernels (doubled by
    backward) cost one launch instead of one Python dispatch each.

    The optimizer must hold its learning rate as a CUDA tensor (``build_optimizer(..., cuda_graph=True)``) so the
    schedule can change it between replays. Warm-up iterations (run on a side stream, as PyTorch's whole-network
    capture recipe asks) use learning rate 0 and the task's parameters and momentum are restored afterwards, so
    building the graph does not train.

    Args:
        model: The model, on a CUDA device, in training mode.
        task: The task being trained (its parameters are the optimizer's).
        optimizer: SGD over the task's parameters with a tensor learning rate.
        x: An example batch (shape and dtype of every later batch).
        y: Its labels.
        autocast_dtype: Autocast dtype (e.g. ``torch.bfloat16``) or None.
        max_grad_norm: Clip the gradient norm to this (None: off).
        label_smoothing: Cross-entropy label smoothing.
        warmup: Eager warm-up iterations before capture.
    """

    def __init__(
        self,
        model: MemoryViT,
        task: str,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        autocast_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = 1.0,
        label_smoothing: float = 0.0,
        warmup: int = 3,
    ) -> None:
        if x.device.type != "cuda":
            raise ValueError("CUDA-graph training needs the model and batches on a CUDA device; turn cuda_graph off")
        self.lrs = [(g["lr"], g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
        if not all(isinstance(lr, torch.Tensor) and lr.device.type == "cuda" for lr, _ in self.lrs):
            raise ValueError("CUDA-graph training needs the optimizer's lr as a CUDA tensor; build it with "
                             "build_optimizer(..., cuda_graph=True)")
        self.model, self.task, self.optimizer = model, task, optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.autocast_dtype, self.max_grad_norm, self.label_smoothing = autocast_dtype, max_grad_norm, label_smoothing
        self.static_x, self.static_y = x.clone(), y.clone()

        saved = [p.detach().clone() for p in self.params]
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in self.params]
        saved_buffers = [None if b is None else b.clone() for b in buffers]
        saved_lrs = [lr.clone() for lr, _ in self.lrs]
        for lr, _ in self.lrs:
            lr.zero_()
        stream = side_stream() or torch.cuda.Stream()  # on the SMs the step may use (sm_partition)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._step(zero_grad=True)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():  # undo the warm-up: lr 0 moved nothing but the momentum buffers
            for p, v in zip(self.params, saved):
                p.copy_(v)
            for p, b in zip(self.params, saved_buffers):
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is None:
                    continue
                if b is None:
                    buf.zero_()  # SGD's first step from a zero buffer equals its first step without one (dampening 0)
                else:
                    buf.copy_(b)
            for (lr, _), saved_lr in zip(self.lrs, saved_lrs):
                lr.copy_(saved_lr)
        optimizer.zero_grad(set_to_none=True)  # backward in the graph allocates .grad from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side_stream(), capture_error_mode=CAPTURE_MODE):
            self.static_loss = self._step(zero_grad=False)

    def _step(self, *, zero_grad: bool) -> torch.Tensor:
        return train_step(self.model, self.task, self.static_x, self.static_y, self.optimizer,
                          max_grad_norm=self.max_grad_norm, label_smoothing=self.label_smoothing,
                          autocast_dtype=self.autocast_dtype, zero_grad=zero_grad)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float | list[float]) -> torch.Tensor:
        """One step on ``(x, y)`` at learning rate ``lr`` (each group at ``lr`` times its ``lr_scale``), or at one
        rate per optimizer group; returns the loss (a tensor: reading it syncs)."""
        if x.shape != self.static_x.shape or x.dtype != self.static_x.dtype or y.shape != self.static_y.shape:
            raise ValueError(f"captured for batches {tuple(self.static_x.shape)} {self.static_x.dtype}, got "
                             f"{tuple(x.shape)} {x.dtype}; every training batch must have the same shape")
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        rates = [lr * scale for _, scale in self.lrs] if isinstance(lr, (int, float)) else lr
        if len(rates) != len(self.lrs):
            raise ValueError(f"{len(rates)} learning rates for {len(self.lrs)} optimizer groups")
        for (tensor, _), rate in zip(self.lrs, rates):
            tensor.fill_(rate)
        self.graph.replay()
        # replay rewrites the parameters without bumping their version counters: drop cached memory K/V
        self.model.invalidate_cache()
        return self.static_loss
