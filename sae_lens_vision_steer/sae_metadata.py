"""The vision metadata this package stores in a SAELens SAE's `cfg.metadata`, and checks on it.

Keys (all optional for SAEs trained elsewhere): `hook_name`, `model_name`, `pretrained`, `positions`,
`dataset`, `split`, `n_training_samples`, `activation_mean` (list of `d_in` floats),
`heldout_fvu`, `mean_l0`, `dead_fraction`, `objective` (`topk` or `pass`), `w_aux`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from sae_lens import SAE

from .hooked_clip import HookedCLIP

VISION_METADATA_KEYS = (
    "hook_name", "model_name", "pretrained", "positions", "dataset", "split", "n_training_samples",
    "activation_mean", "heldout_fvu", "mean_l0", "dead_fraction", "objective", "w_aux",
)


def vision_metadata(sae: SAE) -> dict[str, Any]:
    meta = sae.cfg.metadata
    return {k: meta.get(k) for k in VISION_METADATA_KEYS if k in meta}


def sae_hook_name(sae: SAE, hook_name: str | None = None) -> str:
    """The hook an SAE belongs to: the given name, else the one in its metadata."""
    name = hook_name or sae.cfg.metadata.get("hook_name")
    if not name:
        raise ValueError("the SAE's metadata records no hook_name; pass hook_name= explicitly")
    return name


def activation_mean(sae: SAE, warn: bool = True) -> torch.Tensor:
    """The training activation mean recorded in the metadata; falls back to `b_dec` with a warning."""
    mean = sae.cfg.metadata.get("activation_mean")
    if mean is not None:
        return torch.as_tensor(mean, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    if warn:
        warnings.warn("SAE metadata has no activation_mean; using b_dec as the mean for FVU", stacklevel=2)
    return sae.b_dec.detach()


def check_sae_fits_hook(sae: SAE, model: HookedCLIP, hook_name: str) -> None:
    """Clear errors for a hook the model lacks or an SAE whose width does not match it."""
    model.check_hook_name(hook_name)
    width = model.hook_width(hook_name)
    if sae.cfg.d_in != width:
        raise ValueError(
            f"SAE d_in={sae.cfg.d_in} does not match hook {hook_name!r} of {model.cfg.model_name}, "
            f"whose width is {width}"
        )
