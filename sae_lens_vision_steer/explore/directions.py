"""Which classes a latent's decoder direction promotes: the direction through `ln_post` and the image
projection, onto the class-prompt embeddings of a zero-shot classifier.

A latent adds `a * W_dec[s]` to the residual stream. Through the final LayerNorm (`model.ln_final`,
open_clip's `ln_post`) a direction `d` becomes `w_ln * (d - mean(d)) / sigma`, where `sigma` is the
token's scale; dropping the positive `1/sigma` (it does not change the ranking) and the bias (it is
not part of the direction), then projecting (`model.visual.proj`) and taking the cosine with each
class embedding (`ZeroShotClassifier.weights_EC`, unit columns) gives each class's score. This is a
logit lens on the decoder rows: exact in direction for the final block's residual stream (the
paper's hook); for earlier hooks it reads the direct path only and ignores the later blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sae_lens import SAE

from ..sae.splice import HookedCLIP


@torch.no_grad()
def decoder_class_scores(model: HookedCLIP, sae: SAE, weights_EC: torch.Tensor) -> torch.Tensor:
    """`[d_sae, n_classes]` cosine of each latent's projected decoder direction with each class embedding."""
    W_dec = sae.W_dec.detach().float().cpu()  # [S, D]
    ln = model.ln_final
    w_ln = getattr(ln, "w", None)
    w_ln = torch.ones(W_dec.shape[1]) if w_ln is None else w_ln.detach().float().cpu()
    centred = W_dec - W_dec.mean(dim=1, keepdim=True)
    proj = model.visual.proj
    out_SE = (centred * w_ln) @ (proj.detach().float().cpu() if proj is not None else torch.eye(W_dec.shape[1]))
    return F.normalize(out_SE, dim=-1) @ weights_EC.float().cpu()


def promoted_classes(scores_SC: torch.Tensor, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` classes with the highest score per latent: `(indices [S, n], scores [S, n])`."""
    top = scores_SC.topk(min(n, scores_SC.shape[1]), dim=1)
    return top.indices, top.values
