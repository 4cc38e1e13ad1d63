"""Kept for imports written before the `models` package: `from sae_lens_vision_steer.hooked_clip import HookedCLIP`."""

from .models import BLOCK_HOOKS, POOLED_HOOKS, HookedCLIP, HookedCLIPConfig

__all__ = ["BLOCK_HOOKS", "POOLED_HOOKS", "HookedCLIP", "HookedCLIPConfig"]
