"""Model families: which library models `HookedCLIP` adapts, and loading them by name.

Each family says, from a built model, whether it handles it (`handles`) and how (`tower`); and from a
name alone, before any download, whether it can load it (`check_name`). `HookedCLIP(model)` and
`HookedCLIP.from_pretrained(name, ...)` go through this table, so caching, training, steering,
evaluation, the SAE splice and the Hub code never ask which library the weights came from.
Name prefixes: `hf:<repo id>` for transformers models, `timm:<model name>` for timm models; every
other name is open_clip's (including its `hf-hub:` and `local-dir:` schemas).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .tower import Tower


@dataclass(frozen=True)
class Family:
    name: str
    description: str  # what it covers, for error messages and the support table
    handles: Callable[[nn.Module], bool]
    tower: Callable[..., Tower]  # (model, model_name=..., preprocess=..., tokenizer=...) -> Tower


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"model family {family.name!r} is already registered")
    FAMILIES.append(family)
    return family


def describe() -> str:
    return "; ".join(f"{f.name} ({f.description})" for f in FAMILIES)


class UnsupportedModelError(TypeError):
    """A model or name no registered family can adapt (raised before any weights are downloaded)."""


def tower_for(model: nn.Module, **kwargs: Any) -> Tower:
    for family in FAMILIES:
        if family.handles(model):
            return family.tower(model, **kwargs)
    raise UnsupportedModelError(f"no model family handles a {type(model).__name__}; supported: {describe()}")


# Short names for common image-only backbones (e.g. the DINOv2 models the paper retrieves VS2++ neighbours with).
ALIASES = {f"dinov2-{size}": f"hf:facebook/dinov2-{size}" for size in ("small", "base", "large")}


def resolve_alias(model_name: str) -> str:
    return ALIASES.get(model_name.lower(), model_name) if model_name else model_name


def load(model_name: str, pretrained: str | None, device: str | torch.device, **kwargs: Any):
    """(library model, preprocess or None, tokenizer or None); unsupported towers are refused first."""
    from . import open_clip_vit

    model_name = resolve_alias(model_name)

    if model_name.startswith("hf:"):
        from . import hf

        return hf.load(model_name[3:], pretrained, device, **kwargs)
    if model_name.startswith("timm:"):
        from . import timm_vit

        return timm_vit.load(model_name[5:], pretrained, device, **kwargs)
    check_open_clip_name(model_name)
    model, preprocess = open_clip_vit.create(model_name, pretrained, device, **kwargs)
    return model, preprocess, None


def check_open_clip_name(model_name: str) -> None:
    """Refuse an open_clip name whose image tower no family adapts, from its config alone."""
    import open_clip

    if ":" in model_name:  # hf-hub: / local-dir: carry their config with the weights
        return
    cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    if cfg is None:
        return  # open_clip itself reports an unknown name, with its list
    reason = unsupported_reason(cfg)
    if reason:
        supported = [n for n in open_clip.list_models() if not name_unsupported_reason(n)]
        near = difflib.get_close_matches(model_name, supported, n=3, cutoff=0.0)  # always name some
        raise UnsupportedModelError(
            f"{model_name}: {reason}. Supported families: {describe()}. "
            + (f"Nearest supported open_clip models: {near}." if near else ""))


@functools.lru_cache(maxsize=None)
def name_unsupported_reason(model_name: str) -> str | None:
    """`unsupported_reason` of a built-in open_clip name, remembered (timm towers are built on the meta
    device to be inspected, ~0.1 s each)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    return "no config" if cfg is None else unsupported_reason(cfg)


def unsupported_reason(cfg: dict) -> str | None:
    """Why an open_clip model config is not supported, or None. Reads the config only (no weights)."""
    v = cfg.get("vision_cfg", {})
    if v.get("timm_model_name"):
        from . import timm_vit

        return timm_vit.unsupported_reason(v["timm_model_name"], pool=v.get("timm_pool", "avg"),
                                           proj=v.get("timm_proj", "linear"))
    if isinstance(v.get("layers"), (list, tuple)):
        return "its image tower is a ResNet (ModifiedResNet), not a ViT"
    for key, what in (("attentional_pool", "attentional pooling"), ("final_ln_after_pool", "final_ln_after_pool")):
        if v.get(key):
            return f"its ViT uses {what}"
    if v.get("pool_type", "tok") != "tok":
        return f"its ViT pools with pool_type={v.get('pool_type')!r}"
    return None


def _register_builtin() -> None:
    from . import open_clip_vit

    register(Family("open_clip_vit", "open_clip's own ViT towers: ViT-B-32, ViT-B-16, ViT-L-14, ... and -quickgelu",
                    open_clip_vit.handles, open_clip_vit.tower))
    try:
        from . import hf, timm_vit
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
