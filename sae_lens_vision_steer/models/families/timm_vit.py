"""timm VisionTransformer towers: open_clip's timm-tower models (SigLIP, SigLIP2, ...) and timm models
used directly as image-only backbones (`timm:vit_base_patch14_dinov2`).

What "the final CLS token" is here: the CLS token when the tower pools with `token`; otherwise the
pooled token `hook_pooled` — the attention-pool output for SigLIP's `map` head (the pool is run as
timm's own module, a black box), the mean of the patch tokens for `avg`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...core.errors import UnsupportedError
from ..components import LinearView, fused_thirds
from ..tower import BlockParts, Tower, act_fn_name

POOLS = {"token": "cls", "map": "map", "avg": "mean"}


def _is_identity(m: nn.Module | None) -> bool:
    return m is None or isinstance(m, nn.Identity)


def trunk_problems(trunk: nn.Module) -> list[str]:
    """What a timm model has that this adapter does not reproduce exactly (empty: supported)."""
    kind = type(trunk).__name__
    if kind != "VisionTransformer":
        what = {"Eva": "an Eva ViT with rotary position embeddings (EVA02, PE-Core)"}.get(kind, f"a {kind}, not a ViT")
        return [what]
    problems = []
    blocks = list(trunk.blocks)
    if blocks and type(blocks[0]).__name__ != "Block":
        problems.append(f"block type {type(blocks[0]).__name__}")
    for b in blocks[:1]:
        a = getattr(b, "attn", None)
        if type(a).__name__ != "Attention":
            problems.append(f"attention type {type(a).__name__}")
        elif not _is_identity(getattr(a, "norm", None)) or getattr(a, "gate", None) is not None:
            problems.append("scaled or gated attention output")
        if type(getattr(b, "mlp", None)).__name__ != "Mlp" or not _is_identity(getattr(b.mlp, "norm", None)):
            problems.append(f"MLP type {type(getattr(b, 'mlp', None)).__name__} (gated MLPs are not supported)")
    pool = "map" if trunk.attn_pool is not None else trunk.global_pool
    if pool not in POOLS:
        problems.append(f"global_pool={pool!r} (supported: token, map, avg)")
    if not _is_identity(getattr(trunk, "fc_norm", None)):
        problems.append("a norm after pooling (fc_norm)")
    return problems


def unsupported_reason(timm_name: str, pool: str = "avg", proj: str = "linear") -> str | None:
    """From the timm model's structure, built on the meta device (no weights, nothing downloaded)."""
    import timm

    custom_pool = pool in ("abs_attn", "rot_attn", "")
    try:
        with torch.device("meta"):
            try:
                trunk = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool=pool)
            except Exception:  # noqa: BLE001 - not every architecture takes every pool name
                trunk = timm.create_model(timm_name, pretrained=False, num_classes=0)
    except Exception as e:  # noqa: BLE001 - any failure to even build it means: not supported
        return f"its timm tower {timm_name!r} could not be inspected ({type(e).__name__}: {e})"
    problems = trunk_problems(trunk)
    if type(trunk).__name__ != "VisionTransformer":
        return f"its timm tower is {problems[0]}"
    if custom_pool:
        problems = [f"open_clip pooling {pool!r}"]
    elif proj == "mlp":
        problems.append("an MLP projection head")
    return "its timm tower has " + ", ".join(problems) if problems else None


def _block_parts(b: nn.Module) -> BlockParts:
    a = b.attn
    q, k, v = fused_thirds(a.qkv, a.num_heads * a.head_dim)
    attn = dict(n_heads=a.num_heads, d_head=a.head_dim, q=q, k=k, v=v, out=a.proj, fused_qkv=LinearView(a.qkv),
                q_norm=None if _is_identity(a.q_norm) else a.q_norm,
                k_norm=None if _is_identity(a.k_norm) else a.k_norm, scale=a.scale)
    return BlockParts(ln1=b.norm1, attn=attn, ln2=b.norm2, fc1=b.mlp.fc1, act=b.mlp.act, fc2=b.mlp.fc2,
                      ls1=b.ls1, ls2=b.ls2)


