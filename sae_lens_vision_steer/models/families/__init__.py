"""The built-in model families, registered when this package is imported: open_clip ViTs, open_clip timm
towers (SigLIP), timm ViTs (DINOv2) and transformers CLIP / SigLIP / DINOv2. Each family module imports only
`base`."""

from __future__ import annotations

from . import open_clip_vit
from .base import FAMILIES, Family, UnsupportedModelError, describe, register


def _register_builtin() -> None:
    register(Family("open_clip_vit", "open_clip's own ViT towers: ViT-B-32, ViT-B-16, ViT-L-14, ... and -quickgelu",
                    open_clip_vit.handles, open_clip_vit.tower))
    try:
        from . import hf, timm_vit  # need transformers / timm
    except ImportError:
        return

    register(Family("open_clip_timm_vit", "open_clip models with a timm ViT tower: SigLIP, SigLIP2 (attention pool) "
                    "and other timm VisionTransformer towers", timm_vit.handles_open_clip, timm_vit.open_clip_tower))
    register(Family("timm_vit", "timm VisionTransformer models as image-only backbones (e.g. DINOv2 "
                    "vit_base_patch14_dinov2)", timm_vit.handles, timm_vit.tower))
    register(Family("hf_clip", "transformers CLIPModel / CLIPVisionModelWithProjection and SiglipModel",
                    hf.handles_clip, hf.clip_tower))
    register(Family("hf_dinov2", "transformers Dinov2Model as an image-only backbone", hf.handles_dinov2,
                    hf.dinov2_tower))


_register_builtin()

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "describe", "register"]
