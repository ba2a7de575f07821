"""The shared-pass model as one ONNX graph (extra ``offline-backbone`` or ``export``: onnx, onnxruntime).

One input ``images`` (normalised ``(B, 3, S, S)`` float32) and one output per task (named as the task; plus
``original`` when the backbone has a head), every task computed in the same single pass as in PyTorch. A JSON
sidecar beside the graph says what the outputs are (task names, classes, regimes) and how to preprocess (size,
mean, std, interpolation, crop fraction), and which backbone the graph carries (sha256 fingerprint).

Tasks that need their own pass (``memory``, ``full``, ``input-memory``, ``hybrid``, ``adapters``,
``memory+adapters``) are refused: a graph of the shared pass would not contain them; leave them out with ``tasks=``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .backbone import fingerprint
from .model import ORIGINAL, MemoryViT

class _SharedPass(torch.nn.Module):
    """``images -> (original?, task_1, ..., task_k)`` as a tuple (ONNX outputs are positional)."""

    def __init__(self, net: MemoryViT, tasks: list[str], original: bool) -> None:
        super().__init__()
        self.net, self.tasks, self.original = net, tasks, original

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(images, tasks=self.tasks, original=self.original)
        return tuple(([out[ORIGINAL]] if self.original else []) + [out[t] for t in self.tasks])


def export_onnx(
    net: MemoryViT,
    path: str | Path,
    *,
    tasks: list[str] | None = None,
    opset: int = 17,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    extra_metadata: dict | None = None,
) -> dict:
    """Write ``net``'s shared pass to ``path`` (and ``path`` with ``.json`` as the sidecar); return the sidecar.

    Args:
        net: The model (exported on the CPU in float32; it is not modified).
        tasks: Tasks to include, in this order (default: every task; own-pass tasks are refused).
        opset: ONNX opset.
        dynamic_batch: Let the batch dimension vary (else it is fixed at ``batch_size``).
        batch_size: Example batch size used for tracing (the fixed size without ``dynamic_batch``).
        extra_metadata: Merged into the sidecar (e.g. the registry version).
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
    if opset < 14:
        raise ValueError(f"opset {opset} is too old for the attention ops; use 14 or newer")
    original = getattr(net.backbone, "num_classes", 0) > 0
    outputs = ([ORIGINAL] if original else []) + names
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
            torch.onnx.export(_SharedPass(net, names, original), (torch.zeros(batch_size, 3, size, size),), str(tmp),
                              dynamo=False, input_names=["images"], output_names=outputs, opset_version=opset,
                              dynamic_axes={n: {0: "batch"} for n in ["images", *outputs]} if dynamic_batch else None)
    finally:
        net.to(device).train(was_training)
    sidecar = {
        "format": "continual-mem-onnx/1", "input": "images", "outputs": outputs, "opset": opset,
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


def run_onnx(path: str | Path, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The graph's outputs on ``images`` through onnxruntime's CPU provider, by output name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {"images": images.detach().cpu().float().numpy()})
    return {n: torch.from_numpy(v) for n, v in zip(names, values)}
