"""The open_clip standard-ViT family (ViT-B-32, ViT-B-16, ViT-L-14, ... and `-quickgelu`): which towers
are supported, building them with the right activation, and the `Tower` of one."""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn as nn
from open_clip.transform import PreprocessCfg, image_transform_v2

from ...core.errors import MissingInputError, UnsupportedError
from ..components import LinearView, fused_thirds
from ..tower import BlockParts, Tower, act_fn_name


def check_standard_vit(visual: nn.Module) -> None:
    """Raise a clear error for towers this wrapper does not reproduce exactly."""
    kind = type(visual).__name__
    if kind != "VisionTransformer":
        raise UnsupportedError(
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
        raise UnsupportedError("HookedCLIP needs a standard CLIP ViT tower; unsupported: " + ", ".join(problems))


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
    kwargs.setdefault("weights_only", True)  # open_clip's default today; explicit, whatever the version
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **kwargs
        )
    except RuntimeError as e:  # open_clip's wording for weights it could neither download nor find cached
        if not str(e).startswith("Failed to download weights"):
            raise
        raise MissingInputError(
            f"cannot get the weights {model_name}/{pretrained}: not in the Hugging Face cache, and the Hub "
            "cannot be reached (offline, or HF_HUB_OFFLINE is set); download them once with network, or pass "
            "local weights (--pretrained FILE, --model local-dir:DIR; --random-weights for none)") from None
    return model, preprocess


def handles(model: nn.Module) -> bool:
    return type(getattr(model, "visual", None)).__name__ == "VisionTransformer"


def _block_parts(block: nn.Module) -> BlockParts:
    mha = block.attn
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise UnsupportedError("unsupported nn.MultiheadAttention (separate q/k/v projections, bias_k or add_zero_attn)")
    d = mha.embed_dim
    q, k, v = fused_thirds(mha, d, "in_proj_weight", "in_proj_bias")
    fused = LinearView(mha, "in_proj_weight", "in_proj_bias")
    attn = dict(n_heads=mha.num_heads, d_head=mha.head_dim, q=q, k=k, v=v, out=mha.out_proj, fused_qkv=fused)
    return BlockParts(ln1=block.ln_1, attn=attn, ln2=block.ln_2, fc1=block.mlp.c_fc, act=block.mlp.gelu,
                      fc2=block.mlp.c_proj, ls1=block.ls_1, ls2=block.ls_2)


def default_tokenizer(model_name: str, clip_model: nn.Module):
    context_length = open_clip.get_model_tokenize_cfg(clip_model).get("context_length")
    try:
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    except Exception:  # unknown custom name: CLIP's BPE tokenizer is the open_clip default
        return open_clip.SimpleTokenizer(context_length=context_length or 77)


def encode_text(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's `encode_text`, trimmed to the longest prompt in the batch.

    Prompts are padded to 77 tokens, but CLIP's text tower is causal and pools the EOT token, so
    positions after the last EOT cannot change the result. Dropping them makes prompt ensembles
    (80 templates x 200 classes) several times cheaper. Other text towers run unchanged.
    """
    trimmable = (type(clip).__name__ == "CLIP" and getattr(clip, "text_pool_type", None) == "argmax"
                 and getattr(clip, "attn_mask", None) is not None)
    if not trimmable:
        return clip.encode_text(tokens)
    n = int(tokens.argmax(dim=-1).max()) + 1  # EOT has the highest token id
    tokens = tokens[:, :n]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:n].to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


def tower(clip_model: nn.Module, model_name: str = "custom", preprocess=None, tokenizer=None) -> Tower:
    v = clip_model.visual
    check_standard_vit(v)

    def patch_embed(images: torch.Tensor) -> torch.Tensor:
        x = v.conv1(images.to(v.conv1.weight.dtype))
        return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)

    def add_tokens(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return v.patch_dropout(torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype))

    image_size = tuple(v.image_size)
    return Tower(
        family="open_clip_vit", library_model=clip_model, patch_embed=patch_embed, add_tokens=add_tokens,
        blocks=[_block_parts(b) for b in v.transformer.resblocks], ln_pre=v.ln_pre, ln_final=v.ln_post,
        pool=lambda x: x[:, 0], pooling="cls",
        project=lambda pooled: pooled @ v.proj if v.proj is not None else pooled,
        n_prefix_tokens=1, has_cls_token=True, n_tokens=v.positional_embedding.shape[0],
        image_size=image_size[0] if image_size[0] == image_size[1] else image_size, patch_size=v.patch_size[0],
        embed_dim=v.proj.shape[1] if v.proj is not None else v.class_embedding.shape[-1],
        act_fn=act_fn_name(v.transformer.resblocks[0].mlp.gelu),
        preprocess=preprocess or image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip_model)),
                                                    is_train=False),
        library_forward=clip_model.encode_image, vision_modules=[v],
        encode_text=lambda tokens: encode_text(clip_model, tokens),
        tokenizer=tokenizer or default_tokenizer(model_name, clip_model),
        logit_scale=lambda: float(clip_model.logit_scale.detach().exp()),
    )
