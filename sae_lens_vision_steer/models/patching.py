"""TransformerLens activation patching for images: every `transformer_lens.patching.get_act_patch_*`.

TL's functions take the number of positions from `tokens.shape[-1]`, which for an image batch
`[B, C, H, W]` is the image width, not the token count: they raise an IndexError when the width exceeds
the token count and silently leave tokens out when it is smaller (ViT-L/14 at 224 px: 257 tokens, 224
columns). Each function here has the name and the result of TL's, and calls TL's own
`generic_activation_patch` with TL's patch setter and axes, the index built from `model.cfg` instead
(`pos`, `dest_pos`, `src_pos`: `n_tokens`; `head`: `n_heads`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import einops
import torch
from transformer_lens import ActivationCache
from transformer_lens import patching as tl


def activation_patch(model, corrupted_images: torch.Tensor, clean_cache: ActivationCache,
                     metric: Callable[[torch.Tensor], torch.Tensor], patch_setter: Callable, activation_name: str,
                     index_axis_names: Sequence[str] = ("layer", "pos")) -> torch.Tensor:
    """TL's `generic_activation_patch` over every index of `index_axis_names` of a `HookedCLIP`."""
    n_tokens, n_heads = model.cfg.n_tokens, model.cfg.n_heads
    sizes = {"layer": model.cfg.n_layers, "pos": n_tokens, "dest_pos": n_tokens, "src_pos": n_tokens,
             "head_index": n_heads, "head": n_heads}
    ranges = [sizes[a] for a in index_axis_names]
    index_df = tl.make_df_from_ranges(ranges, list(index_axis_names))
    flat = tl.generic_activation_patch(model, corrupted_images, clean_cache, metric, patch_setter, activation_name,
                                       index_df=index_df)
    return flat.reshape(ranges)


def _like(tl_function: partial) -> partial:
    """`activation_patch` with the patch setter, activation and axes of one of TL's `get_act_patch_*`."""
    kw = tl_function.keywords
    return partial(activation_patch, patch_setter=kw["patch_setter"], activation_name=kw["activation_name"],
                   index_axis_names=tuple(kw["index_axis_names"]))


# [layer, pos]
get_act_patch_resid_pre = _like(tl.get_act_patch_resid_pre)
get_act_patch_resid_mid = _like(tl.get_act_patch_resid_mid)
get_act_patch_attn_out = _like(tl.get_act_patch_attn_out)
get_act_patch_mlp_out = _like(tl.get_act_patch_mlp_out)
# [layer, pos, head]
get_act_patch_attn_head_out_by_pos = _like(tl.get_act_patch_attn_head_out_by_pos)
get_act_patch_attn_head_q_by_pos = _like(tl.get_act_patch_attn_head_q_by_pos)
get_act_patch_attn_head_k_by_pos = _like(tl.get_act_patch_attn_head_k_by_pos)
get_act_patch_attn_head_v_by_pos = _like(tl.get_act_patch_attn_head_v_by_pos)
# [layer, head, dest_pos] and [layer, head, dest_pos, src_pos]
get_act_patch_attn_head_pattern_by_pos = _like(tl.get_act_patch_attn_head_pattern_by_pos)
get_act_patch_attn_head_pattern_dest_src_pos = _like(tl.get_act_patch_attn_head_pattern_dest_src_pos)
# [layer, head] (all positions at once: no position axis, wrapped so one module serves every kind)
get_act_patch_attn_head_out_all_pos = _like(tl.get_act_patch_attn_head_out_all_pos)
get_act_patch_attn_head_q_all_pos = _like(tl.get_act_patch_attn_head_q_all_pos)
get_act_patch_attn_head_k_all_pos = _like(tl.get_act_patch_attn_head_k_all_pos)
get_act_patch_attn_head_v_all_pos = _like(tl.get_act_patch_attn_head_v_all_pos)
get_act_patch_attn_head_pattern_all_pos = _like(tl.get_act_patch_attn_head_pattern_all_pos)


def get_act_patch_block_every(model, corrupted_images, clean_cache, metric) -> torch.Tensor:
    """TL's `get_act_patch_block_every`: `[3, layer, pos]` for resid_pre, attn_out and mlp_out."""
    return torch.stack([f(model, corrupted_images, clean_cache, metric) for f in
                        (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)])


def get_act_patch_attn_head_all_pos_every(model, corrupted_images, clean_cache, metric) -> torch.Tensor:
    """TL's `get_act_patch_attn_head_all_pos_every`: `[5, layer, head]` for out, q, k, v and pattern."""
    return torch.stack([f(model, corrupted_images, clean_cache, metric) for f in (
        get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos, get_act_patch_attn_head_k_all_pos,
        get_act_patch_attn_head_v_all_pos, get_act_patch_attn_head_pattern_all_pos)])


def get_act_patch_attn_head_by_pos_every(model, corrupted_images, clean_cache, metric) -> torch.Tensor:
    """TL's `get_act_patch_attn_head_by_pos_every`: `[5, layer, pos, head]` for out, q, k, v and pattern
    (the pattern's destination position as `pos`)."""
    results = [f(model, corrupted_images, clean_cache, metric) for f in (
        get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos, get_act_patch_attn_head_k_by_pos,
        get_act_patch_attn_head_v_by_pos)]
    pattern = get_act_patch_attn_head_pattern_by_pos(model, corrupted_images, clean_cache, metric)
    results.append(einops.rearrange(pattern, "layer head pos -> layer pos head"))
    return torch.stack(results)
