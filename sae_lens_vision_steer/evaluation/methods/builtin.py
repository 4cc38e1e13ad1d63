"""The built-in methods: zero-shot, VS2 (and VS2 + Ens, `vs2_ens`), SAE-rec final (+gamma), SAE-rec all, and
VS2 at the last n blocks (the paper's layer ablation; SAEs in `options["last_n_saes"]`, ordered from block
n - len to n - 1)."""

from __future__ import annotations

from typing import Any

import torch
from sae_lens import SAE

from ...core.errors import UsageError
from ...sae.metadata import (
    activation_mean,
    check_sae_fits_hook,
    check_sae_positions,
    sae_hook_name,
)
from ...steering.baselines import SAEReconstruction, sae_reconstruct
from ...steering.hooks import TokenIntervention
from ...steering.vs2 import PAPER_GAMMA, PAPER_LAM, VS2Steering, vs2_from_reconstruction
from ..registry import MethodContext, MethodOutput, register_method
from ..tokens import RESID_HOOK


@register_method("zeroshot", needs_sae=False, description="plain CLIP zero-shot")
def _zeroshot(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return MethodOutput(tokens=tokens_ND, coverage=0.0)


def sae_reconstruction(tokens_ND: torch.Tensor, ctx: MethodContext, sae: SAE) -> torch.Tensor:
    """`sae.decode(sae.encode(x))` for the cached tokens, computed once per run and shared by every
    VS2 setting and SAE-rec final (it does not depend on lam, gamma or the gate)."""
    hit = ctx.scratch.get("sae_reconstruction")
    if hit is None or hit[0] is not tokens_ND or hit[1] is not sae:
        rec = torch.cat([sae.decode(sae.encode(c.to(sae.device, sae.dtype))) for c in tokens_ND.split(ctx.batch_size)])
        hit = (tokens_ND, sae, rec)
        ctx.scratch["sae_reconstruction"] = hit
    return hit[2]


@register_method("vs2", description="VS2: x + lam (gamma-1) W_dec c, norm-preserving, FVU-gated")
def _vs2(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
         fvu_threshold: float | None = None, preserve_norm: bool = True, **_: Any) -> MethodOutput:
    sae = ctx.require_sae("vs2")
    mean_D = None
    if fvu_threshold is not None:  # look the mean up once per run, not once per setting
        if "activation_mean" not in ctx.scratch:
            ctx.scratch["activation_mean"] = activation_mean(sae)
        mean_D = ctx.scratch["activation_mean"]
    rec = sae_reconstruction(tokens_ND, ctx, sae)
    out = vs2_from_reconstruction(tokens_ND.to(sae.device), rec, sae, lam, gamma, fvu_threshold, mean_D, preserve_norm)
    return MethodOutput(tokens=out.steered, coverage=out.coverage)


@register_method("vs2_ens", templates="ensemble", gate_as="vs2",
                 description="VS2 scored with the data set's template ensemble (the paper's VS2 + Ens)")
def _vs2_ens(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
             fvu_threshold: float | None = None, preserve_norm: bool = True, **_: Any) -> MethodOutput:
    """The same steered tokens as `vs2` (the same pass and SAE reconstruction), classified with the data
    set's ensemble; `vs2` uses the run's templates (`--templates`)."""
    return _vs2(tokens_ND, ctx, lam=lam, gamma=gamma, fvu_threshold=fvu_threshold, preserve_norm=preserve_norm)


@register_method("rec_final", description="SAE-rec final: the CLS token replaced by decode(encode(x))")
def _rec_final(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    sae = ctx.require_sae("rec_final")
    return MethodOutput(tokens=sae_reconstruction(tokens_ND, ctx, sae).to(tokens_ND.dtype), coverage=1.0)


@register_method("rec_final_gamma", description="SAE-rec final + gamma: the CLS token replaced by decode(gamma c)")
def _rec_final_gamma(tokens_ND: torch.Tensor, ctx: MethodContext, *, gamma: float = PAPER_GAMMA, **_: Any) -> MethodOutput:
    sae = ctx.require_sae("rec_final_gamma")
    rec = torch.cat([sae_reconstruct(c.to(sae.device), sae, gamma) for c in tokens_ND.split(ctx.batch_size)])
    return MethodOutput(tokens=rec, coverage=1.0)


def _check_rec_all(ctx: MethodContext) -> None:
    """`rec_all` means every block: refuse layer SAEs that leave blocks out (before the backbone pass)."""
    saes = ctx.options.get("layer_saes")
    if not saes:
        raise UsageError("method 'rec_all' needs one SAE per layer (layer_saes=[...], CLI --layer-saes)")
    blocks = []
    for sae in saes:
        hook = sae_hook_name(sae)
        m = RESID_HOOK.match(hook)
        if not m:
            raise UsageError(f"rec_all takes SAEs on blocks.i.hook_resid_post/pre; got one for {hook!r}")
        check_sae_fits_hook(sae, ctx.model, hook)
        check_sae_positions(sae, "cls", "by rec_all (CLS tokens)")
        blocks.append(int(m.group(1)))
    missing = sorted(set(range(ctx.model.cfg.n_layers)) - set(blocks))
    if missing:
        raise UsageError(f"rec_all replaces the CLS token at every block, but --layer-saes covers blocks {sorted(blocks)} "
                         f"only (missing {missing}); give one SAE per block (it would not be SAE-rec all)")


@register_method("rec_all", kind="pass", needs_sae=False, prepare=_check_rec_all,
                 description="SAE-rec all: every layer's CLS replaced by its reconstruction (one SAE per layer)")
def _rec_all(ctx: MethodContext, **_: Any) -> TokenIntervention:
    _check_rec_all(ctx)
    return SAEReconstruction(list(ctx.options["layer_saes"]))



def _check_vs2_last_n(ctx: MethodContext) -> None:
    saes = ctx.options.get("last_n_saes")
    if not saes:
        raise UsageError("method 'vs2_last_n' needs options['last_n_saes'] (one SAE per steered block, in order)")
    VS2Steering.last_n(list(saes), model=ctx.model)  # wrong hooks or order fail here, before the pass


@register_method("vs2_last_n", kind="pass", needs_sae=False, prepare=_check_vs2_last_n,
                 description="VS2 at each of the last n blocks (one SAE per block, options['last_n_saes'])")
def vs2_last_n(ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA, **_: Any) -> VS2Steering:
    return VS2Steering.last_n(list(ctx.options["last_n_saes"]), model=ctx.model, lam=lam, gamma=gamma)
