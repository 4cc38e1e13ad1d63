"""Hooked vision towers with TransformerLens hook names: components, the hooked root module (`HookedViT`)
and the model families. Nothing here knows about SAEs: `sae.splice.HookedCLIP` adds the splice API."""

from .config import HookedCLIPConfig
from .hooked import BLOCK_HOOKS, HookedViT

__all__ = ["BLOCK_HOOKS", "HookedCLIPConfig", "HookedViT"]
