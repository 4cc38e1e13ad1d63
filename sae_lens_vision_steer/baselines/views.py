"""Augmented views of the evaluation images, as TPT makes them, and a loader that feeds them to the image
tower: shared by TPT / C-TPT (`tta.py`), ZERO (`zero.py`) and VS2 + Ens + Aug (`view_logits`).

View 0 is `preprocess(image)` (what zero-shot sees); the others `preprocess(flip(random_resized_crop(image)))`
at the model's input size, with torchvision's AugMix on top for `augment="augmix"`. The views of image i
are drawn with the seed `(seed, i)`, so they are the same in any order, with any number of workers and
ranks.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..core import distributed

Augment = Literal["auto", "crop", "augmix"]
# TPT's rule (`augmix=len(set_id) > 1` in its code): ImageNet and its variants get random resized crops
# only, the fine-grained / cross-data-set benchmarks get AugMix on top.
IMAGENET_STYLE = ("tiny-imagenet", "imagenet", "imagenet-1k", "imagenet-a", "imagenet-r", "imagenet-v2",
                  "imagenet-sketch")


def resolve_augment(augment: Augment, dataset_id: str | None) -> Literal["crop", "augmix"]:
    if augment != "auto":
        return augment
    return "crop" if (dataset_id or "").lower() in IMAGENET_STYLE else "augmix"


class TPTViews:
    """PIL image -> `[n_views, 3, H, W]`: view 0 is `preprocess(image)` (what zero-shot sees), the rest
    `preprocess(flip(random_resized_crop(image)))`, with torchvision's AugMix (TPT's nine operations,
    `all_ops=False`) on the crop for `augment="augmix"`. Built on torchvision's transforms."""

    def __init__(self, preprocess: Callable[[Any], torch.Tensor], image_size: int | Sequence[int], n_views: int,
                 augment: Literal["crop", "augmix"]):
        from torchvision import transforms as T

        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (int(image_size), int(image_size))
        ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
        if augment == "augmix":
            ops.append(T.AugMix(all_ops=False))
        self.preprocess, self.augment, self.n_views, self.image_size = preprocess, T.Compose(ops), n_views, size
        self.kind = augment

    def __call__(self, image: Any) -> torch.Tensor:
        views = [self.preprocess(image)] + [self.preprocess(self.augment(image)) for _ in range(self.n_views - 1)]
        return torch.stack(views)


class ViewSet(Dataset):
    """The evaluation set's images as TPT view stacks, in the data set's order (bad images: None, as
    `ImageDataset.__getitem__` gives them). Each item's randomness is seeded by its position."""

    def __init__(self, data: Any, views: TPTViews, seed: int):
        self.data, self.views, self.seed = data, views, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int, int] | None:
        from ..data.base import BadImageError

        i = int(self.data.indices[idx]) if self.data.indices is not None else idx
        try:
            image = self.data.load_image(i)
        except BadImageError:
            if self.data.skip_bad_images:
                return None
            raise
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + idx)
            return self.views(image), self.data.label(idx), idx


def collate_views(items: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    kept = [it for it in items if it is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
    return torch.stack([it[0] for it in kept]), torch.tensor([it[1] for it in kept]), len(items) - len(kept)


def view_loader(data: Any, views: TPTViews, seed: int, images_per_batch: int, num_workers: int = 2) -> DataLoader:
    """`(views [B, V, 3, H, W], labels [B], n_skipped)` batches over `data` in order (under torchrun: this
    rank's contiguous block of the batch grid)."""
    viewset = ViewSet(data, views, seed)
    grid = dict(batch_sampler=distributed.batch_block(len(viewset), images_per_batch)) if distributed.active() else \
        dict(batch_size=images_per_batch, shuffle=False)
    return DataLoader(viewset, num_workers=num_workers, collate_fn=collate_views,
                      prefetch_factor=4 if num_workers > 0 else None, **grid)


@torch.no_grad()
def view_logits(model: Any, data: Any, classifier: Any, views: TPTViews, seed: int = 0, batch_size: int = 256,
                num_workers: int = 2, fwd_hooks: Sequence[tuple[str, Callable]] = (), show_progress: bool = True,
                desc: str = "views") -> Iterator[tuple[torch.Tensor, torch.Tensor, int, float]]:
    """Per batch of images: `(logits [B, V, C], labels [B], n_skipped, image seconds)`, the views of
    `max(1, batch_size // V)` images through the image tower together (under `fwd_hooks`, e.g. VS2)."""
    per_load = max(1, batch_size // views.n_views)
    loader = view_loader(data, views, seed, per_load, num_workers)
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for views_BV, labels_B, skipped in tqdm(loader, desc=desc, disable=not show_progress, unit="img batch"):
            if len(labels_B) == 0:
                yield torch.empty(0), labels_B, skipped, 0.0
                continue
            B, V = views_BV.shape[:2]
            t0 = time.perf_counter()
            flat = views_BV.reshape(B * V, *views_BV.shape[2:]).to(model.device)
            feats = torch.cat([model.encode_image(c) for c in flat.split(max(batch_size, V))])
            logits = classifier.logits(feats).reshape(B, V, -1).cpu()
            yield logits, labels_B, skipped, time.perf_counter() - t0


__all__ = ["IMAGENET_STYLE", "Augment", "TPTViews", "ViewSet", "collate_views", "resolve_augment", "view_logits",
           "view_loader"]
