"""Prompt and test-time-adaptation baselines as evaluation-runner methods.

- `zeroshot_single`: CLIP zero-shot with the one template "a photo of a {}." (CLIP's and TPT's
  single prompt), on the shared backbone pass (no extra image forwards).
- `prompt_ensemble`: CLIP zero-shot with the data set's template ensemble (CLIP's 18 CIFAR / 80
  ImageNet templates, the bird template for CUB, CLIP-benchmark's for the OOD sets). The runner's
  `zeroshot` row already uses that ensemble unless `templates=`/`--templates` says otherwise, so this
  row then equals `zeroshot` (it says so in `info.same_as_zeroshot`) and records the templates.
- `tpt`, `ctpt`: test-time prompt tuning (`tta.py`). They read the raw images from `ctx.data`
  (augmentation needs them, not cached tokens) and run their own image forwards, which the runner
  counts (`MethodOutput.image_forwards`, results.json `timing.n_image_forwards`).

Kept out of `tta.py` so that the steering package never imports the runner at import time (the runner
imports this module when one of these names is asked for).
"""

from __future__ import annotations

from typing import Any

import torch

from ...baselines.prompt_tuning import text_backend
from ...baselines.tta import CTPT_LAMBDA, TPTConfig, run_tpt
from ...core.errors import UsageError
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


__all__ = ["SINGLE_TEMPLATE"]
