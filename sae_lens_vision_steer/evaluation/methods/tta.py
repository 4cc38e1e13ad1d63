"""Prompt and test-time-adaptation baselines as evaluation-runner methods.

- `zeroshot_single`: CLIP zero-shot with the one template "a photo of a {}." (CLIP's and TPT's
  single prompt), on the shared backbone pass (no extra image forwards).
- `prompt_ensemble`: CLIP zero-shot with the data set's template ensemble (CLIP's 18 CIFAR / 80
  ImageNet templates, the bird template for CUB, CLIP-benchmark's for the OOD sets). The runner's
  `zeroshot` row already uses that ensemble unless `templates=`/`--templates` says otherwise, so this
  row then equals `zeroshot` (it says so in `info.same_as_zeroshot`) and records the templates.
- `tpt`, `ctpt`: test-time prompt tuning (`baselines/tta.py`); `zero`: ZERO's vote over augmented
  views (`baselines/zero.py`); `vs2_ens_aug`: VS2 + Ens + Aug, VS2 on every one of TPT's views, the
  softmax averaged. They read the raw images from `ctx.data` (augmentation needs them, not cached
  tokens) and run their own image forwards, which the runner counts (`MethodOutput.image_forwards`,
  results.json `timing.n_image_forwards`).

Kept out of `tta.py` so that the steering package never imports the runner at import time (the runner
imports this module when one of these names is asked for).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...baselines.prompt_tuning import text_backend
from ...baselines.tta import CTPT_LAMBDA, TPTConfig, run_tpt
from ...baselines.views import TPTViews, resolve_augment, view_logits
from ...baselines.zero import ZeroConfig, run_zero
from ...core import distributed
from ...core.errors import UsageError
from ...steering.vs2 import PAPER_GAMMA, PAPER_LAM, VS2Steering
from ..protocol import ENSEMBLE, SINGLE_TEMPLATE
from ..registry import MethodContext, MethodOutput, register_method

def _prompt_output(tokens_ND: torch.Tensor, ctx: MethodContext) -> MethodOutput:
    """Zero-shot on the shared pass; the runner classifies it with the row's protocol (`ctx.classifier`)."""
    templates = list(ctx.classifier.templates)
    run = ctx.run_classifier or ctx.classifier
    info = {"n_templates": len(templates), "templates": templates,
            "same_as_zeroshot": list(run.templates) == templates}
    return MethodOutput(tokens=tokens_ND, coverage=0.0, info=info)


@register_method("zeroshot_single", needs_sae=False, templates="single",
                 description='zero-shot with the single prompt "a photo of a {}."')
