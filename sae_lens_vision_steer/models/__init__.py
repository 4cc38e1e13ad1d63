"""Hooked vision models: TransformerLens components, the hooked root module, the open_clip ViT family."""

from .config import HookedCLIPConfig
from .hooked import BLOCK_HOOKS, POOLED_HOOKS, HookedCLIP

__all__ = ["BLOCK_HOOKS", "POOLED_HOOKS", "HookedCLIP", "HookedCLIPConfig"]
