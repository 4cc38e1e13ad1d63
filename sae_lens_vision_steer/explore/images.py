"""The images behind a cache: the data set re-opened as the cache recorded it, checked by fingerprint,
and thumbnails of what the model saw (its evaluation transform, un-normalised)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..activation_cache import ActivationStore, dataset_fingerprint
from ..data import ImageDataset, load_image_dataset
from ..sae.splice import HookedCLIP

THUMB_PX = 96


def open_cache_dataset(cache: ActivationStore, model: HookedCLIP, data_dir: str | Path | None = None
                       ) -> tuple[ImageDataset | None, str | None]:
    """The cache's data set with the model's transform, or `(None, why not)`.

    `data_dir` overrides the folder recorded in the cache (after a move). The data set must have the
    fingerprint the cache recorded (same files, same selection, same labels), else the images would
    not be the cached ones."""
    req: dict[str, Any] = cache.metadata.get("request", {})
    dataset, split = req.get("dataset"), req.get("split")
    folder = data_dir if data_dir is not None else req.get("data_dir")
    if dataset is None:
        return None, "the cache does not record its data set"
    if dataset.startswith("imagefolder:"):
        dataset = "imagefolder"
    try:
        ds = load_image_dataset(dataset, split, folder, transform=model.preprocess)
        n = int(req.get("n_images") or len(ds))
        ds = ds.subset(n) if n < len(ds) else ds
    except Exception as e:  # missing folder, no network for a Hub data set, ...
        return None, f"the cache's data set {dataset}/{split} could not be opened ({' '.join(str(e).split())})"
    want = req.get("dataset_fingerprint")
    if want and dataset_fingerprint(ds) != want:
        return None, (f"the data set {dataset}/{split} at {folder} is not the one the cache was made from "
                      "(different files, selection or labels)")
    return ds, None


def load_images(ds: ImageDataset, items: list[int]) -> torch.Tensor:
    """Preprocessed images `[n, 3, H, W]` for data-set items."""
    return torch.stack([ds[int(i)][0] for i in items]) if items else torch.zeros(0)


def thumbnail(model: HookedCLIP, image_CHW: torch.Tensor, px: int = THUMB_PX) -> Image.Image:
    """The model's input image, un-normalised, scaled to `px` (nearest pixels would hide nothing;
    bicubic looks like the photo)."""
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = torch.tensor(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))
    x = (image_CHW.float().cpu() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((px, px), Image.BICUBIC)