def _zeroshot_single(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _prompt_output(tokens_ND, ctx)


@register_method("prompt_ensemble", needs_sae=False, templates=ENSEMBLE,
                 description="zero-shot with the data set's prompt-template ensemble (CLIP's prompt ensembling)")
def _prompt_ensemble(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    if ctx.data is None:
        raise UsageError("prompt_ensemble needs the evaluation data set (its template ensemble)")
    return _prompt_output(tokens_ND, ctx)


def _check_text(ctx: MethodContext) -> None:
    text_backend(ctx.model)  # a text-less or unsupported text tower fails before the backbone pass
    if ctx.data is None:
        raise UsageError("TPT needs the evaluation images (ctx.data) to augment them")


def _tpt_output(tokens_ND: torch.Tensor, ctx: MethodContext, cfg: TPTConfig, images_per_step: int | None,
                desc: str) -> MethodOutput:
    _check_text(ctx)
    run = run_tpt(ctx.model, ctx.data, ctx.classifier.classnames, cfg, batch_size=ctx.batch_size,
                  num_workers=ctx.num_workers, images_per_step=images_per_step, show_progress=ctx.show_progress,
                  desc=desc)
    if len(run.logits_NC) != len(tokens_ND):
        raise UsageError(f"TPT classified {len(run.logits_NC)} images but the backbone pass has {len(tokens_ND)}")
    return MethodOutput(logits=run.logits_NC, coverage=1.0, image_forwards=run.cost["image_forwards"],
                        info={"cost": run.cost})


@register_method("tpt", needs_sae=False, prepare=_check_text, templates="single",
                 description="TPT: test-time prompt tuning (64 views, 10% most confident, 1 AdamW step, reset)")
def _tpt(tokens_ND: torch.Tensor, ctx: MethodContext, *, tpt_views: int = 64, tpt_selection_p: float = 0.1,
         tpt_lr: float = 5e-3, tpt_steps: int = 1, tpt_augment: str = "auto", tpt_seed: int = 0,
         tpt_images_per_step: int | None = None, **_: Any) -> MethodOutput:
    cfg = TPTConfig(n_views=tpt_views, selection_p=tpt_selection_p, lr=tpt_lr, steps=tpt_steps, augment=tpt_augment,
                    seed=tpt_seed)
    return _tpt_output(tokens_ND, ctx, cfg, tpt_images_per_step, "TPT")


@register_method("ctpt", needs_sae=False, prepare=_check_text, templates="single",
                 description="C-TPT: TPT with the ATFD (text-feature dispersion) regulariser, lambda 50")
def _ctpt(tokens_ND: torch.Tensor, ctx: MethodContext, *, ctpt_lambda: float = CTPT_LAMBDA, tpt_views: int = 64,
          tpt_selection_p: float = 0.1, tpt_lr: float = 5e-3, tpt_steps: int = 1, tpt_augment: str = "auto",
          tpt_seed: int = 0, tpt_images_per_step: int | None = None, **_: Any) -> MethodOutput:
    cfg = TPTConfig(n_views=tpt_views, selection_p=tpt_selection_p, lr=tpt_lr, steps=tpt_steps, augment=tpt_augment,
                    seed=tpt_seed, lam=ctpt_lambda)
    return _tpt_output(tokens_ND, ctx, cfg, tpt_images_per_step, "C-TPT")


def _check_images(ctx: MethodContext) -> None:
    if ctx.data is None:
        raise UsageError("this method augments the evaluation images: it needs the data set (ctx.data)")


def _own_rows(n: int, tokens_ND: torch.Tensor, what: str) -> None:
    if n != len(tokens_ND):
        raise UsageError(f"{what} classified {n} images but the backbone pass has {len(tokens_ND)}")


@register_method("zero", needs_sae=False, prepare=_check_images, templates="single",
                 description="ZERO: vote of the 10% most confident of 64 augmented views at zero temperature")
def _zero(tokens_ND: torch.Tensor, ctx: MethodContext, *, zero_views: int = 64, zero_keep: float = 0.1,
          zero_seed: int = 0, **_: Any) -> MethodOutput:
    run = run_zero(ctx.model, ctx.data, ctx.classifier, ZeroConfig(zero_views, zero_keep, zero_seed),
                   batch_size=ctx.batch_size, num_workers=ctx.num_workers, show_progress=ctx.show_progress)
    _own_rows(len(run.scores_NC), tokens_ND, "ZERO")
    return MethodOutput(logits=run.scores_NC, coverage=1.0, image_forwards=run.cost["image_forwards"],
                        info={"cost": run.cost})


@register_method("vs2_ens_aug", prepare=_check_images, templates=ENSEMBLE, gate_as="vs2",
                 description="VS2 + Ens + Aug: VS2 on the ensemble, softmax averaged over TPT's 64 views")
def _vs2_ens_aug(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
                 fvu_threshold: float | None = None, preserve_norm: bool = True, aug_views: int = 64,
                 aug_augment: str = "auto", aug_seed: int = 0, **_: Any) -> MethodOutput:
    """VS2 steers the CLS token of every view (a TransformerLens hook); the prediction is the argmax of the
    mean softmax over the views (view 0 is the image as zero-shot sees it), with TPT's augmentation."""
    sae = ctx.require_sae("vs2_ens_aug")
    steer = VS2Steering(sae, lam, gamma, hook_name=ctx.hook_name, fvu_threshold=fvu_threshold,
                        preserve_norm=preserve_norm)
    augment = resolve_augment(aug_augment, getattr(ctx.data, "dataset_id", None))  # type: ignore[arg-type]
    views = TPTViews(ctx.model.preprocess, ctx.model.cfg.image_size, aug_views, augment)
    t0 = time.perf_counter()
    probs = []
    for logits, labels, _, _ in view_logits(ctx.model, ctx.data, ctx.classifier, views, aug_seed, ctx.batch_size,
                                            ctx.num_workers, steer.fwd_hooks(ctx.model), ctx.show_progress,
                                            desc="VS2+Ens+Aug"):
        if len(labels):
            probs.append(logits.float().softmax(-1).mean(1))
    mean_NC = torch.cat(probs) if probs else None
    if distributed.active():
        mean_NC = distributed.gather_cat([mean_NC])[0]
    if mean_NC is None:
        raise UsageError("no images were evaluated (the data set is empty or every image was unreadable)")
    _own_rows(len(mean_NC), tokens_ND, "VS2 + Ens + Aug")
    n = len(mean_NC)
    cost = {"n_images": n, "image_forwards": n * aug_views, "image_forwards_per_image": aug_views,
            "augment": augment, "total_s": time.perf_counter() - t0}
    return MethodOutput(logits=mean_NC.clamp_min(1e-30).log(), coverage=steer.total_coverage,
                        image_forwards=n * aug_views, info={"cost": cost, "views": "mean softmax over TPT's views"})


__all__ = ["SINGLE_TEMPLATE"]
