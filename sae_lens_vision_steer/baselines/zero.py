"""ZERO (Farina et al., "Frustratingly Easy Test-Time Adaptation of Vision-Language Models", NeurIPS 2024):
training-free test-time adaptation by a vote over augmented views, following FarinaMatteo/zero.

For each test image, independently:

1. `n_views = 64` inputs: the image as the model's preprocessing gives it, plus 63 views
   `flip(random_resized_crop(image))` (their `MultiViewCropAndFlip`: crops and flips for every data set,
   no AugMix), one batched forward through the frozen image tower, no backward;
2. logits `logit_scale * cos(f_v, t_c)` against the class text features (the row's prompts);
3. confidence filter: keep the `int(n_views * keep)` views of lowest softmax entropy (`keep = 0.1`, the
   paper's 10%; the repository's code sets 0.3 since Oct 2024, `keep=0.3` gives that);
4. zero temperature: each kept view votes for its argmax class; the prediction is the most voted class;
5. ties: the first of the discarded views, in confidence order, whose argmax is a tied class decides; if
   none, the tied class with the highest logit on the most confident discarded view (their
   `greedy_break`). The winner's count gets +1, as in their code, so scores rank by votes.

See docs/methods.md for the differences from their code.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..core import distributed
from ..core.errors import UsageError
from .tta import view_entropy
from .views import TPTViews, view_logits


@dataclass(frozen=True)
class ZeroConfig:
    n_views: int = 64  # the original image + 63 augmented views (their num_views)
    keep: float = 0.1  # fraction of views kept by confidence (their gamma: 0.1 in the paper, 0.3 in the code now)
    seed: int = 0  # the views of image i are drawn with seed (seed, i)

    def __post_init__(self) -> None:
        if self.n_views < 2:
            raise UsageError(f"ZERO needs the image and at least one augmented view (n_views >= 2), got {self.n_views}")
        if not 0 < self.keep <= 1:
            raise UsageError(f"keep must be in (0, 1], got {self.keep}")
        if int(self.n_views * self.keep) < 1:
            raise UsageError(f"keep={self.keep} of {self.n_views} views keeps none (int(n_views * keep) = 0)")

    @property
    def n_kept(self) -> int:
        return int(self.n_views * self.keep)  # their confidence_filter: int(batch_entropy.size(0) * top)


def zero_vote(logits_BVC: torch.Tensor, n_kept: int) -> torch.Tensor:
    """ZERO's scores `[B, C]` from the views' logits (`[B, V, C]`, temperature-scaled as CLIP's): votes of
    the `n_kept` most confident views, the winner +1 (ties broken as in the module docstring)."""
    B, V, C = logits_BVC.shape
    order = view_entropy(logits_BVC).argsort(dim=-1, stable=True)  # [B, V], most confident first
    preds = logits_BVC.argmax(-1)  # [B, V]
    ranked = preds.gather(1, order)
    votes = torch.zeros(B, C)
    votes.scatter_add_(1, ranked[:, :n_kept], torch.ones(B, n_kept))
    out = votes.clone()
    for b in range(B):
        top = votes[b].max()
        ties = torch.nonzero(votes[b] == top).flatten()
        winner = int(ties[0])
        if len(ties) > 1:
            rest = ranked[b, n_kept:]
            hit = [int(p) for p in rest if bool((ties == p).any())]
            if hit:
                winner = hit[0]
            else:  # the tied class with the highest logit on the most confident remaining view
                v = int(order[b, n_kept]) if n_kept < V else int(order[b, 0])
                winner = int(ties[logits_BVC[b, v, ties].argmax()])
        out[b, winner] += 1
    return out


@dataclass
class ZeroRun:
    scores_NC: torch.Tensor
    labels_N: torch.Tensor
    n_skipped: int
    cost: dict[str, Any]


def run_zero(model: Any, data: Any, classifier: Any, cfg: ZeroConfig = ZeroConfig(), batch_size: int = 256,
             num_workers: int = 2, show_progress: bool = True) -> ZeroRun:
    """ZERO over every image of `data`, in the data set's order, with `classifier`'s class text features.
    Cost: `n_views` image-tower forwards per image, no text pass (the class features are computed once)."""
    views = TPTViews(model.preprocess, model.cfg.image_size, cfg.n_views, "crop")
    scores, labels, n_skipped, t_image = [], [], 0, 0.0
    t0 = time.perf_counter()
    for logits_BVC, labels_B, skipped, seconds in view_logits(model, data, classifier, views, cfg.seed, batch_size,
                                                              num_workers, show_progress=show_progress, desc="ZERO"):
        n_skipped += skipped
        t_image += seconds
        if len(labels_B):
            scores.append(zero_vote(logits_BVC.float(), cfg.n_kept))
            labels.append(labels_B)
    scores_NC, labels_N = (torch.cat(scores), torch.cat(labels)) if scores else (None, None)
    if distributed.active():
        scores_NC, labels_N = distributed.gather_cat([scores_NC, labels_N])
        n_skipped = distributed.sum_int(n_skipped)
    if scores_NC is None:
        raise UsageError("no images were evaluated (the data set is empty or every image was unreadable)")
    n = len(labels_N)
    total = time.perf_counter() - t0
    cost = {"n_images": n, "image_forwards": n * cfg.n_views, "image_forwards_per_image": cfg.n_views,
            "text_passes_per_image": 0, "text_backward_passes_per_image": 0, "views_kept": cfg.n_kept,
            "image_s": t_image, "total_s": total, "seconds_per_image": total / n, "augment": "crop",
            "config": asdict(cfg), "ranks": distributed.world_size()}
    return ZeroRun(scores_NC, labels_N, n_skipped, cost)


__all__ = ["ZeroConfig", "ZeroRun", "run_zero", "zero_vote"]
