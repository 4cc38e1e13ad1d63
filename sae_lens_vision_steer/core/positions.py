"""Which token positions `cls`, `patches` and `all` name on a model, for every family.

`cls` is position 0 where the model has a CLS token; a model without one (SigLIP) has no CLS token at
a block hook, so `cls` there is refused with a pointer to its pooled token (`hook_pooled`), which is
what such a model's image embedding is made from. `patches` are the tokens after the prefix (CLS and
register tokens). The pooled hooks (`hook_ln_post`, `hook_pooled`, `hook_image_embed`) hold one vector
per image and take `cls` only.
"""

from __future__ import annotations

from typing import Any

from .errors import UsageError

POSITION_NAMES = ("cls", "patches", "all")
POOLED_HOOKS = ("hook_ln_post", "hook_pooled", "hook_image_embed")  # [B, width]: no position dimension


def position_index(cfg: Any, positions: str, hook_name: str | None = None) -> slice:
    """The token slice `positions` names on a block hook of a model with config `cfg`."""
    if positions == "all":
        return slice(None)
    if positions == "patches":
        return slice(getattr(cfg, "n_prefix_tokens", 1), None)
    if positions == "cls":
        if not getattr(cfg, "has_cls_token", True):
            where = f" at {hook_name!r}" if hook_name else ""
            raise UsageError(f"{cfg.model_name} has no CLS token{where} (it pools with {cfg.pooling!r}); "
                             "use its pooled token, hook 'hook_pooled', with positions='cls'")
        return slice(0, 1)
    raise UsageError(f"positions must be one of {POSITION_NAMES}, got {positions!r}")
