"""Labelled image data sets, independent of models: `load_image_dataset` is the one entry point.

`base` holds the `ImageDataset` type and the local and Hub sources, `ood` the paper's OOD sets, `streaming`
and `stream_sources` WebDataset tars and `datasets` streams, `sources` the dispatch over one data set, and
`union` several data sets as one. This module sits above them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..core.errors import UsageError
from .base import (
    DATASET_ALIASES,
    HUB_DATASETS,
    ImageBatch,
    ImageDataset,
    collate_images,
    make_loader,
    shard_loader,
)
from .hub_access import check_hub_dataset_available
from .sources import load_single_dataset
from .union import UnionImageDataset, load_union_dataset


def load_image_dataset(
    dataset: str,
    split: str | None = None,
    data_dir: str | Path | None = None,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    limit: int | None = None,
    skip_bad_images: bool = False,
    stream: bool = False,
) -> ImageDataset:
    """One entry point for every supported source.

    - `dataset="tiny-imagenet", data_dir=".../tiny-imagenet-200"`: the local Tiny-ImageNet layout;
    - `dataset="cifar100", data_dir=".../cifar-100-python"`: the CIFAR-100 pickle release;
    - `dataset="imagefolder", data_dir=...`: `<class>/<image>` folders; `split` names a subfolder
      (`train`, `val`, ...); `None` or `"all"` is the whole folder;
    - `dataset in {"cifar100", "tiny-imagenet", "cub200"}` or any `owner/repo`, no `data_dir`: the Hub.
    `split=None` means `"val"` (the whole folder for `imagefolder`). `limit` keeps that many images,
    evenly spaced so that all classes appear. `stream=True`: `streaming.load_streamed_dataset` (WebDataset
    tar shards or a `datasets` stream; `limit` = the first `limit` samples). Several names
    (`"cifar100,cub200"` or a list) give a `union.UnionImageDataset` (`limit` per member; `data_dir` per
    member, see `union.member_data_dirs`).
    """
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be a positive number of images, got {limit}")
    if not isinstance(dataset, str) or "," in dataset:
        return load_union_dataset(dataset, split, data_dir, transform, limit, skip_bad_images)
    return load_single_dataset(dataset, split, data_dir, transform, limit, skip_bad_images, stream)


def check_data_available(dataset: str, data_dir: Any = None) -> None:
    """Before any model is loaded: refuse at once (one `MissingInputError` naming `data_dir` / `--data-dir`) a
    Hub data set, or a union member, that must come from the Hub while the Hub is off or unreachable and
    that is not in the Hugging Face cache (`hub_access.check_hub_dataset_available`)."""
    from .union import member_data_dirs, parse_dataset_list

    names = parse_dataset_list(dataset) if not isinstance(dataset, str) or "," in dataset else [dataset]
    for name, folder in zip(names, member_data_dirs(names, data_dir) if len(names) > 1 else [data_dir]):
        key = DATASET_ALIASES.get(name.lower(), name.lower()) if "/" not in name else name
        if folder is None and (key in HUB_DATASETS or "/" in key):
            check_hub_dataset_available(key, HUB_DATASETS[key]["repo"] if key in HUB_DATASETS else key)


__all__ = ["DATASET_ALIASES", "ImageBatch", "ImageDataset", "UnionImageDataset", "check_data_available",
           "collate_images", "load_image_dataset", "make_loader", "shard_loader"]
