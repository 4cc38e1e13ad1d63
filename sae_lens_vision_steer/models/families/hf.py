"""transformers towers: `CLIPModel` / `CLIPVisionModelWithProjection`, `SiglipModel` / `SiglipVisionModel`,
and `Dinov2Model` as an image-only backbone. Loaded by name as `hf:<repo id>`.

What "the final CLS token" is here: CLIP and DINOv2 pool the CLS token (after the final norm:
`hook_ln_post`); SigLIP has no CLS token and pools with its attention-pooling head, whose output is
`hook_pooled` (the head runs as transformers' own module).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...core.errors import UnsupportedError
from ..tower import BlockParts, Tower, act_fn_name

TEXT_MODEL_TYPES = {"clip", "siglip"}
IMAGE_MODEL_TYPES = {"clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2"}
CLIP_CLASSES = ("CLIPModel", "CLIPVisionModelWithProjection", "CLIPVisionModel", "SiglipModel", "SiglipVisionModel")


def _features(out: Any) -> torch.Tensor:  # transformers 5 returns an output object from get_*_features
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _block_parts(layer: nn.Module, attn: nn.Module, ln1, ln2, ls1=None, ls2=None, out_name="out_proj") -> BlockParts:
    n_heads = attn.num_heads if hasattr(attn, "num_heads") else attn.config.num_attention_heads
    d_head = attn.head_dim
    scale = getattr(attn, "scale", getattr(attn, "scaling", d_head ** -0.5))
    parts = dict(n_heads=n_heads, d_head=d_head, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj,
                 out=getattr(attn, out_name), scale=scale)
    mlp = layer.mlp
    if not hasattr(mlp, "fc1"):
        raise UnsupportedError(f"unsupported MLP {type(mlp).__name__} (gated MLPs such as SwiGLU are not supported)")
    return BlockParts(ln1=ln1, attn=parts, ln2=ln2, fc1=mlp.fc1, act=mlp.activation_fn, fc2=mlp.fc2, ls1=ls1, ls2=ls2)


def _transform(image_size: int, mean, std):
    from torchvision import transforms as T

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(mean, std)])


def _hf_tokenizer(tok, context_length: int):
    def tokenize(texts):
        return tok(list(texts), padding="max_length", truncation=True, max_length=context_length,
                   return_tensors="pt")["input_ids"]
    return tokenize


# ---------------------------------------------------------------------------------- CLIP and SigLIP
def handles_clip(model: nn.Module) -> bool:
    return type(model).__name__ in CLIP_CLASSES


def clip_tower(model: nn.Module, model_name: str = "custom", preprocess=None, tokenizer=None) -> Tower:
    vm = model.vision_model
    siglip = type(model).__name__.startswith("Siglip")
    emb = vm.embeddings
    has_head = siglip and getattr(vm, "use_head", True) and hasattr(vm, "head")
    if siglip and not has_head:
        raise UnsupportedError("a SigLIP vision model without its pooling head is not supported")

    def patch_embed(images: torch.Tensor) -> torch.Tensor:
        return emb.patch_embedding(images.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)

    def add_tokens(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
        if not siglip:
            x = torch.cat([emb.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return x + emb.position_embedding(emb.position_ids)

    blocks = [_block_parts(layer, layer.self_attn, layer.layer_norm1, layer.layer_norm2) for layer in vm.encoder.layers]
    proj = getattr(model, "visual_projection", None)
    cfg = vm.config
    text = {}
    if hasattr(model, "text_model"):
        if tokenizer is None and not siglip:
            import open_clip  # CLIP's BPE; HF pools the first EOS, open_clip pads with 0 after it: the same

            tokenizer = open_clip.SimpleTokenizer(context_length=model.config.text_config.max_position_embeddings)
        text = dict(encode_text=lambda tokens: _features(model.get_text_features(input_ids=tokens)),
                    tokenizer=tokenizer, logit_scale=lambda: float(model.logit_scale.detach().exp()))
    mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else ((0.48145466, 0.4578275, 0.40821073),
                                                          (0.26862954, 0.26130258, 0.27577711))
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    return Tower(
        family="hf_clip", library_model=model, patch_embed=patch_embed, add_tokens=add_tokens, blocks=blocks,
        ln_pre=getattr(vm, "pre_layrnorm", None), ln_final=vm.post_layernorm,
        pool=(lambda x: vm.head(x)) if siglip else (lambda x: x[:, 0]), pooling="map" if siglip else "cls",
        project=proj if proj is not None else (lambda pooled: pooled), n_prefix_tokens=0 if siglip else 1,
        has_cls_token=not siglip,
        n_tokens=n_patches + (0 if siglip else 1), image_size=cfg.image_size, patch_size=cfg.patch_size,
        embed_dim=proj.out_features if proj is not None else cfg.hidden_size,
        act_fn=act_fn_name(vm.encoder.layers[0].mlp.activation_fn),
        preprocess=preprocess or _transform(cfg.image_size, mean, std),
        library_forward=(lambda x: _features(model.get_image_features(pixel_values=x))) if hasattr(
            model, "get_image_features") else (lambda x: _vision_only(model, x)),
        vision_modules=[vm] + ([proj] if proj is not None else []),
        **text)


def _vision_only(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    return out.image_embeds if getattr(out, "image_embeds", None) is not None else out.pooler_output


# ---------------------------------------------------------------------------------- DINOv2
def handles_dinov2(model: nn.Module) -> bool:
    return type(model).__name__ == "Dinov2Model"


def dinov2_tower(model: nn.Module, model_name: str = "custom", preprocess=None, tokenizer=None) -> Tower:  # noqa: ARG001
    emb, cfg = model.embeddings, model.config

    def patch_embed(images: torch.Tensor) -> torch.Tensor:
        return emb.patch_embeddings(images.to(emb.patch_embeddings.projection.weight.dtype))

    def add_tokens(x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return emb.dropout(x + emb.interpolate_pos_encoding(x, images.shape[-2], images.shape[-1]))

    blocks = [_block_parts(layer, layer.attention, layer.norm1, layer.norm2, layer.layer_scale1, layer.layer_scale2,
                           out_name="o_proj" if hasattr(layer.attention, "o_proj") else "out_proj")
              for layer in model.encoder.layer]
    return Tower(
        family="hf_dinov2", library_model=model, patch_embed=patch_embed, add_tokens=add_tokens, blocks=blocks,
        ln_pre=None, ln_final=model.layernorm, pool=lambda x: x[:, 0], pooling="cls", project=lambda p: p,
        n_prefix_tokens=1, has_cls_token=True, n_tokens=1 + (cfg.image_size // cfg.patch_size) ** 2, image_size=cfg.image_size,
        patch_size=cfg.patch_size, embed_dim=cfg.hidden_size,
        act_fn=act_fn_name(model.encoder.layer[0].mlp.activation_fn),
        preprocess=preprocess or _transform(cfg.image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        library_forward=lambda x: model(pixel_values=x).pooler_output, vision_modules=[model])


# ---------------------------------------------------------------------------------- loading
def check_config(repo_id: str, config: Any) -> None:
    from .base import UnsupportedModelError, describe

    kind = getattr(config, "model_type", None)
    if kind not in IMAGE_MODEL_TYPES:
        raise UnsupportedModelError(f"hf:{repo_id} is a {kind!r} model; supported transformers model types: "
                                    f"{sorted(IMAGE_MODEL_TYPES)}. Supported families: {describe()}")
    if kind == "dinov2" and getattr(config, "use_swiglu_ffn", False):
        raise UnsupportedModelError(f"hf:{repo_id} uses a SwiGLU MLP (DINOv2 giant), which is not supported")


def load(repo_id: str, pretrained: str | None, device: str | torch.device, **kwargs: Any):
    """`hf:<repo id>`: the config is read first (one small file) and refused if unsupported; `pretrained`,
    when given, is the revision."""
    import transformers

    revision = {"revision": pretrained} if pretrained else {}
    config = transformers.AutoConfig.from_pretrained(repo_id, **revision)
    check_config(repo_id, config)
    cls = {"clip": transformers.CLIPModel, "clip_vision_model": transformers.CLIPVisionModelWithProjection,
           "siglip": transformers.SiglipModel, "siglip_vision_model": transformers.SiglipVisionModel,
           "dinov2": transformers.Dinov2Model}[config.model_type]
    model = cls.from_pretrained(repo_id, **revision, **kwargs).to(device).eval()
    tokenizer = None
    if config.model_type in TEXT_MODEL_TYPES:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(repo_id, **revision)
            tokenizer = _hf_tokenizer(tok, config.text_config.max_position_embeddings)
        except (OSError, ValueError):
            tokenizer = None  # CLIP falls back to open_clip's identical BPE; SigLIP then has no tokenizer
    preprocess = None
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(repo_id, **revision)
        size = proc.crop_size["height"] if getattr(proc, "crop_size", None) else proc.size.get("height",
                                                                                          proc.size.get("shortest_edge"))
        preprocess = _transform(size, proc.image_mean, proc.image_std)
    except (OSError, ValueError, KeyError, AttributeError):
        preprocess = None
    return model, preprocess, tokenizer
