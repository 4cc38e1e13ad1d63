"""The member data sets of an activation store made from a union (`data.union`): which members it holds,
their rows, and whether several stores can be combined into one reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.errors import UsageError
from ..data import DATASET_ALIASES
from ..data.union import UnionMismatchError

# What stores combined into one union must agree on.
AGREEING_FIELDS = ("model_name", "pretrained", "act_fn", "model_kwargs", "model_config", "model_fingerprint",
                   "positions")


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
    key = DATASET_ALIASES.get(str(dataset).lower(), str(dataset))
    if key not in names:
        raise UsageError(f"data set {dataset!r} is not in the cache at {cache.root}; it holds {names}")
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
        raise UsageError(f"the same cache is given twice: {[str(r) for r in roots]}")
    first, req0 = caches[0], caches[0].metadata.get("request", {})
    problems = []
    for c in caches[1:]:
        req = c.metadata.get("request", {})
        for k in AGREEING_FIELDS:
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
