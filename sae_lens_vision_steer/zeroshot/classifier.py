"""Zero-shot classification with CLIP: class weights from prompt ensembles, and accuracy metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.errors import UsageError
from ..data.base import ImageDataset, make_loader
from ..data.resources import DEFAULT_TEMPLATES, templates_for
from ..sae.splice import HookedCLIP


@dataclass
class ZeroShotResult:
    top1: float  # percent
    top5: float
    mean_per_class: float
    per_class_acc: np.ndarray  # [n_classes] percent, NaN for classes absent from the data
    predictions: np.ndarray  # [N] argmax class
    labels: np.ndarray  # [N]
    n_images: int
    n_skipped: int = 0

    def summary(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("per_class_acc", "predictions", "labels")}
        return d


def accuracy_metrics(logits_NC: torch.Tensor, labels_N: torch.Tensor, n_skipped: int = 0) -> ZeroShotResult:
    """Top-1, top-5, mean per-class accuracy and per-class accuracies from logits."""
    n_classes = logits_NC.shape[1]
    labels_N = labels_N.to(logits_NC.device)
    topk = logits_NC.topk(min(5, n_classes), dim=1).indices
    pred = topk[:, 0]
    correct1 = (pred == labels_N).float()
    correct5 = (topk == labels_N[:, None]).any(dim=1).float()
    counts = torch.bincount(labels_N, minlength=n_classes).double()
    hits = torch.bincount(labels_N, weights=correct1.double(), minlength=n_classes)
    per_class = torch.where(counts > 0, 100 * hits / counts.clamp(min=1), torch.full_like(counts, float("nan")))
    return ZeroShotResult(
        top1=100 * correct1.mean().item(),
        top5=100 * correct5.mean().item(),
        mean_per_class=float(np.nanmean(per_class.cpu().numpy())),
        per_class_acc=per_class.cpu().numpy(),
        predictions=pred.cpu().numpy(),
        labels=labels_N.cpu().numpy(),
        n_images=len(labels_N),
        n_skipped=n_skipped,
    )


class ZeroShotClassifier:
    """CLIP zero-shot head: `logits = logit_scale * normalize(image_embed) @ W`.

    `W[:, c]` is the class-`c` text embedding: each prompt embedding normalised, averaged over the
    templates, then normalised again (CLIP's prompt ensembling).

    With `text_cache=DIR` the matrix is read from / written to an on-disk cache keyed by the model's
    weights, the class names and the template strings (`text_cache.py`); `text_cache_status` says
    `hit`, `built`, `rebuilt` (a mismatched file was refused) or `off`.
    """

    def __init__(self, model: HookedCLIP, classnames: Sequence[str], templates: str | Sequence[str] = "single",
                 batch_size: int = 256, show_progress: bool = True, text_cache: str | Path | None = None):
        self.classnames = list(classnames)
        templates_name = DEFAULT_TEMPLATES.get(templates, templates) if isinstance(templates, str) else None
        self.templates = templates_for(templates) if isinstance(templates, str) else list(templates)
        self.logit_scale = model.logit_scale

        def build() -> torch.Tensor:
            return self.build_class_weights(model, self.classnames, self.templates, batch_size, show_progress)

        self.text_cache_path: Path | None = None
        if text_cache is None:
            self.weights_EC, self.text_cache_status = build(), "off"
        else:
            from .text_cache import cached_class_weights

            self.weights_EC, self.text_cache_status, self.text_cache_path = cached_class_weights(
                model, self.classnames, self.templates, templates_name, text_cache, build)

    @staticmethod
    @torch.no_grad()
    def build_class_weights(model: HookedCLIP, classnames: Sequence[str], templates: Sequence[str],
                            batch_size: int = 256, show_progress: bool = True) -> torch.Tensor:
        prompts = [t.format(c) for c in classnames for t in templates]
        embeds = []
        for i in tqdm(range(0, len(prompts), batch_size), desc="text prompts", disable=not show_progress, leave=False):
            embeds.append(model.encode_text(model.tokenize(prompts[i:i + batch_size]), normalize=True).float())
        per_prompt = torch.cat(embeds).reshape(len(classnames), len(templates), -1)
        return F.normalize(F.normalize(per_prompt, dim=-1).mean(dim=1), dim=-1).T.contiguous()

    def logits(self, image_embed_BE: torch.Tensor) -> torch.Tensor:
        w = self.weights_EC.to(image_embed_BE.device)
        return self.logit_scale * F.normalize(image_embed_BE.float(), dim=-1) @ w

    def predict(self, image_embed_BE: torch.Tensor) -> torch.Tensor:
        return self.logits(image_embed_BE).argmax(dim=-1)

    @torch.no_grad()
    def evaluate(self, model: HookedCLIP, data: ImageDataset | DataLoader, fwd_hooks: Iterable[tuple[str, Callable]] = (),
                 batch_size: int = 256, num_workers: int = 2, show_progress: bool = True) -> ZeroShotResult:
        """Classify every image of `data` (optionally under `fwd_hooks`) and score it."""
        loader = data if isinstance(data, DataLoader) else make_loader(data, batch_size, num_workers,
                                                                        model.device.type == "cuda")
        all_logits, all_labels, n_skipped = [], [], 0
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            for batch in tqdm(loader, desc="zero-shot", disable=not show_progress, unit="batch"):
                n_skipped += batch.n_skipped
                if len(batch.labels) == 0:
                    continue
                embeds = model.encode_image(batch.images.to(model.device, non_blocking=True))
                all_logits.append(self.logits(embeds).cpu())
                all_labels.append(batch.labels)
        if not all_logits:
            raise UsageError("no images were evaluated (the data set is empty or every image was unreadable)")
        return accuracy_metrics(torch.cat(all_logits), torch.cat(all_labels), n_skipped)
