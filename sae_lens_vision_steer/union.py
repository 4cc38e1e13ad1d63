"""Several labelled data sets as one: the paper's "generalized" SAE, trained on the union of training
splits, with its FVU gate calibrated on (part of) that union and its accuracy evaluated per data set.

    union = load_union_dataset(["cifar100", "cub200", "tiny-imagenet"], split="train",
                               transform=model.preprocess, limit=5000)      # limit: per member
    cache = cache_activations(model, union, hook, "runs/union/cache")       # one cache, like any data set
    cache_dataset_names(cache)             # ['cifar100', 'cub200', 'tiny-imagenet']
    cache.dataset_ids()                    # [n_rows] int64: the member of each row
    member_rows(cache, "cub200")           # row indices of one member
    tau, info = union_fvu_threshold(sae, cache, 0.99, datasets=["cifar100", "tiny-imagenet"])
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

from .data import ImageDataset, load_image_dataset
from .errors import InputError

MEMBER_JOINER = "+"  # the union's `dataset_id`: "cifar100+cub200+tiny-imagenet"
# What must agree between caches combined for one purpose (the gate's union of reference caches).
_AGREEING_FIELDS = ("model_name", "pretrained", "act_fn", "model_kwargs", "model_config", "model_fingerprint",
                    "positions")


class UnionMismatchError(InputError):
    """Members (data sets or caches) that cannot be combined: they disagree on the model, hook, ..."""


def parse_dataset_list(datasets: str | Sequence[str]) -> list[str]:
    """`"cifar100,cub200"` or `["cifar100", "cub200"]` -> names; empty entries and duplicates (after
    resolving aliases such as `cub` = `cub200`) are refused."""
    from .data import DATASET_ALIASES

    items = datasets.split(",") if isinstance(datasets, str) else list(datasets)
    names = [str(t).strip() for t in items]
    if any(not n for n in names):
        raise ValueError(f"empty data set name in {datasets!r}")
    seen: dict[str, str] = {}
    for n in names:
        key = n if "/" in n else DATASET_ALIASES.get(n.lower(), n.lower())
        if key in seen and key != "imagefolder":  # imagefolder members differ by their folder (checked later)
            raise ValueError(f"data set {n!r} is given twice in {datasets!r} (as {seen[key]!r} and {n!r})")
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
            raise ValueError(f"--data-dir {text!r} for the union {','.join(names)}: give one folder per member, "
                             "comma-separated in member order (empty = from the Hub), or member=folder pairs")
    if isinstance(data_dir, Mapping):
        unknown = [k for k in data_dir if k not in names]
        if unknown:
            raise ValueError(f"data folder given for {unknown}, which is not a member of {list(names)}")
        return [str(data_dir[n]) if data_dir.get(n) else None for n in names]
    dirs = [str(d) if d else None for d in data_dir]
    if len(dirs) != len(names):
        raise ValueError(f"{len(dirs)} data folders for {len(names)} members ({list(names)})")
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
            raise ValueError(f"a union needs at least two data sets, got {len(members)}")
        keys = [(m.dataset_id, m.split) for m in members]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"data set {dup[0][0]!r} split {dup[0][1]!r} appears twice in the union")
        from .activation_cache import dataset_fingerprint
        from .activation_cache.format import _stable_repr

        forms = {_stable_repr(m.transform) for m in members}
        if len(forms) > 1:
            raise UnionMismatchError("the union's members are preprocessed differently (" + "; ".join(
                f"{m.dataset_id}: {_stable_repr(m.transform)[:80]}" for m in members) + "); load them with one "
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
        raise ValueError(f"{self.dataset_id} is a union of data sets with their own classes; evaluate each member "
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
            from .activation_cache import dataset_fingerprint

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
    """Each member through `load_image_dataset` (so an unknown name gets its list of supported ones),
    with the same `split`, `transform` and `skip_bad_images`; `limit` images of every member;
    `data_dir` as in `member_data_dirs`."""
    names = parse_dataset_list(datasets)
    dirs = member_data_dirs(names, data_dir)
    members = [load_image_dataset(n, split=split, data_dir=d, transform=transform, limit=limit,
                                  skip_bad_images=skip_bad_images) for n, d in zip(names, dirs)]
    return UnionImageDataset(members)


# ---------------------------------------------------------------------------------- caches of a union
def cache_members(cache: Any) -> list[dict[str, Any]]:
    """The members a cache was made from: its `request["members"]`, or the one data set of a plain cache."""
    req = cache.metadata.get("request", {})
    if req.get("members"):
        return [dict(m) for m in req["members"]]
    return [{"dataset": req.get("dataset"), "dataset_path": req.get("dataset_path"), "split": req.get("split"),
             "n_images": req.get("n_images"), "dataset_fingerprint": req.get("dataset_fingerprint"), "first_image": 0}]


def cache_dataset_names(cache: Any) -> list[str]:
    return [m["dataset"] for m in cache_members(cache)]


def _member_index(cache: Any, dataset: str | int) -> int:
    names = cache_dataset_names(cache)
    if isinstance(dataset, (int, np.integer)):
        if not 0 <= int(dataset) < len(names):
            raise IndexError(f"member {dataset} is outside the {len(names)} data sets of {cache.root}")
        return int(dataset)
    from .data import DATASET_ALIASES

    key = DATASET_ALIASES.get(str(dataset).lower(), str(dataset))
    if key not in names:
        raise ValueError(f"data set {dataset!r} is not in the cache at {cache.root}; it holds {names}")
    return names.index(key)


def member_rows(cache: Any, dataset: str | int) -> np.ndarray:
    """Row indices (ascending) of one member of a union cache, by name or position."""
    return np.nonzero(cache.dataset_ids() == _member_index(cache, dataset))[0]


def check_caches_agree(caches: Sequence[Any], hook_name: str | None = None) -> None:
    """Caches combined into one union (the gate's reference) must come from one model (name, tag,
    architecture, weight fingerprint) at the same token positions, and hold `hook_name` at one width.
    Every difference is named; the same cache twice is refused."""
    if len(caches) < 2:
        return
    roots = [Path(c.root).resolve() for c in caches]
    if len(set(roots)) < len(roots):
        raise ValueError(f"the same cache is given twice: {[str(r) for r in roots]}")
    first, req0 = caches[0], caches[0].metadata.get("request", {})
    problems = []
    for c in caches[1:]:
        req = c.metadata.get("request", {})
        for k in _AGREEING_FIELDS:
            if req.get(k) != req0.get(k):
                problems.append(f"{k}: {first.root} has {_short(req0.get(k))}, {c.root} has {_short(req.get(k))}")
        if hook_name is not None:
            if hook_name not in c.hook_names or hook_name not in first.hook_names:
                problems.append(f"hook {hook_name!r}: {first.root} holds {first.hook_names}, "
                                f"{c.root} holds {c.hook_names}")
            elif c.d_in(hook_name) != first.d_in(hook_name):
                problems.append(f"width at {hook_name!r}: {first.d_in(hook_name)} vs {c.d_in(hook_name)}")
    overlap = [n for n, k in _count(m for c in caches for m in _member_keys(c)).items() if k > 1]
    if overlap:
        problems.append(f"data set {overlap[0][0]!r} split {overlap[0][1]!r} is in more than one of the caches")
    if problems:
        raise UnionMismatchError("the caches cannot be combined: " + "; ".join(problems))


def _member_keys(cache: Any) -> list[tuple[str, str]]:
    return [(m["dataset"], m["split"]) for m in cache_members(cache)]


def _count(items: Any) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for it in items:
        out[it] = out.get(it, 0) + 1
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 90 else text[:87] + "..."


def union_fvu_threshold(sae: Any, caches: Any, quantile: float, datasets: Sequence[str] | str | None = None,
                        hook_name: str | None = None, model: Any = None,
                        batch_size: int = 8192) -> tuple[float, dict[str, Any]]:
    """The FVU gate's `tau` over a union: the `quantile` of per-sample FVU over the rows of the chosen
    member data sets (default all) of one union cache or several caches (a folder, an `ActivationCache`,
    a list, or comma-separated folders). FVU uses the SAE's recorded activation mean, as the gate does
    at test time (`steering.vs2.fvu_threshold_from_reference`, which this equals for one plain cache).
    Each cache must fit the SAE (CLS rows at its hook, its model); several caches must agree.
    Returns `(tau, {"n_rows", "datasets", "rows_per_dataset"})`."""
    from .activation_cache import ActivationCache
    from .fvu import per_sample_fvu_on_cache
    from .sae_metadata import activation_mean, check_activation_cache_for_sae, sae_hook_name

    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"FVU quantile must be in [0, 1], got {quantile}")
    if isinstance(caches, (str, Path)):
        caches = [p for p in str(caches).split(",") if p.strip()]
    elif isinstance(caches, ActivationCache):
        caches = [caches]
    opened = [c if isinstance(c, ActivationCache) else ActivationCache.open(c) for c in caches]
    if not opened:
        raise ValueError("no reference cache given")
    hook = sae_hook_name(sae, hook_name)
    for c in opened:
        check_activation_cache_for_sae(c, sae, hook, "the reference cache", model)
    check_caches_agree(opened, hook)
    available = [n for c in opened for n in cache_dataset_names(c)]
    wanted = available if datasets is None else parse_dataset_list(datasets)
    from .data import DATASET_ALIASES

    wanted = [n if n in available else DATASET_ALIASES.get(n.lower(), n) for n in wanted]
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ValueError(f"gate data set(s) {missing} are not in the reference cache(s); they hold {available}")
    mu = activation_mean(sae).float().cpu()
    fvus, per_dataset = [], {}
    for c in opened:
        names = cache_dataset_names(c)
        chosen = [i for i, n in enumerate(names) if n in wanted]
        if not chosen:
            continue
        mask = np.isin(c.dataset_ids(), chosen)
        fvus.append(per_sample_fvu_on_cache(sae, c, hook, rows=mask, mean=mu, batch_size=batch_size))
        for i in chosen:
            per_dataset[names[i]] = int((c.dataset_ids() == i).sum())
    fvu = np.concatenate(fvus)
    fvu = fvu[np.isfinite(fvu)]
    if fvu.size == 0:
        raise ValueError("no reference activation has a finite FVU")
    return float(np.quantile(fvu, quantile)), {"n_rows": int(fvu.size), "datasets": wanted,
                                               "rows_per_dataset": per_dataset}
