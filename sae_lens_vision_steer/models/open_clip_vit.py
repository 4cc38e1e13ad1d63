"""The open_clip standard-ViT family: which towers are supported, building them with the right
activation, and reading their configuration."""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn as nn

from .config import HookedCLIPConfig


def check_standard_vit(visual: nn.Module) -> None:
    """Raise a clear error for towers this wrapper does not reproduce exactly."""
    kind = type(visual).__name__
    if kind != "VisionTransformer":
        raise TypeError(
            f"HookedCLIP supports open_clip models with a standard ViT image tower "
            f"(ViT-B-32, ViT-B-16, ViT-L-14 and their -quickgelu variants); this model's image "
            f"tower is a {kind} (e.g. a ResNet, ConvNeXt or timm tower)."
        )
    problems = []
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attentional pooling")
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"pool_type={visual.pool_type!r} (expected 'tok', the CLS token)")
    if getattr(visual, "final_ln_after_pool", False):
        problems.append("final_ln_after_pool=True")
    if not getattr(visual.transformer, "batch_first", True):
        problems.append("batch_first=False")
    blocks = list(visual.transformer.resblocks)
    if blocks and type(blocks[0]).__name__ != "ResidualAttentionBlock":
        problems.append(f"block type {type(blocks[0]).__name__}")
    if problems:
        raise TypeError("HookedCLIP needs a standard CLIP ViT tower; unsupported: " + ", ".join(problems))


def tag_wants_quick_gelu(model_name: str, pretrained: str | None) -> bool:
    """Whether open_clip's registry says the weights of this pretrained tag were trained with QuickGELU.

    open_clip builds `ViT-B-32` with plain GELU even for the `openai` tag and only warns; loading the
    OpenAI weights into that network gives a slightly different model. `hf-hub:`/`local-dir:` models and
    checkpoint files carry their own config and are built as it says.
    """
    if not pretrained or ":" in model_name:
        return False
    return bool(open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained).get("quick_gelu", False))


def create(model_name: str, pretrained: str | None, device: str | torch.device, **kwargs: Any):
    """`open_clip.create_model_and_transforms`, with QuickGELU forced when the pretrained tag needs it."""
    if tag_wants_quick_gelu(model_name, pretrained):
        kwargs.setdefault("force_quick_gelu", True)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, **kwargs
    )
    return model, preprocess


def act_fn_name(act: nn.Module) -> str:
    """TransformerLens-style name of an open_clip MLP activation module."""
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    return type(act).__name__.lower()


def build_config(clip_model: nn.Module, model_name: str, pretrained: str | None, device: torch.device,
                 use_attn_result: bool = False, model_kwargs: dict | None = None) -> HookedCLIPConfig:
    visual = clip_model.visual
    block0 = visual.transformer.resblocks[0]
    d_model = visual.class_embedding.shape[-1]
    n_heads = block0.attn.num_heads
    image_size = tuple(visual.image_size)
    return HookedCLIPConfig.build(
        act_fn=act_fn_name(block0.mlp.gelu),
        model_name=model_name,
        pretrained=pretrained,
        n_layers=len(visual.transformer.resblocks),
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=block0.mlp.c_fc.out_features,
        n_ctx=visual.positional_embedding.shape[0],
        d_vocab=-1,
        eps=block0.ln_1.eps,
        normalization_type="LN",
        positional_embedding_type="standard",
        attention_dir="bidirectional",
        post_embedding_ln=True,  # open_clip's ln_pre
        original_architecture=f"open_clip.{type(clip_model).__name__}",
        use_attn_result=use_attn_result,
        device=str(device),
        dtype=visual.class_embedding.dtype,
        embed_dim=visual.proj.shape[1] if visual.proj is not None else d_model,
        n_tokens=visual.positional_embedding.shape[0],
        image_size=image_size[0] if image_size[0] == image_size[1] else image_size,
        patch_size=visual.patch_size[0],
        model_kwargs=model_kwargs or None,
    )
