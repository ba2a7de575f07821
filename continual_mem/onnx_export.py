"""The shared-pass model as one ONNX graph (extra ``offline-backbone`` or ``export``: onnx, onnxruntime).

One input ``images`` (normalised ``(B, 3, S, S)`` float32) and one output per task (named as the task; plus
``original`` when the backbone has a head), every task computed in the same single pass as in PyTorch. A JSON
sidecar beside the graph says what the outputs are (task names, classes, regimes) and how to preprocess (size,
mean, std, interpolation, crop fraction), and which backbone the graph carries (sha256 fingerprint).

Tasks that need their own pass (``memory``, ``full``, ``input-memory``, ``hybrid``, ``adapters``,
``memory+adapters``) are refused: a graph of the shared pass would not contain them; leave them out with ``tasks=``.

``routed=True`` exports a routed pass instead (:mod:`continual_mem.routed`): inputs ``images`` and ``task``
(``(B,)`` int64, each image's index into the sidecar's task list), one output ``logits`` ``(B, width)``. Each image
computes the backbone and its own task only, so the graph's cost does not grow with the task count. Row ``b``'s
first ``classes`` columns are its task's logits; the rest are zeros. It holds grouped tasks (concatenation-mode token
tasks without a fork, e.g. masked memory); others are refused.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from . import routed
from .backbone import fingerprint
from .forward_plan import PassState, backbone_pass, make_plan
from .model import ORIGINAL, MemoryViT
from .row_linear import head_width

class _SharedPass(torch.nn.Module):
    """``images -> (original?, task_1, ..., task_k)`` as a tuple (ONNX outputs are positional)."""

    def __init__(self, net: MemoryViT, tasks: list[str], original: bool) -> None:
        super().__init__()
        self.net, self.tasks, self.original = net, tasks, original

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(images, tasks=self.tasks, original=self.original)
        return tuple(([out[ORIGINAL]] if self.original else []) + [out[t] for t in self.tasks])


class _RoutedPass(torch.nn.Module):
    """``(images, task) -> logits``: row ``b`` through exported task ``task[b]`` only. Per group shape, one routed
    group whose first slot holds the row's task (if it has that shape); per head width one gathered product;
    each row keeps the product of its own task's width, padded to the widest."""

    def __init__(self, net: MemoryViT, tasks: list[str]) -> None:
        super().__init__()
        self.net, self.tasks = net, tasks
        self.width = max(head_width(net.tasks[t].config.num_classes) for t in tasks)
        self.shapes = sorted({net.tasks[t].config.group_shape for t in tasks}, key=repr)

    def forward(self, images: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        net = self.net
        by_shape = routed.shape_groups(net)
        members = [n for shape in self.shapes for g in by_shape[shape] for n in g if n is not None]
        plan = make_plan(net, net.closure(members), original=False, device=images.device)
        state = PassState(images, plan.paths, readers=plan.readers)
        backbone_pass(net, plan, state, original=False)
        out = images.new_zeros(images.shape[0], self.width)
        for shape in self.shapes:
            table = routed.tables(net, by_shape[shape], state.mem_kv)
            slot = [table.index.get(t, 0) for t in self.tasks]  # 0: the empty slot, for another shape's tasks
            idx = torch.zeros(images.shape[0], net.group_size, dtype=torch.int64)
            idx[:, 0] = torch.tensor(slot, dtype=torch.int64)[task]
            pooled = routed.routed_pooled(net, table, idx, state)
            for w in sorted({table.head_at[t][0] for t in self.tasks if t in table.head_at}):
                rows = torch.tensor([table.head_at[t][1] if table.head_at.get(t, (0,))[0] == w else 0
                                     for t in self.tasks], dtype=torch.int64)[task]
                logits = routed.gathered_head(table, pooled, 0, w, rows)
                out = torch.where((rows > 0).unsqueeze(1), torch.nn.functional.pad(logits, (0, self.width - w)), out)
        return out


def export_onnx(
    net: MemoryViT,
    path: str | Path,
    *,
    tasks: list[str] | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    extra_metadata: dict | None = None,
    routed: bool = False,
) -> dict:
    """Write ``net``'s shared pass to ``path`` (and ``path`` with ``.json`` as the sidecar); return the sidecar.

    Args:
        net: The model (exported on the CPU in float32; it is not modified).
        tasks: Tasks to include, in this order (default: every task; own-pass tasks are refused).
        opset: ONNX opset.
        dynamic_batch: Let the batch dimension vary (else it is fixed at ``batch_size``).
        batch_size: Example batch size used for tracing (the fixed size without ``dynamic_batch``).
        extra_metadata: Merged into the sidecar (e.g. the registry version).
        routed: Export a routed pass (see the module doc): inputs ``images`` and ``task``, output ``logits``.
    """
    import timm.data

    names = list(net.task_names if tasks is None else tasks)
    unknown = [t for t in names if t not in net.tasks]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(net.task_names) or 'none'}")
    own = [t for t in names if not net.tasks[t].config.preserving]
    if own:
        raise ValueError(f"task {own[0]!r} ({net.tasks[own[0]].config.regime}) needs its own pass and cannot be in "
                         "the shared-pass graph; leave it out with --tasks (shared-pass tasks: "
                         f"{', '.join(t for t in net.task_names if net.tasks[t].config.preserving) or 'none'})")
    grouped = {n for u in net.plan() if u.kind == "group" for n in u.names if n is not None}
    if routed and (other := [t for t in names if t not in grouped]):
        raise ValueError(f"task {other[0]!r} is not a grouped task (concatenation-mode masked memory without a fork); "
                         f"a routed graph holds those only: leave it out with --tasks (grouped tasks: "
                         f"{', '.join(t for t in net.task_names if t in grouped) or 'none'})")
    if routed and not names:
        raise ValueError("a routed graph needs at least one task; give --tasks or add a task first")
    if opset < 14:
        raise ValueError(f"opset {opset} is too old for the attention ops; use 14 or newer")
    original = getattr(net.backbone, "num_classes", 0) > 0 and not routed
    outputs = ["logits"] if routed else ([ORIGINAL] if original else []) + names
    inputs = ["images", "task"] if routed else ["images"]
    size = int(net.backbone.patch_embed.img_size[0])
    cfg = timm.data.resolve_data_config({}, model=net.backbone)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training, device = net.training, next(net.parameters()).device
    net.to("cpu").eval()
    net.invalidate_cache()  # memory K/V are recomputed inside the graph, not baked in from an earlier call
    tmp = path.with_name(path.name + ".partial")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-side shapes
            example = torch.zeros(batch_size, 3, size, size)
            module, args = ((_RoutedPass(net, names), (example, torch.zeros(batch_size, dtype=torch.int64)))
                            if routed else (_SharedPass(net, names, original), (example,)))
            torch.onnx.export(module, args, str(tmp), dynamo=False, input_names=inputs, output_names=outputs,
                              opset_version=opset,
                              dynamic_axes={n: {0: "batch"} for n in [*inputs, *outputs]} if dynamic_batch else None)
    finally:
        net.to(device).train(was_training)
    sidecar = {
        "format": "continual-mem-onnx/1", "input": "images", "inputs": inputs, "outputs": outputs, "opset": opset,
        "routed": routed,
        "dynamic_batch": dynamic_batch, "batch_size": None if dynamic_batch else batch_size,
        "preprocess": {"size": size, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                       "interpolation": cfg["interpolation"], "crop_pct": cfg["crop_pct"],
                       "layout": "NCHW float32, RGB, normalised"},
        "backbone_fingerprint": fingerprint(net.backbone),
        "tasks": [{"name": t, "classes": list(net.tasks[t].config.class_labels), "regime": net.tasks[t].config.regime,
                   "mode": net.tasks[t].config.mode, "dataset": net.tasks[t].config.dataset} for t in names],
        **(extra_metadata or {}),
    }
    side = path.with_suffix(".json")
    side_tmp = side.with_name(side.name + ".partial")
    side_tmp.write_text(json.dumps(sidecar, indent=2))
    tmp.replace(path)
    side_tmp.replace(side)
    return sidecar


def run_onnx(path: str | Path, images: torch.Tensor, task: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The graph's outputs on ``images`` (and, for a routed graph, each image's ``task`` index) through
    onnxruntime's CPU provider, by output name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = {"images": images.detach().cpu().float().numpy()}
    if task is not None:
        feed["task"] = task.detach().cpu().to(torch.int64).numpy()
    values = session.run(None, feed)
    return {n: torch.from_numpy(v) for n, v in zip(names, values)}
