"""Loading by name, and finding the family that adapts a built model (the families are in `families/`).

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
import os
import pickle
from typing import Any

import torch
import torch.nn as nn

from ..core.errors import InputError, MissingInputError, UnknownNameError
from .families import (  # noqa: F401  (the registry's API)
    FAMILIES,
    Family,
    UnsupportedModelError,
    describe,
    open_clip_vit,
    register,
)
from .tower import Tower


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
    """(library model, preprocess or None, tokenizer or None); unsupported towers are refused first. Pickle
    checkpoints are read with `torch.load(weights_only=True)` only (the libraries' default, made explicit for
    open_clip); one that needs more (a pickle that would run code) is refused as an `InputError`."""
    try:
        return _load(resolve_alias(model_name), pretrained, device, **kwargs)
    except Exception as e:
        refused = refused_checkpoint(e, pretrained)
        if refused is None:
            raise
        what = f"pretrained {pretrained}" if pretrained and os.path.isfile(pretrained) else f"model {model_name}"
        raise InputError(f"{what}: its weights file cannot be read as data only ({refused}); pickle checkpoints are "
                         "loaded with torch.load(weights_only=True), which refuses one that would run code. Use a "
                         "safetensors file, or a plain state-dict checkpoint") from None


def _load(model_name: str, pretrained: str | None, device: str | torch.device, **kwargs: Any):
    if model_name.startswith("hf:"):
        from .families import hf

        return hf.load(model_name[3:], pretrained, device, **kwargs)
    if model_name.startswith("timm:"):
        from .families import timm_vit

        return timm_vit.load(model_name[5:], pretrained, device, **kwargs)
    check_open_clip_name(model_name, pretrained)
    model, preprocess = open_clip_vit.create(model_name, pretrained, device, **kwargs)
    return model, preprocess, None


def refused_checkpoint(e: BaseException, pretrained: str | None) -> str | None:
    """The first line of the reason a checkpoint was refused by `torch.load(weights_only=True)` (or was not a
    checkpoint at all), found along the exception's chain; None for any other error."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 10:
        if isinstance(cur, pickle.UnpicklingError):
            lines = [ln.strip() for ln in str(cur).splitlines() if ln.strip()] or [type(cur).__name__]
            why = next((ln for ln in lines if ln.startswith("Unsupported")), None)  # torch's reason, if it gave one
            if why is None:
                why = lines[0] if len(lines) == 1 else "torch.load(weights_only=True) refused it"
            return why[:300]
        text = str(cur)
        if (isinstance(cur, RuntimeError) and pretrained and os.path.isfile(pretrained)
                and ("magic number" in text or "PytorchStreamReader" in text)):
            return f"not a torch checkpoint: {text.splitlines()[0][:200]}"
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return None


def nearest(word: str, names: list[str], n: int = 3) -> list[str]:
    """The `n` names closest to `word` (difflib; case-insensitive), always some when there are names."""
    lower = {name.lower(): name for name in names}
    return [lower[m] for m in difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=0.0)]


def check_open_clip_name(model_name: str, pretrained: str | None = None) -> None:
    """Refuse, from open_clip's lists alone (before any download), an unknown open_clip model name, an
    unknown pretrained tag (not a checkpoint file either), or a model whose image tower no family adapts.
    Unknown names and tags are `UnknownNameError`s naming the three nearest known ones."""
    import os

    import open_clip

    if ":" in model_name:  # hf-hub: / local-dir: carry their config with the weights
        return
    name = model_name.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UnknownNameError(
            f"unknown open_clip model {model_name!r}; nearest: "
            f"{', '.join(nearest(model_name, open_clip.list_models()))} "
            "(all: python -c 'import open_clip; print(open_clip.list_models())'; or hf:REPO, timm:NAME, "
            "local-dir:DIR)")
    if pretrained and ":" not in pretrained and not os.path.exists(os.path.expanduser(pretrained)):
        if "/" in pretrained or os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise MissingInputError(f"checkpoint file {pretrained} (--pretrained) does not exist")
    if pretrained and ":" not in pretrained and not os.path.exists(os.path.expanduser(pretrained)) \
            and not open_clip.get_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        hint = (f"nearest tags of {model_name}: {', '.join(nearest(pretrained, tags))}" if tags
                else f"{model_name} has no pretrained tags in open_clip")
        raise UnknownNameError(
            f"unknown pretrained tag {pretrained!r} for {model_name} (and no such checkpoint file); {hint} "
            f"(all: open_clip.list_pretrained_tags_by_model({name!r}); --random-weights for none)")
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
        from .families import timm_vit

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
