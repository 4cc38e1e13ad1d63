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
    """One data set (not a union) from any supported source: see `load_image_dataset`.

    - `dataset="tiny-imagenet", data_dir=".../tiny-imagenet-200"`: the local Tiny-ImageNet layout;
    - `dataset="cifar100", data_dir=".../cifar-100-python"`: the CIFAR-100 pickle release;
    - `dataset="imagefolder", data_dir=...`: `<class>/<image>` folders; `split` names a subfolder
      (`train`, `val`, ...); `None` or `"all"` is the whole folder;
    - `dataset in {"cifar100", "tiny-imagenet", "cub200"}` or any `owner/repo`, no `data_dir`: the Hub.
    `split=None` means `"val"` (the whole folder for `imagefolder`). `limit` keeps that many images,
    evenly spaced so that all classes appear. `stream=True`: `streaming.load_streamed_dataset` (WebDataset
    tar shards or a `datasets` stream; `limit` = the first `limit` samples). Several names
    (`"cifar100,cub200"` or a list) give a `union.UnionImageDataset` (`limit` per member; `data_dir` per member, see `union.member_data_dirs`).
    """
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
