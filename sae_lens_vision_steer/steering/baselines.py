"""The paper's reconstruction baselines for VS2 (plain zero-shot CLIP is just no hooks):

- SAE-rec final: replace the final CLS token with its SAE reconstruction `decode(encode(x))`;
- SAE-rec final + gamma: reconstruct from the scaled code, `decode(gamma * encode(x))`;
- SAE-rec all: the same at every layer, each layer with its own SAE (`SAEReconstruction([...])`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from sae_lens import SAE

from .hooks import Positions, Site, TokenIntervention, check_finite


def sae_reconstruct(x: torch.Tensor, sae: SAE, gamma: float = 1.0) -> torch.Tensor:
    """`decode(gamma * encode(x))` for tokens `x` `[..., d_in]`, in x's dtype."""
    check_finite(gamma=gamma)
    codes = sae.encode(x.to(sae.dtype))
    return sae.decode(codes * gamma if gamma != 1.0 else codes).to(x.dtype)


class SAEReconstruction(TokenIntervention):
    """Forward hooks that replace the chosen positions with their SAE reconstruction.

    One SAE gives SAE-rec final (on the SAE's hook); a list of SAEs, one per layer, gives SAE-rec
    all. `gamma != 1` reconstructs from `gamma * c` (SAE-rec final + gamma). Coverage is 1.
    """

    def __init__(self, sae: SAE | Sequence[SAE], gamma: float = 1.0,
                 hook_name: str | Sequence[str | None] | None = None, positions: Positions = "cls"):
        check_finite(gamma=gamma)
        super().__init__(sae, hook_name, positions)
        self.gamma = float(gamma)

    def transform(self, x_PD: torch.Tensor, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        rec = sae_reconstruct(x_PD, site.sae, self.gamma)
        return rec, torch.ones(x_PD.shape[:-1], dtype=torch.bool, device=x_PD.device)

    def __repr__(self) -> str:
        return f"SAEReconstruction(hooks={self.hook_names}, gamma={self.gamma}, positions={self.positions!r})"