def _trunk_tower(trunk: nn.Module, library_model: nn.Module, family: str, project, embed_dim: int,
                 preprocess, library_forward, **text: Any) -> Tower:
    problems = trunk_problems(trunk)
    if problems:
        raise UnsupportedError(f"unsupported timm tower: {', '.join(problems)}")
    n_prefix = trunk.num_prefix_tokens
    pooling = POOLS["map" if trunk.attn_pool is not None else trunk.global_pool]

    def patch_embed(images: torch.Tensor) -> torch.Tensor:
        x = trunk.patch_embed(images)
        return x.flatten(1, 2) if x.ndim == 4 else x  # dynamic_img_size gives [B, H, W, C]

    def add_tokens(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
        # timm's own prefix/position logic (class and register tokens, no_embed_class, ...).
        if getattr(trunk, "dynamic_img_size", False):
            g = trunk.patch_embed.grid_size
            x = x.view(x.shape[0], g[0], g[1], x.shape[-1])
        return trunk.patch_drop(trunk._pos_embed(x))

    def pool(x: torch.Tensor) -> torch.Tensor:
        if pooling == "map":
            return trunk.attn_pool(x if trunk.pool_include_prefix else x[:, n_prefix:])
        if pooling == "mean":
            return (x if trunk.pool_include_prefix else x[:, n_prefix:]).mean(dim=1)
        return x[:, 0]

    grid = trunk.patch_embed.grid_size
    img = trunk.patch_embed.img_size
    return Tower(
        family=family, library_model=library_model, patch_embed=patch_embed, add_tokens=add_tokens,
        blocks=[_block_parts(b) for b in trunk.blocks],
        ln_pre=None if _is_identity(trunk.norm_pre) else trunk.norm_pre,
        ln_final=None if _is_identity(trunk.norm) else trunk.norm, pool=pool, pooling=pooling, project=project,
        n_prefix_tokens=n_prefix, has_cls_token=trunk.cls_token is not None, n_tokens=n_prefix + grid[0] * grid[1],
        image_size=img[0] if img[0] == img[1] else tuple(img), patch_size=trunk.patch_embed.patch_size[0],
        embed_dim=embed_dim, act_fn=act_fn_name(trunk.blocks[0].mlp.act), preprocess=preprocess,
        library_forward=library_forward, **text)


# ---------------------------------------------------------------------------------- open_clip timm towers
def handles_open_clip(model: nn.Module) -> bool:
    v = getattr(model, "visual", None)
    return type(v).__name__ == "TimmModel" and type(getattr(v, "trunk", None)).__name__ == "VisionTransformer"


def open_clip_tower(model: nn.Module, model_name: str = "custom", preprocess=None, tokenizer=None) -> Tower:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from .open_clip_vit import default_tokenizer

    v = model.visual

    def project(pooled: torch.Tensor) -> torch.Tensor:  # TimmModel.forward after the trunk's pool
        return v.head(v.trunk.head(pooled))

    return _trunk_tower(
        v.trunk, model, "open_clip_timm_vit", project=project, embed_dim=_out_width(project, v.trunk, model),
        preprocess=preprocess or image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)),
                                                    is_train=False),
        library_forward=model.encode_image, vision_modules=[v], encode_text=model.encode_text,
        tokenizer=tokenizer or default_tokenizer(model_name, model),
        logit_scale=lambda: float(model.logit_scale.detach().exp()),
    )


def _out_width(project, trunk: nn.Module, model: nn.Module) -> int:
    p = next(model.parameters())
    with torch.no_grad():
        return project(torch.zeros(1, trunk.num_features, device=p.device, dtype=p.dtype)).shape[-1]


# ---------------------------------------------------------------------------------- timm models directly
def handles(model: nn.Module) -> bool:
    return type(model).__name__ == "VisionTransformer" and hasattr(model, "patch_embed") and hasattr(model, "blocks")


def tower(model: nn.Module, model_name: str = "custom", preprocess=None, tokenizer=None) -> Tower:  # noqa: ARG001
    import timm

    if preprocess is None:
        data_cfg = timm.data.resolve_data_config(model=model)
        # timm resolves the transform from the pretrained config; a model built with another img_size
        # needs its own input size.
        data_cfg["input_size"] = (3, *model.patch_embed.img_size)
        preprocess = timm.data.create_transform(**data_cfg, is_training=False)
    return _trunk_tower(model, model, "timm_vit", project=model.head, embed_dim=_out_width(model.head, model, model),
                        preprocess=preprocess, library_forward=model, vision_modules=[model])


def load(name: str, pretrained: str | None, device: str | torch.device, **kwargs: Any):
    """`timm:<name>`: random weights with `pretrained=None`, timm's pretrained weights (from the Hub) with
    any tag, or a checkpoint file."""
    import os

    import timm

    reason = unsupported_reason(name, pool=kwargs.get("global_pool", "token"), proj="none")
    if reason and "could not be inspected" not in reason:
        from .base import UnsupportedModelError, describe

        raise UnsupportedModelError(f"timm:{name}: {reason}. Supported families: {describe()}")
    kwargs.setdefault("num_classes", 0)
    if pretrained and os.path.isfile(pretrained):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": pretrained}, **kwargs)
    else:
        model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    return model.to(device).eval(), None, None
