"""Steering CLIP image tokens with SAEs: VS2 (and, from other modules, VS2++), plus the paper's
reconstruction baselines. Every intervention exposes `fwd_hooks()` for TransformerLens hooks."""

from ..training.fvu import per_sample_fvu
from ..training.gate import fvu_threshold_from_reference
from .baselines import SAEReconstruction, sae_reconstruct
from .hooks import TokenIntervention
from .vs2 import (
    PAPER_GAMMA,
    PAPER_LAM,
    VS2Output,
    VS2Steering,
    vs2_apply,
    vs2_steer,
)

__all__ = [
    "PAPER_GAMMA", "PAPER_LAM", "SAEReconstruction", "TokenIntervention", "VS2Output", "VS2Steering",
    "fvu_threshold_from_reference", "per_sample_fvu", "sae_reconstruct", "vs2_apply", "vs2_steer",
]
