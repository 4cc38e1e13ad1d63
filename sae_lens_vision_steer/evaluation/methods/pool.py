"""VS2++'s retrieval pool cache, checked before use: one CLS row per image at the SAE's hook, made by the
same model, not the evaluation split itself, and with labels that mean the evaluation's classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...core.errors import InputError, UnknownNameError, UsageError


def check_pool_cache(cache_dir: str | Path, model, hook_name: str, sae=None, eval_data=None,
                     other_dataset: bool = False):
    """Open the pool cache and refuse one that cannot serve as VS2++'s pool: not one CLS row per image,
    another hook or model (weight fingerprint), the evaluation split itself (each query would
    retrieve itself), or labels that mean other classes (`check_pool_labels`). Returns the opened
    `ActivationStore`."""
    from ...activation_cache import ActivationStore, model_fingerprint

    cache = ActivationStore.open(cache_dir)
    if cache.positions != "cls":
        raise UsageError(f"the pool cache {cache_dir} holds positions={cache.positions!r}; VS2++ needs one CLS row "
                         "per image (cache with positions='cls')")
    req = cache.metadata.get("request", {})
    wanted = req.get("model_fingerprint")
    if wanted and wanted != model_fingerprint(model):
        raise UsageError(f"the pool cache {cache_dir} was made with other model weights than the model loaded "
                         f"({cache.metadata.get('model_name')}/{cache.metadata.get('pretrained')}); pseudo-labels "
                         "and embeddings would not match")
    if hook_name not in cache.hook_names:
        raise UnknownNameError(f"the pool cache {cache_dir} holds {cache.hook_names}, not the SAE's hook {hook_name!r}")
    if sae is not None and cache.d_in(hook_name) != sae.cfg.d_in:
        raise UsageError(f"the pool cache {cache_dir} has width {cache.d_in(hook_name)} at {hook_name!r}, the SAE's "
                         f"d_in is {sae.cfg.d_in}")
    if eval_data is not None and (req.get("dataset"), req.get("split")) == (eval_data.dataset_id, eval_data.split):
        raise UsageError(f"the pool cache {cache_dir} was made from the evaluation split itself "
                         f"({eval_data.dataset_id}/{eval_data.split}): each image would retrieve itself. Cache the "
                         "training split for --pool-cache")
    if eval_data is not None:
        check_pool_labels(cache, req, eval_data, other_dataset)
    return cache


def check_pool_labels(cache, req: dict[str, Any], eval_data, other_dataset: bool = False) -> None:
    """The pool's label ids must mean the evaluation's classes (oracle and pseudo-label methods compare them):
    the same class names in the same order, and the same named data set (`cifar100`, a Hub id) unless
    `other_dataset` (the user named a pool of another data set on purpose, `--pool-other-dataset`). Image
    folders are identified by their class names only (their id is a folder name: train and test folders of one
    data set may be named anything)."""
    where = f"the pool cache {cache.root}"
    pool_id, eval_id = req.get("dataset"), eval_data.dataset_id
    named = not any(str(i).startswith("imagefolder:") for i in (pool_id, eval_id))
    if not other_dataset and named and pool_id and pool_id != eval_id:
        raise InputError(f"{where} holds data set {pool_id!r}, the evaluation {eval_id!r}; give the training split of "
                         "the evaluated data set, or --pool-other-dataset to use another data set's pool on purpose")
    names, wanted = req.get("classnames"), [str(c) for c in eval_data.classnames]
    if names is None:
        if other_dataset:
            raise InputError(f"{where} records no class names (made before caches recorded them): its labels cannot be "
                             "checked against another data set's classes; cache the pool again")
        return  # a cache made before class names were recorded: only its data-set id could be checked
    if list(names) != wanted:
        i = next((j for j, (a, b) in enumerate(zip(names, wanted)) if a != b), min(len(names), len(wanted)))

        def shown(xs: list[str]) -> str:
            return repr(xs[i]) if i < len(xs) else "nothing"

        raise InputError(f"{where} has other class ids than the evaluation ({len(names)} vs {len(wanted)} classes; "
                         f"class {i} is {shown(names)} in the pool, {shown(wanted)} here): oracle and pseudo-label "
                         "methods would compare unrelated labels. Cache a pool with the same class folders")


__all__ = ["check_pool_cache", "check_pool_labels"]
