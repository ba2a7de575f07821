"""The frozen timm backbone: creation, validation, fingerprint and K/V capture.

The backbone always runs through timm's own, unmodified ``forward_features``; we only read each block's
``attn.qkv`` output with forward hooks (computation reuse).
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

log = logging.getLogger(__name__)


class BackboneError(ValueError):
    """The backbone cannot be used (unsupported architecture, missing weights, wrong file)."""


def validate_backbone(model: nn.Module) -> VisionTransformer:
    """Check that ``model`` is a timm ViT whose blocks we can reuse exactly."""
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"backbone must be a timm VisionTransformer, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise BackboneError(
                f"block {i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; only timm's "
                "pre-norm Block with Attention is supported (ViT, DeiT, DINOv2, CLIP-style ViTs)"
            )
    if model.cls_token is None:
        raise BackboneError("backbone has no class token; task tokens are initialised from it (class_token=True)")
    if model.attn_pool is not None:
        raise BackboneError("attention-pool heads (global_pool='map') are not supported; use a token-pool ViT")
    return model


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    img_size: int | None = None,
    **kwargs,
) -> VisionTransformer:
    """Create a frozen timm ViT.

    Args:
        name: timm model name, e.g. ``vit_base_patch32_224`` or ``vit_small_patch14_dinov2``.
        pretrained: Load timm's hub weights (needs network access on first use).
        weights: Local weights file (safetensors, or a state dict read with ``weights_only=True``), adapted with
            timm's own checkpoint filter for the architecture.
        img_size: Input resolution override (position embeddings are resampled by timm's filter).
        **kwargs: Passed to ``timm.create_model``.
    """
    if name not in timm.list_models():
        raise BackboneError(f"unknown timm model {name!r}; list them with timm.list_models('vit_*')")
    if pretrained and weights is not None:
        raise BackboneError("give either pretrained=True or a weights file, not both")
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    validate_backbone(model)
    if weights is not None:
        load_weights(model, weights)
    return freeze(model)


def load_weights(model: VisionTransformer, path: str | Path) -> None:
    """Load a local state dict into ``model`` through timm's checkpoint filter (strict)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised as a user-facing error
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state = checkpoint_filter_fn(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(
            f"weights file {path} does not fit this architecture: missing {list(missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes and bytes, in sorted key order)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def block0_class_token(model: VisionTransformer) -> torch.Tensor:
    """The original class token as it enters block 0 (after position embedding and ``norm_pre``), ``(1, D)``."""
    dev = model.cls_token.device
    dtype = model.cls_token.dtype
    size = model.patch_embed.img_size
    x = torch.zeros(1, model.patch_embed.proj.in_channels, *size, device=dev, dtype=dtype)
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    return x[:, 0].clone()


@contextmanager
def capture_qkv(model: VisionTransformer) -> Iterator[list[torch.Tensor | None]]:
    """Record each block's ``attn.qkv`` output ``(B, N, 3 * attn_dim)`` while the backbone runs."""
    store: list[torch.Tensor | None] = [None] * len(model.blocks)
    handles = []
    for i, blk in enumerate(model.blocks):

        def hook(_mod, _inp, out, i=i):
            store[i] = out

        handles.append(blk.attn.qkv.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_block_inputs(model: VisionTransformer, indices: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the token states ``(B, N, D)`` entering ``blocks[i]`` for each ``i`` in ``indices``."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for i in sorted(set(indices)):

        def hook(_mod, args, i=i):
            store[i] = args[0]

        handles.append(model.blocks[i].register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def split_qkv(attn: Attention, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a qkv projection output into normed ``q, k`` and ``v``, each ``(B, H, N, hd)`` (as timm does)."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v
