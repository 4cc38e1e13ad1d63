"""`HookedCLIPConfig`: a TransformerLens `HookedTransformerConfig` with the image tower's own fields.

Being a real `HookedTransformerConfig` is what lets TL's utilities (`ActivationCache.decompose_resid`,
`apply_ln_to_stack`, `stack_head_results`, `transformer_lens.patching`, ...) read `n_layers`,
`n_heads`, `d_head`, `d_mlp`, `normalization_type`, `device` and the rest unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformer_lens import HookedTransformerConfig


@dataclass
class HookedCLIPConfig(HookedTransformerConfig):
    pretrained: str | None = None
    embed_dim: int = 0  # width of the image embedding after the projection
    n_tokens: int = 0  # 1 (CLS) + number of patches; equals n_ctx
    image_size: int | tuple[int, int] = 0  # as open_clip's vision config gives it
    patch_size: int = 0
    model_kwargs: dict | None = None  # extra open_clip.create_model arguments (architecture overrides)
    family: str = "open_clip_vit"  # the registry family that adapted the model
    pooling: str = "cls"  # how the image embedding pools the tokens: cls | map (attention pool) | mean
    n_prefix_tokens: int = 1  # CLS and register tokens before the patches
    has_cls_token: bool = True  # position 0 is a CLS token (SigLIP has none)

    @classmethod
    def build(cls, act_fn: str, **fields) -> "HookedCLIPConfig":
        # TL validates act_fn against its own list, which has no QuickGELU; the block runs open_clip's
        # own activation module, so the name only records which one it is.
        cfg = cls(act_fn="gelu", **fields)
        cfg.act_fn = act_fn
        return cfg
