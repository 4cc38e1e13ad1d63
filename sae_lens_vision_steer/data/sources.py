"""One labelled image data set from any source: the dispatch over local folders, the Hub, the OOD sets and
streams. `data.load_image_dataset` adds unions of several."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..core.errors import MissingInputError, UsageError
from .base import (
    DATASET_ALIASES,
    HUB_DATASETS,
    Cifar100Pickle,
    ImageDataset,
    ImageFolderDataset,
    TinyImageNetFolder,
    load_hub_dataset,
)
from .ood import OOD_DATASETS, load_ood_dataset, resolve_ood_name
from .streaming import load_streamed_dataset


def load_single_dataset(
    dataset: str,
    split: str | None = None,
    data_dir: str | Path | None = None,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    limit: int | None = None,
    skip_bad_images: bool = False,
    stream: bool = False,
) -> ImageDataset:
    """One data set (not a union) from any supported source; the arguments are `data.load_image_dataset`'s."""
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be a positive number of images, got {limit}")
    name = DATASET_ALIASES.get(dataset.lower(), dataset.lower()) if "/" not in dataset else dataset
    if stream:  # read in order from tar shards or a `datasets` stream, nothing downloaded first (streaming.py)
        return load_streamed_dataset(name, split or "val", data_dir, transform, limit, skip_bad_images)
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.exists():
            raise MissingInputError(f"data directory {data_dir} does not exist")
        if name == "tiny-imagenet":
            ds: ImageDataset = TinyImageNetFolder(data_dir, split or "val", transform, skip_bad_images)
        elif name == "cifar100":
            ds = Cifar100Pickle(data_dir, split or "val", transform, skip_bad_images)
        elif name == "imagefolder":
            ds = ImageFolderDataset(data_dir, split, transform, skip_bad_images)
        else:
            raise UsageError(f"no local loader for dataset {dataset!r}; use tiny-imagenet, cifar100 or imagefolder")
    else:
        if name == "imagefolder":
            raise UsageError("dataset 'imagefolder' needs data_dir")
        if resolve_ood_name(name):
            ds = load_ood_dataset(resolve_ood_name(name), split or "val", transform, skip_bad_images)
        elif "/" not in name and name not in HUB_DATASETS:
            raise UsageError(f"unknown dataset {dataset!r}; supported: {', '.join([*HUB_DATASETS, *OOD_DATASETS])}, "
                             "imagefolder (with a data folder), or a Hub repo id owner/name")
        else:
            ds = load_hub_dataset(name, split or "val", transform, skip_bad_images)
    return ds.subset(limit)
