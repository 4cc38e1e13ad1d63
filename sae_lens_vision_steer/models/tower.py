"""`Tower`: what a model-family adapter extracts from a library's model, so one hooked root module
(`hooked.py`) runs every family with the same hook names, shapes and `cfg` fields.

A family adapter (`open_clip_vit.py`, `timm_vit.py`, `hf.py`) fills a `Tower` with the library's own
modules (never copies): the patch embedding, the prefix and position tokens, the optional norm before
the blocks, each block's parts, the final per-token norm, the pooling and the projection, and the
text side when the model has one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

Pooling = Literal["cls", "map", "mean"]


@dataclass
class BlockParts:
    """One pre-norm block: `x + ls1(attn(ln1(x)))`, then `x + ls2(fc2(act(fc1(ln2(x)))))`."""

    ln1: nn.Module
    attn: dict[str, Any]  # keyword arguments of `components.Attention` (projections, norms, scale)
    ln2: nn.Module
    fc1: nn.Module
    act: nn.Module
    fc2: nn.Module
    ls1: nn.Module | None = None
    ls2: nn.Module | None = None


@dataclass
class Tower:
    family: str
    library_model: nn.Module  # registered under the hooked model as `.clip` (its parameters, its state dict)
    patch_embed: Callable[[torch.Tensor], torch.Tensor]  # images [B, C, H, W] -> patches [B, P, D]
    add_tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (patches, images) -> tokens [B, T, D]
    blocks: list[BlockParts]
    ln_pre: nn.Module | None
    ln_final: nn.Module | None  # per-token final norm, applied to every token before pooling
    pool: Callable[[torch.Tensor], torch.Tensor]  # normed tokens [B, T, D] -> pooled [B, D]
    pooling: Pooling
    project: Callable[[torch.Tensor], torch.Tensor]  # pooled [B, D] -> image embedding [B, E]
    n_prefix_tokens: int  # CLS and register tokens before the patches
    has_cls_token: bool  # position 0 is a CLS token
    n_tokens: int
    image_size: int | tuple[int, int]
    patch_size: int
    embed_dim: int
    act_fn: str
    preprocess: Callable[[Any], torch.Tensor]
    library_forward: Callable[[torch.Tensor], torch.Tensor]  # the library's own image embedding (tests)
    vision_modules: list[nn.Module]  # the image tower's modules: its weights identify the model
    encode_text: Callable[[torch.Tensor], torch.Tensor] | None = None  # tokens -> text embedding
    tokenizer: Callable[..., torch.Tensor] | None = None
    logit_scale: Callable[[], float] | None = None
    dtype_device: Callable[[], tuple[torch.dtype, torch.device]] = field(default=lambda: (torch.float32, torch.device("cpu")))

    @property
    def has_text(self) -> bool:
        return self.encode_text is not None


def act_fn_name(act: nn.Module) -> str:
    """TransformerLens-style name of an MLP activation module (open_clip, timm or transformers)."""
    name = type(act).__name__
    if name == "QuickGELU" or name == "QuickGELUActivation":
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    if name in ("GELUActivation", "GELU"):
        return "gelu"
    if name in ("PytorchGELUTanh", "GELUTanh", "NewGELUActivation", "FastGELUActivation"):
        return "gelu_pytorch_tanh"
    return name.lower()
