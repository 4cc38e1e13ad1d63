"""Several labelled data sets as one: the paper's "generalized" SAE, trained on the union of training
splits, with its FVU gate calibrated on (part of) that union and its accuracy evaluated per data set.

    union = load_union_dataset(["cifar100", "cub200", "tiny-imagenet"], split="train",
                               transform=model.preprocess, limit=5000)      # limit: per member
    cache = cache_activations(model, union, hook, "runs/union/cache")       # one cache, like any data set
    cache_dataset_names(cache)             # activation_cache.union: ['cifar100', 'cub200', 'tiny-imagenet']
    cache.dataset_ids()                    # [n_rows] int64: the member of each row
    member_rows(cache, "cub200")           # activation_cache.union: row indices of one member
    tau, info = gate_threshold(sae, cache, 0.99, datasets=["cifar100", "tiny-imagenet"])   # training.gate
    results = evaluate_members(model, ["cifar100", "cub200", "tiny-imagenet"], sae, split="val", ...)

A union is an `ImageDataset` whose items are its members' items in order (member 0's images, then
member 1's, ...). Labels stay in each member's own class space; the member of an item is
`dataset_ids[i]`. The cache records the members (id, split, image count, fingerprint, first image
index) in its request, so the member of every row follows from its `image_index`. Single-data-set
caches are unchanged. A union has no single class list: zero-shot evaluation runs per member.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.errors import InputError, UsageError
from ..core.identity import dataset_fingerprint, stable_repr
from .base import ImageDataset
from .sources import load_single_dataset

MEMBER_JOINER = "+"  # the union's `dataset_id`: "cifar100+cub200+tiny-imagenet"

class UnionMismatchError(InputError):
    """Members (data sets or caches) that cannot be combined: they disagree on the model, hook, ..."""


def parse_dataset_list(datasets: str | Sequence[str]) -> list[str]:
    """`"cifar100,cub200"` or `["cifar100", "cub200"]` -> names; empty entries and duplicates (after
    resolving aliases such as `cub` = `cub200`) are refused."""
    from .base import DATASET_ALIASES

    items = datasets.split(",") if isinstance(datasets, str) else list(datasets)
    names = [str(t).strip() for t in items]
    if any(not n for n in names):
        raise UsageError(f"empty data set name in {datasets!r}")
    seen: dict[str, str] = {}
    for n in names:
        key = n if "/" in n else DATASET_ALIASES.get(n.lower(), n.lower())
        if key in seen and key != "imagefolder":  # imagefolder members differ by their folder (checked later)
            raise UsageError(f"data set {n!r} is given twice in {datasets!r} (as {seen[key]!r} and {n!r})")
        seen[key] = n
    return names


def is_union(datasets: str | Sequence[str] | None) -> bool:
    """Whether a `--dataset` value names several data sets."""
    if datasets is None:
        return False
    return ("," in datasets) if isinstance(datasets, str) else len(list(datasets)) > 1


def member_data_dirs(names: Sequence[str], data_dir: Any) -> list[str | None]:
    """One data folder (or None: the Hub) per member, from None, a sequence aligned with the members, a
    mapping `{member: folder}`, or text: `"a=DIR,b=DIR"` or `",,DIR"` (aligned, empty = the Hub)."""
    if data_dir is None:
        return [None] * len(names)
    if isinstance(data_dir, (str, Path)):
        text = str(data_dir)
        parts = [p.strip() for p in text.split(",")]
        if all("=" in p for p in parts if p) and any(parts):
            data_dir = dict(p.split("=", 1) for p in parts if p)
        elif len(parts) == len(names):
            data_dir = parts
        else:
            raise UsageError(f"--data-dir {text!r} for the union {','.join(names)}: give one folder per member, "
                             "comma-separated in member order (empty = from the Hub), or member=folder pairs")
    if isinstance(data_dir, Mapping):
        unknown = [k for k in data_dir if k not in names]
        if unknown:
            raise UsageError(f"data folder given for {unknown}, which is not a member of {list(names)}")
        return [str(data_dir[n]) if data_dir.get(n) else None for n in names]
    dirs = [str(d) if d else None for d in data_dir]
    if len(dirs) != len(names):
        raise UsageError(f"{len(dirs)} data folders for {len(names)} members ({list(names)})")
    return dirs


class UnionImageDataset(ImageDataset):
    """Members' items in order; `__getitem__(i)` gives `(image, member-local label, i)`.

    `members` are `ImageDataset`s with their own class names (`members[m].classnames`), `offsets[m]` is
    the first item of member `m`, `dataset_ids` the member of every item. The members must share one
    preprocessing transform (one model's), and none may appear twice.
    """

    def __init__(self, members: Sequence[ImageDataset]):
        members = list(members)
        if len(members) < 2:
            raise UsageError(f"a union needs at least two data sets, got {len(members)}")
        keys = [(m.dataset_id, m.split) for m in members]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise UsageError(f"data set {dup[0][0]!r} split {dup[0][1]!r} appears twice in the union")
        forms = {stable_repr(m.transform) for m in members}
        if len(forms) > 1:
            raise UnionMismatchError("the union's members are preprocessed differently (" + "; ".join(
                f"{m.dataset_id}: {stable_repr(m.transform)[:80]}" for m in members) + "); load them with one "
                "model's transform")
        super().__init__(members[0].transform, any(m.skip_bad_images for m in members))
        self.members = members
        self._fingerprints = [dataset_fingerprint(m) for m in members]
        self._rebuild()
        self.dataset_id = MEMBER_JOINER.join(m.dataset_id for m in members)
        splits = list(dict.fromkeys(m.split for m in members))
        self.split = splits[0] if len(splits) == 1 else MEMBER_JOINER.join(m.split for m in members)

    def _rebuild(self) -> None:
        self.offsets = np.cumsum([0] + [len(m) for m in self.members]).astype(np.int64)
        self.labels = np.concatenate([np.asarray(m.subset_labels, dtype=np.int64) for m in self.members])
        self.dataset_ids = np.repeat(np.arange(len(self.members)), np.diff(self.offsets))

    @property
    def member_names(self) -> list[str]:
        return [m.dataset_id for m in self.members]

    @property
    def classnames(self) -> list[str]:  # type: ignore[override]
        raise UsageError(f"{self.dataset_id} is a union of data sets with their own classes; evaluate each member "
                         "(union.members[i].classnames; vision-steer eval --dataset a,b evaluates per data set)")

    def _locate(self, i: int) -> tuple[int, int]:
        m = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if not 0 <= i < len(self) or m >= len(self.members):
            raise IndexError(f"item {i} is outside the union's {len(self)} items")
        return m, int(i - self.offsets[m])

    def _underlying(self, m: int, j: int) -> int:
        idx = self.members[m].indices
        return int(idx[j]) if idx is not None else j

    def load_image(self, i: int) -> Image.Image:
        m, j = self._locate(i)
        return self.members[m].load_image(self._underlying(m, j))

    def describe(self, i: int) -> str:
        m, j = self._locate(i)
        return f"{self.members[m].dataset_id}: {self.members[m].describe(self._underlying(m, j))}"

    def __getitem__(self, idx: int):
        m, j = self._locate(int(idx))
        item = self.members[m][j]
        return None if item is None else (item[0], item[1], int(idx))

    def subset(self, n: int | None) -> "UnionImageDataset":
        """`n` images of every member (evenly spaced in each), not `n` in all."""
        if n is not None:
            for m in self.members:
                m.subset(n)
            self._fingerprints = [dataset_fingerprint(m) for m in self.members]
            self._rebuild()
        return self

    def member_records(self) -> list[dict[str, Any]]:
        """What a cache records of each member (portable: no local folder)."""
        return [{"dataset": m.dataset_id, "dataset_path": m.hub_repo or m.dataset_id, "split": m.split,
                 "n_images": len(m), "dataset_fingerprint": fp, "first_image": int(first)}
                for m, fp, first in zip(self.members, self._fingerprints, self.offsets)]

    def fingerprint(self) -> str:
        """sha256 over the members' records (ids, splits, counts, fingerprints, order)."""
        text = "\n".join(f"{r['dataset']}|{r['split']}|{r['n_images']}|{r['dataset_fingerprint']}"
                         for r in self.member_records())
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_union_dataset(datasets: str | Sequence[str], split: str | None = None, data_dir: Any = None,
                       transform: Callable[[Image.Image], torch.Tensor] | None = None, limit: int | None = None,
                       skip_bad_images: bool = False) -> UnionImageDataset:
    """Each member through `load_single_dataset` (so an unknown name gets its list of supported ones),
    with the same `split`, `transform` and `skip_bad_images`; `limit` images of every member;
    `data_dir` as in `member_data_dirs`."""
    names = parse_dataset_list(datasets)
    dirs = member_data_dirs(names, data_dir)
    members = [load_single_dataset(n, split=split, data_dir=d, transform=transform, limit=limit,
                                   skip_bad_images=skip_bad_images) for n, d in zip(names, dirs)]
    return UnionImageDataset(members)
