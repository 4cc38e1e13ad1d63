"""Does an SAE belong to this model? Its recorded model, weights and activation function against `model.cfg`."""

from __future__ import annotations

import warnings
from typing import Any

from sae_lens import SAE

from ..core.errors import UsageError
from ..models.families.open_clip_vit import tag_wants_quick_gelu


def _base_name(model_name: str) -> str:
    return model_name[: -len("-quickgelu")] if model_name.endswith("-quickgelu") else model_name


def check_sae_matches_model(sae: SAE, model: Any) -> None:
    """Refuse an SAE whose metadata records another model or another activation function; warn on other weights.

    `ViT-B-32` and `ViT-B-32-quickgelu` name one architecture; the activation is compared on its own.
    Fields the SAE (or the model, e.g. a wrapped `custom` one) does not record are not compared. An SAE
    that records no activation but names a model and tag that need QuickGELU was made before this
    package built such models with it, on a slightly different (GELU) network: a warning says so.
    """
    meta, cfg = sae.cfg.metadata, model.cfg
    diffs = []
    name = meta.get("model_name")
    known = cfg.model_name not in (None, "custom")
    if name and known and _base_name(name) != _base_name(cfg.model_name):
        diffs.append(f"model {name!r} (this model: {cfg.model_name!r})")
    if known and "pretrained" in meta and meta.get("pretrained") != cfg.pretrained:
        # Same network, other weights (a fine-tune, random weights in a test): allowed, but said.
        warnings.warn(f"this SAE was trained on weights {meta.get('pretrained')!r}; this model has "
                      f"{cfg.pretrained!r}", stacklevel=3)
    recorded_family = (meta.get("model_config") or {}).get("family")
    if recorded_family and recorded_family != getattr(cfg, "family", recorded_family):
        diffs.append(f"model family {recorded_family!r} (this model: {cfg.family!r})")
    act = meta.get("act_fn")
    if act and act != cfg.act_fn:
        diffs.append(f"activation {act!r} (this model: {cfg.act_fn!r})")
    if diffs:
        raise UsageError("this SAE was trained on a different model: " + "; ".join(diffs)
                         + ". Load the model it names, or pass check_model=False to use it anyway.")
    if not act and name and meta.get("pretrained"):
        try:
            stale = tag_wants_quick_gelu(name, meta["pretrained"]) and not name.endswith("-quickgelu")
        except Exception:  # a name or tag open_clip does not know
            stale = False
        if stale:
            warnings.warn(f"this SAE records no activation function; {name}/{meta['pretrained']} was built with "
                          "plain GELU before version 0.2 (the weights need QuickGELU), so it was trained on a "
                          "slightly different network. Retrain it to be exact.", stacklevel=3)
