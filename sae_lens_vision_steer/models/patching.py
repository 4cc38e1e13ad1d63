"""TransformerLens activation patching for images.

TL's `transformer_lens.patching` functions take the number of positions from `tokens.shape[-1]`, which
for an image batch `[B, C, H, W]` is the image width, not the token count. These helpers call TL's own
`generic_activation_patch` with the index built from `model.cfg` (layers x tokens, or layers x heads)
and return the same grid TL's functions return.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from transformer_lens import ActivationCache
from transformer_lens import patching as tl


def activation_patch(model, corrupted_images: torch.Tensor, clean_cache: ActivationCache,
                     metric: Callable[[torch.Tensor], torch.Tensor], patch_setter: Callable, activation_name: str,
                     index_axis_names: Sequence[str] = ("layer", "pos")) -> torch.Tensor:
    """TL's `generic_activation_patch` over every (layer, position) or (layer, head) of a `HookedCLIP`."""
    sizes = {"layer": model.cfg.n_layers, "pos": model.cfg.n_tokens, "head_index": model.cfg.n_heads,
             "head": model.cfg.n_heads}
    ranges = [sizes[a] for a in index_axis_names]
    index_df = tl.make_df_from_ranges(ranges, list(index_axis_names))
    flat = tl.generic_activation_patch(model, corrupted_images, clean_cache, metric, patch_setter, activation_name,
                                       index_df=index_df)
    return flat.reshape(ranges)


get_act_patch_resid_pre = partial(activation_patch, patch_setter=tl.layer_pos_patch_setter,
                                  activation_name="resid_pre")
get_act_patch_resid_mid = partial(activation_patch, patch_setter=tl.layer_pos_patch_setter,
                                  activation_name="resid_mid")
get_act_patch_attn_out = partial(activation_patch, patch_setter=tl.layer_pos_patch_setter, activation_name="attn_out")
get_act_patch_mlp_out = partial(activation_patch, patch_setter=tl.layer_pos_patch_setter, activation_name="mlp_out")
get_act_patch_attn_head_out_all_pos = partial(activation_patch, patch_setter=tl.layer_head_vector_patch_setter,
                                              activation_name="z", index_axis_names=("layer", "head"))
