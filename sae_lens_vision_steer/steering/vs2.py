"""VS2, Visual Sparse Steering (arXiv 2506.01247, Eq. 2), with the per-sample FVU gate.

For a token `x` and its SAE code `c = sae.encode(x)`:

    v     = D(gamma c) - D(c) = (gamma - 1) * (c @ W_dec)        (the decoder bias cancels)
    x_hat = (x + lam v) * ||x|| / ||x + lam v||                   (preserve_norm=True)

The code's decoder contribution is taken as `sae.decode(c) - b_dec`, so any SAELens architecture
with an affine decoder works (top-k with `rescale_acts_by_decoder_norm` included). The gate leaves a
token unsteered when its reconstruction is poor: `FVU(x) = ||x - x_rec||^2 / ||x - mu||^2 > tau`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from sae_lens import SAE

from ..core.errors import UsageError
from ..sae.metadata import activation_mean
from ..training.fvu import fvu_of_reconstruction
from .hooks import (
    Positions,
    Site,
    TokenIntervention,
    check_finite,
)

PAPER_LAM = 2.1  # best setting for CIFAR-100 with ViT-B/32 in the paper
PAPER_GAMMA = 1.5


@dataclass
class VS2Output:
    steered: torch.Tensor  # [..., d_in] in x's dtype; unsteered where the gate rejected the token
    steered_mask: torch.Tensor  # [...] bool: True where the token was steered
    fvu: torch.Tensor | None  # [...] per-token FVU when the gate was evaluated, else None

    @property
    def coverage(self) -> float:
        return self.steered_mask.float().mean().item()


def _steer_from_linear(x: torch.Tensor, lin: torch.Tensor, lam: float, gamma: float, preserve_norm: bool) -> torch.Tensor:
    steered = torch.add(x, lin, alpha=lam * (gamma - 1.0))  # one kernel for x + lam (gamma - 1) lin
    if preserve_norm:
        scale = x.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        steered = steered * scale
    return steered


def vs2_apply(x: torch.Tensor, sae: SAE, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
              fvu_threshold: float | None = None, mean_D: torch.Tensor | None = None,
              preserve_norm: bool = True) -> VS2Output:
    """VS2 on tokens `x` `[..., d_in]`, gated by per-token FVU when `fvu_threshold` is given.

    `mean_D` is the activation mean for FVU (default: the SAE's recorded `activation_mean`).
    """
    check_finite(lam=lam, gamma=gamma)
    x_sae = x.to(sae.dtype)
    return vs2_from_reconstruction(x, sae.decode(sae.encode(x_sae)), sae, lam, gamma, fvu_threshold, mean_D,
                                   preserve_norm)


def vs2_from_reconstruction(x: torch.Tensor, rec: torch.Tensor, sae: SAE, lam: float = PAPER_LAM,
                            gamma: float = PAPER_GAMMA, fvu_threshold: float | None = None,
                            mean_D: torch.Tensor | None = None, preserve_norm: bool = True) -> VS2Output:
    """VS2 given the SAE reconstruction `rec = sae.decode(sae.encode(x))`, which does not depend on
    lam, gamma or the gate: a sweep computes it once and calls this per setting."""
    check_finite(lam=lam, gamma=gamma)
    if fvu_threshold is not None and (fvu_threshold != fvu_threshold):  # NaN
        raise UsageError("fvu_threshold is NaN")
    x_sae = x.to(sae.dtype)
    steered = _steer_from_linear(x_sae, rec - sae.b_dec, lam, gamma, preserve_norm)
    if fvu_threshold is None:
        mask = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return VS2Output(steered.to(x.dtype), mask, None)
    mean_D = activation_mean(sae) if mean_D is None else mean_D.to(device=x_sae.device, dtype=x_sae.dtype)
    fvu = fvu_of_reconstruction(x_sae, rec, mean_D)
    mask = fvu <= fvu_threshold
    steered = torch.where(mask[..., None], steered, x_sae)
    return VS2Output(steered.to(x.dtype), mask, fvu)


def vs2_steer(x: torch.Tensor, sae: SAE, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
              preserve_norm: bool = True) -> torch.Tensor:
    """The steered tokens `x_hat` for tokens `x` `[..., d_in]` (no gate)."""
    return vs2_apply(x, sae, lam, gamma, None, None, preserve_norm).steered


class VS2Steering(TokenIntervention):
    """VS2 as TransformerLens forward hooks on a `HookedCLIP`.

        steer = VS2Steering(sae, lam=2.1, gamma=1.5)
        with model.hooks(fwd_hooks=steer.fwd_hooks(model)):
            embeds = model.encode_image(images)
        steer.coverage  # fraction of tokens steered in that call

    The hook defaults to the SAE's metadata (`sae_metadata.sae_hook_name`); only the CLS token is
    steered unless `positions` says otherwise ("cls" | "all" | "patches" | list of token indices).
    `fvu_threshold` turns on the gate. Pass a list of SAEs (or use `last_n`) to steer several
    layers, each with its own SAE; `lam`, `gamma` and `fvu_threshold` then apply to every layer
    (a list of thresholds gives one per SAE).
    """

    def __init__(self, sae: SAE | Sequence[SAE], lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
                 hook_name: str | Sequence[str | None] | None = None, positions: Positions = "cls",
                 fvu_threshold: float | Sequence[float | None] | None = None, preserve_norm: bool = True):
        check_finite(lam=lam, gamma=gamma)
        super().__init__(sae, hook_name, positions)
        self.lam, self.gamma, self.preserve_norm = float(lam), float(gamma), preserve_norm
        thresholds = (list(fvu_threshold) if isinstance(fvu_threshold, (list, tuple))
                      else [fvu_threshold] * len(self.sites))
        if len(thresholds) != len(self.sites):
            raise UsageError(f"{len(self.sites)} SAEs but {len(thresholds)} FVU thresholds")
        for site, tau in zip(self.sites, thresholds):
            if tau is not None:
                if tau != tau:
                    raise UsageError("fvu_threshold is NaN")
                site.fvu_threshold = float(tau)
                site.mean_D = activation_mean(site.sae)  # once, not per call

    @classmethod
    def last_n(cls, saes: Sequence[SAE], model=None, **kwargs) -> "VS2Steering":
        """Steer the last `len(saes)` blocks' `hook_resid_post`, SAE i on block `n_layers - n + i`.

        With `model`, SAEs without a recorded hook get those names and recorded hooks are checked
        against them; without it the hooks come from each SAE's metadata.
        """
        saes = list(saes)
        if model is None:
            return cls(saes, **kwargs)
        n_layers = model.cfg.n_layers
        if len(saes) > n_layers:
            raise UsageError(f"{len(saes)} SAEs for a model with {n_layers} blocks")
        expected = [f"blocks.{n_layers - len(saes) + i}.hook_resid_post" for i in range(len(saes))]
        for sae, name in zip(saes, expected):
            recorded = sae.cfg.metadata.get("hook_name")
            if recorded and recorded != name:
                raise UsageError(f"last_n expects SAEs for {expected} in order; got one recorded for {recorded!r}")
        steer = cls(saes, hook_name=expected, **kwargs)
        steer.validate(model)
        return steer

    def transform(self, x_PD: torch.Tensor, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        out = vs2_apply(x_PD, site.sae, self.lam, self.gamma, site.fvu_threshold, site.mean_D, self.preserve_norm)
        return out.steered, out.steered_mask

    def __repr__(self) -> str:
        gate = [s.fvu_threshold for s in self.sites]
        return (f"VS2Steering(hooks={self.hook_names}, lam={self.lam}, gamma={self.gamma}, positions={self.positions!r}, "
                f"fvu_threshold={gate if len(gate) > 1 else gate[0]}, preserve_norm={self.preserve_norm})")


__all__ = [
    "PAPER_GAMMA", "PAPER_LAM", "VS2Output", "VS2Steering",
    "vs2_apply", "vs2_steer",
]
