"""Shared machinery for interventions that replace tokens at SAE hook points of a `HookedCLIP`.

An intervention owns one or more *sites* (an SAE and the hook it sits on). At each site it picks the
chosen token positions out of the activation, maps them through `transform` (VS2 steering, an SAE
reconstruction, ...), writes them back into a copy of the activation, and records which tokens it
changed so that coverage can be read afterwards without a device sync inside the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from sae_lens import SAE

from ..core.errors import UnsupportedError, UsageError
from ..core.positions import POOLED_HOOKS, Positions, check_positions, position_index
from ..sae.metadata import check_sae_fits_hook, check_sae_positions, sae_hook_name
from ..sae.splice import HookedCLIP

HookFn = Callable[..., torch.Tensor]

# SAELens applies these normalisations at run time in encode/decode with per-call state, so the
# decoder is not affine in the code and `decode(c) - b_dec` is not the code's contribution.
_RUNTIME_NORMALISATIONS = ("layer_norm", "constant_norm_rescale")

# SAELens architectures (inference names; the training names of BatchTopK variants, whose inference form is
# JumpReLU) whose `decode(c)` is `lin(c) + b_dec` on the hook they read.
AFFINE_DECODER_ARCHITECTURES = ("abstopk", "batchtopk", "gated", "jumprelu", "matryoshka_batchtopk", "standard",
                                "topk")
# Refused, with the reason.
NON_AFFINE_ARCHITECTURES = {
    "transcoder": "a transcoder's decoder writes another hook (hook_name_out), not the token it read",
    "skip_transcoder": "a skip transcoder writes another hook and adds a linear skip term of its input",
    "jumprelu_transcoder": "a transcoder's decoder writes another hook (hook_name_out), not the token it read",
    "jumprelu_skip_transcoder": "a skip transcoder writes another hook and adds a linear skip term of its input",
    "temporal": "a temporal SAE reconstructs from codes predicted from the other tokens, so its output is not "
                "affine in the token's own code",
    "matching_pursuit": "this matching-pursuit SAE adds no b_dec (apply_b_dec_to_input=False), so "
                        "decode(c) - b_dec is not the code's contribution",
}


def check_affine_decoder(sae: SAE) -> None:
    """VS2 and the reconstruction baselines use `decode(c) = lin(c) + b_dec`; refuse SAEs where that fails:
    architectures other than `AFFINE_DECODER_ARCHITECTURES` are refused by name (with the reason where known)."""
    arch = sae.cfg.architecture()
    if arch == "matching_pursuit" and sae.cfg.apply_b_dec_to_input:
        pass  # decode(c) = c W_dec + b_dec
    elif arch in NON_AFFINE_ARCHITECTURES:
        raise UnsupportedError(f"steering refuses {arch!r} SAEs: {NON_AFFINE_ARCHITECTURES[arch]}")
    elif arch not in AFFINE_DECODER_ARCHITECTURES:
        raise UnsupportedError(f"steering does not know whether a {arch!r} SAE has an affine decoder "
                               f"(decode(c) = c W_dec + b_dec on the hook it reads); it accepts "
                               f"{list(AFFINE_DECODER_ARCHITECTURES)}")
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm in _RUNTIME_NORMALISATIONS:
        raise UsageError(
            f"SAE uses run-time normalize_activations={norm!r}, so its decoder is not affine in the code; "
            "steering needs an SAE with normalize_activations='none' (fold the normalisation first)"
        )
    if getattr(sae.cfg, "reshape_activations", "none") != "none":
        raise UsageError("SAE reshapes its activations (hook_z); vision steering expects [..., d_in] residual tokens")


def check_finite(**values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise UsageError(f"{name} must be a finite number, got {v!r}")


@dataclass
class Site:
    """One SAE on one hook, with the per-site state the hook function needs."""

    sae: SAE
    hook_name: str
    fvu_threshold: float | None = None
    mean_D: torch.Tensor | None = None  # activation mean for the FVU gate (on the SAE's device)


class TokenIntervention:
    """Base class: hook functions that rewrite the chosen positions of each site's activation.

    Subclasses implement `transform(x_PD, site) -> (new_x_PD, changed_P)`, where `P` stands for any
    leading shape and `changed_P` is a bool mask of the tokens actually changed (for coverage).
    """

    def __init__(self, saes: SAE | Sequence[SAE], hook_names: str | Sequence[str | None] | None = None,
                 positions: Positions = "cls"):
        sae_list = [saes] if isinstance(saes, SAE) else list(saes)
        if not sae_list:
            raise UsageError("need at least one SAE")
        if hook_names is None or isinstance(hook_names, str):
            names: list[str | None] = [hook_names] * len(sae_list)
            if isinstance(hook_names, str) and len(sae_list) > 1:
                raise UsageError("one hook_name given for several SAEs; pass one hook name per SAE")
        else:
            names = list(hook_names)
            if len(names) != len(sae_list):
                raise UsageError(f"{len(sae_list)} SAEs but {len(names)} hook names")
        for sae in sae_list:
            check_affine_decoder(sae)
        self.sites = [Site(sae, sae_hook_name(sae, name)) for sae, name in zip(sae_list, names)]
        if len({s.hook_name for s in self.sites}) != len(self.sites):
            raise UsageError(f"two SAEs on the same hook: {[s.hook_name for s in self.sites]}")
        self.positions = check_positions(positions)
        for site in self.sites:  # an SAE applied at positions it was not trained on is refused
            check_sae_positions(site.sae, self.positions, f"at {site.hook_name} by {type(self).__name__}")
        self._last_changed: dict[str, torch.Tensor] = {}
        # Running totals since `reset_coverage()`, kept as device tensors: no sync in the hook.
        self._changed_total: dict[str, torch.Tensor] = {}
        self._seen_total: dict[str, int] = {}

    # ------------------------------------------------------------------ subclass interface
    def transform(self, x_PD: torch.Tensor, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks
    @property
    def hook_names(self) -> list[str]:
        return [s.hook_name for s in self.sites]

    def validate(self, model: HookedCLIP) -> None:
        """Clear errors when a hook does not exist on `model` or an SAE's width does not match it."""
        for site in self.sites:
            check_sae_fits_hook(site.sae, model, site.hook_name)
            if isinstance(self.positions, str) and site.hook_name not in POOLED_HOOKS:
                position_index(model.cfg, self.positions, site.hook_name)  # `cls` without a CLS token: refused
        self._n_prefix = getattr(model.cfg, "n_prefix_tokens", 1)

    def fwd_hooks(self, model: HookedCLIP | None = None) -> list[tuple[str, HookFn]]:
        """`[(hook_name, fn), ...]` for `model.hooks(fwd_hooks=...)`, `run_with_hooks` or `add_hook`.
        With `model`, the hooks are validated against it first."""
        if model is not None:
            self.validate(model)
        return [(site.hook_name, self._make_hook(site)) for site in self.sites]

    def _make_hook(self, site: Site) -> HookFn:
        def hook(act: torch.Tensor, hook=None) -> torch.Tensor:  # noqa: ARG001 (TransformerLens signature)
            return self.apply_at_site(act, site)

        hook.__name__ = f"{type(self).__name__}@{site.hook_name}"
        return hook

    def apply_at_site(self, act: torch.Tensor, site: Site) -> torch.Tensor:
        """Rewrite the chosen positions of one hook activation (`[B, T, D]`, or `[B, D]` for pooled hooks)."""
        if act.ndim == 2 or self.positions == "all":
            new, changed = self.transform(act, site)
            self._record(site, changed)
            return new.to(act.dtype)
        if self.positions == "cls":
            new, changed = self.transform(act[:, 0], site)
            out = act.clone()  # a copy: other hooks may hold a reference to `act`
            out[:, 0] = new.to(act.dtype)
        else:
            idx = slice(getattr(self, "_n_prefix", 1), None) if self.positions == "patches" else list(self.positions)
            new, changed = self.transform(act[:, idx], site)
            out = act.clone()
            out[:, idx] = new.to(act.dtype)
        self._record(site, changed)
        return out

    # ------------------------------------------------------------------ coverage
    def _record(self, site: Site, changed: torch.Tensor) -> None:
        name = site.hook_name
        self._last_changed[name] = changed
        count = changed.sum()
        self._changed_total[name] = self._changed_total[name] + count if name in self._changed_total else count
        self._seen_total[name] = self._seen_total.get(name, 0) + changed.numel()

    def reset_coverage(self) -> None:
        self._last_changed.clear()
        self._changed_total.clear()
        self._seen_total.clear()

    @property
    def coverage_by_hook(self) -> dict[str, float]:
        """Fraction of tokens changed at each hook in the last call (NaN for a hook not yet run)."""
        return {s.hook_name: (self._last_changed[s.hook_name].float().mean().item()
                              if s.hook_name in self._last_changed else float("nan")) for s in self.sites}

    @property
    def coverage(self) -> float:
        """Fraction of tokens changed in the last call, averaged over the hooks."""
        vals = list(self.coverage_by_hook.values())
        return sum(vals) / len(vals)

    @property
    def total_coverage(self) -> float:
        """Fraction of tokens changed over every call since construction or `reset_coverage()`."""
        fracs = [self._changed_total[n].item() / self._seen_total[n] if self._seen_total.get(n) else float("nan")
                 for n in self.hook_names]
        return sum(fracs) / len(fracs)
