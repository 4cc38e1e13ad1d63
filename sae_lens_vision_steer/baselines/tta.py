"""TPT (Shu et al., NeurIPS 2022) and C-TPT (Yoon et al., ICLR 2024): test-time prompt tuning.

For each test image, independently:

1. `n_views = 64` inputs: the image as the model's own preprocessing gives it, plus 63 augmented views
   (random resized crop + horizontal flip; AugMix on top for non-ImageNet data sets, as TPT does);
2. their image embeddings, computed once under `no_grad` (the image tower is frozen);
3. logits `logit_scale * normalize(f_v) @ normalize(T(ctx))^T` for a learnable prompt context
   (`prompt_tuning.PromptContextEncoder`, 4 tokens initialised from "a photo of a");
4. confidence selection: keep the `selection_p = 10%` views of lowest prediction entropy;
5. loss = entropy of the averaged probability of the kept views (TPT's `avg_entropy`), minus
   `lam * ATFD(T(ctx))` for C-TPT (`lam = 50`; ATFD = mean distance of the normalised class
   features from their centroid, maximised to spread the class features, which calibrates);
6. one AdamW step (lr 5e-3, torch's default weight decay 0.01, as TPT's code) on the context only;
7. the prediction: the original image's logits under the tuned context. The context and the
   optimizer then start afresh for the next image.

Several images are adapted at once with one context per image (`[B, n_ctx, W]`): their losses are
summed, so each image's context gets only its own gradient, and AdamW is elementwise, so this is the
same as B separate one-image runs (`tests/test_tta.py` checks it against a one-image reference).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core import distributed
from ..core.errors import InputError, UsageError
from .prompt_tuning import DEFAULT_CTX_INIT, PromptContextEncoder, atfd
from .views import IMAGENET_STYLE, Augment, TPTViews, ViewSet, resolve_augment, view_loader  # noqa: F401 (re-exported)

CTPT_LAMBDA = 50.0  # C-TPT's lambda (its scripts: --lambda_term 50)


@dataclass(frozen=True)
class TPTConfig:
    """TPT's settings (its defaults), and C-TPT's `lam` (0 for TPT)."""

    n_views: int = 64  # the original image + 63 augmented views (TPT: batch size 64)
    selection_p: float = 0.1  # keep the 10% most confident views (int(64 * 0.1) = 6)
    lr: float = 5e-3
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which TPT's code uses
    steps: int = 1
    ctx_init: str = DEFAULT_CTX_INIT
    augment: Augment = "auto"
    lam: float = 0.0  # C-TPT: weight of -ATFD in the loss
    seed: int = 0  # the views of image i are drawn with seed (seed, i): reproducible in any order

    def __post_init__(self) -> None:
        if self.n_views < 2:
            raise InputError(f"TPT needs the image and at least one augmented view (n_views >= 2), got {self.n_views}")
        if not 0 < self.selection_p <= 1:
            raise InputError(f"selection_p must be in (0, 1], got {self.selection_p}")
        if self.steps < 1:
            raise InputError(f"TPT takes at least one step, got steps={self.steps}")
        if self.augment not in ("auto", "crop", "augmix"):
            raise InputError(f"augment must be 'auto', 'crop' or 'augmix', got {self.augment!r}")

    @property
    def n_selected(self) -> int:
        return max(1, int(self.n_views * self.selection_p))


# ---------------------------------------------------------------------------------- the TPT step
def view_entropy(logits_VC: torch.Tensor) -> torch.Tensor:
    """Prediction entropy of each view (last dim: classes)."""
    logp = logits_VC.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def confident_views(logits_BVC: torch.Tensor, n_selected: int) -> torch.Tensor:
    """Indices `[B, k]` of the k views of lowest entropy (TPT's `select_confident_samples`)."""
    return view_entropy(logits_BVC).argsort(dim=-1)[..., :n_selected]


def avg_entropy(logits_BKC: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean probability over the views (dim -2): TPT's `avg_entropy`, in log space."""
    logp = logits_BKC.log_softmax(dim=-1)
    avg = logp.logsumexp(dim=-2) - math.log(logits_BKC.shape[-2])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(dim=-1)


def tpt_adapt(encoder: PromptContextEncoder, feats_BVE: torch.Tensor, logit_scale: float, cfg: TPTConfig,
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Tune a fresh context per image on its views and return the original view's logits `[B, C]`
    under the tuned context. `feats_BVE`: the views' image embeddings (view 0 = the original)."""
    feats = F.normalize(feats_BVE.detach().float(), dim=-1)
    B = feats.shape[0]
    ctx = encoder.init_ctx.detach().float()[None].repeat(B, 1, 1).requires_grad_(True)  # reset: every image
    opt = torch.optim.AdamW([ctx], lr=cfg.lr, weight_decay=cfg.weight_decay)  # and a fresh optimizer state
    selected = None
    stats: dict[str, list[float]] = {"entropy_before": [], "atfd_before": []}
    with torch.enable_grad():
        for step in range(cfg.steps):
            w_BCE = encoder.class_weights(ctx)
            logits = logit_scale * feats @ w_BCE.transpose(-1, -2)  # [B, V, C]
            if selected is None:  # selected once, on the initial context (as TPT)
                selected = confident_views(logits.detach(), cfg.n_selected)
            kept = logits.gather(1, selected[..., None].expand(-1, -1, logits.shape[-1]))
            loss_B = avg_entropy(kept)
            dispersion = atfd(w_BCE)
            if step == 0:
                stats["entropy_before"] = loss_B.detach().tolist()
                stats["atfd_before"] = dispersion.detach().tolist()
            if cfg.lam:
                loss_B = loss_B - cfg.lam * dispersion
            opt.zero_grad(set_to_none=True)
            loss_B.sum().backward()  # per-image losses: each context gets its own image's gradient only
            opt.step()
    with torch.no_grad():
        w_BCE = encoder.class_weights(ctx)
        logits_BC = logit_scale * torch.einsum("be,bce->bc", feats[:, 0], w_BCE)
    return logits_BC, {"selected": selected, "ctx": ctx.detach(), **stats}


@dataclass
class TPTRun:
    logits_NC: torch.Tensor
    labels_N: torch.Tensor
    n_skipped: int
    cost: dict[str, Any]


def run_tpt(model: Any, data: Any, classnames: Sequence[str], cfg: TPTConfig = TPTConfig(), batch_size: int = 256,
            num_workers: int = 2, images_per_step: int | None = None, show_progress: bool = True, desc: str = "TPT",
            ) -> TPTRun:
    """TPT (or C-TPT, `cfg.lam > 0`) over every image of `data`, in the data set's order.

    The views of `max(1, batch_size // n_views)` images go through the image tower together; their
    contexts are tuned `images_per_step` at a time (default: as many as keep one text pass at about
    1,024 prompts, `1024 // C`, since the backward holds every prompt's activations). Returns the logits and the cost: image-tower forwards
    (`n_views` per image), text-tower passes over the C class prompts (`steps` with a backward, one
    without) and the seconds spent in each part.
    """
    encoder = PromptContextEncoder(model, classnames, cfg.ctx_init).to(model.device)
    augment = resolve_augment(cfg.augment, getattr(data, "dataset_id", None))
    views = TPTViews(model.preprocess, model.cfg.image_size, cfg.n_views, augment)
    scale = float(model.logit_scale)
    per_load = max(1, batch_size // cfg.n_views)
    images_per_step = images_per_step or max(1, 1024 // len(classnames))
    loader = view_loader(data, views, cfg.seed, per_load, num_workers)  # torchrun: this rank's block
    logits, labels, n_skipped = [], [], 0
    t_image = t_text = 0.0
    entropy_before, atfd_before = [], []
    t0 = time.perf_counter()
    for views_BV, labels_B, skipped in tqdm(loader, desc=desc, disable=not show_progress, unit="img batch"):
        n_skipped += skipped
        if len(labels_B) == 0:
            continue
        B, V = views_BV.shape[:2]
        t1 = time.perf_counter()
        with torch.no_grad():  # the frozen image tower: view embeddings once, batched
            flat = views_BV.reshape(B * V, *views_BV.shape[2:]).to(model.device)
            feats = torch.cat([model.encode_image(c) for c in flat.split(max(batch_size, V))]).reshape(B, V, -1)
        t2 = time.perf_counter()
        for s in range(0, B, images_per_step):
            out, info = tpt_adapt(encoder, feats[s:s + images_per_step], scale, cfg)
            logits.append(out.cpu())
            entropy_before += info["entropy_before"]
            atfd_before += info["atfd_before"]
        t_image += t2 - t1
        t_text += time.perf_counter() - t2
        labels.append(labels_B)
    logits_NC, labels_N = (torch.cat(logits), torch.cat(labels)) if logits else (None, None)
    if distributed.active():
        logits_NC, labels_N = distributed.gather_cat([logits_NC, labels_N])
        n_skipped = distributed.sum_int(n_skipped)
        sums = distributed.all_gather_object((sum(entropy_before), sum(atfd_before)))
        entropy_before, atfd_before = [sum(e for e, _ in sums)], [sum(a for _, a in sums)]
    if logits_NC is None:
        raise UsageError("no images were evaluated (the data set is empty or every image was unreadable)")
    n = len(labels_N)
    C = len(classnames)
    cost = {"n_images": n, "image_forwards": n * cfg.n_views, "image_forwards_per_image": cfg.n_views,
            "text_passes_per_image": cfg.steps + 1, "text_backward_passes_per_image": cfg.steps,
            "prompts_per_text_pass": C, "image_s": t_image, "text_s": t_text,
            "total_s": time.perf_counter() - t0, "seconds_per_image": (time.perf_counter() - t0) / n,
            "augment": augment, "config": asdict(cfg), "ranks": distributed.world_size(),
            "mean_selected_entropy_before": float(sum(entropy_before) / n),
            "mean_atfd_before": float(sum(atfd_before) / n)}
    return TPTRun(logits_NC, labels_N, n_skipped, cost)


__all__ = ["CTPT_LAMBDA", "IMAGENET_STYLE", "TPTConfig", "TPTRun", "TPTViews", "ViewSet", "avg_entropy",
           "confident_views", "resolve_augment", "run_tpt", "tpt_adapt", "view_entropy"]
