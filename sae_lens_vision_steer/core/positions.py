"""Token positions, in one place: the names `cls`, `patches` and `all` (or a list of token indices), what they
select on a model of any family, and how SAELens records them (`seqpos_slice`).

`cls` is position 0 where the model has a CLS token; a model without one (SigLIP) has no CLS token at
a block hook, so `cls` there is refused with a pointer to its pooled token (`hook_pooled`), which is
what such a model's image embedding is made from. `patches` are the tokens after the prefix (CLS and
register tokens). The pooled hooks (`hook_ln_post`, `hook_pooled`, `hook_image_embed`) hold one vector
per image and take `cls` only.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, Union

from .errors import UsageError

POSITION_NAMES = ("cls", "patches", "all")
PositionName = Literal["cls", "patches", "all"]
Positions = Union[str, Sequence[int]]  # a name, or explicit token indices
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


def check_positions(positions: Positions) -> str | tuple[int, ...]:
    """A position name, or a non-empty tuple of token indices; anything else is refused."""
    if isinstance(positions, str):
        if positions not in POSITION_NAMES:
            raise UsageError(f"positions must be 'cls', 'all', 'patches' or a list of token indices, got {positions!r}")
        return positions
    idx = list(positions)
    if not idx or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise UsageError(f"positions must be a non-empty list of token indices, got {positions!r}")
    return tuple(idx)


def positions_label(positions: Positions) -> str:
    """`"cls"`, `"patches"` or `"all"` for a positions argument (a name or a list of token indices)."""
    if isinstance(positions, str):
        return positions
    idx = set(positions)
    return "cls" if idx == {0} else ("patches" if 0 not in idx else "all")


def token_set(positions: Positions, n_tokens: int, n_prefix_tokens: int = 1) -> set[int]:
    """The token indices `positions` covers on a sequence of `n_tokens` with `n_prefix_tokens` CLS and
    register tokens (negative indices count from the end)."""
    if isinstance(positions, str):
        check_positions(positions)
        return {"cls": {0}, "patches": set(range(n_prefix_tokens, n_tokens)),
                "all": set(range(n_tokens))}[positions]
    return {int(p) % n_tokens for p in positions}


def seqpos_slice(positions: str, n_prefix_tokens: int = 1) -> list[int | None] | None:
    """SAELens' `seqpos_slice` for a position name: `cls` [0, 1], `patches` [n_prefix, None] (after the CLS
    and register tokens), `all` [None]."""
    return {"cls": [0, 1], "patches": [n_prefix_tokens, None], "all": [None]}.get(positions)


def select_positions(act: Any, positions: str, n_prefix_tokens: int = 1) -> Any:
    """`[B, T, D]` (or `[B, D]` for pooled hooks) -> rows `[B * P, D]`, image-major. `patches` are the
    tokens after the `n_prefix_tokens` CLS and register tokens."""
    if act.ndim == 2:
        return act  # pooled hooks: one vector per image
    if positions == "cls":
        return act[:, 0]
    if positions == "patches":
        return act[:, n_prefix_tokens:].reshape(-1, act.shape[-1])
    return act.reshape(-1, act.shape[-1])
