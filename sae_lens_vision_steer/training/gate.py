"""The VS2 gate's threshold `tau`: one function for every kind of reference.

`gate_threshold` is the `quantile` of per-sample FVU over unlabeled reference activations: a tensor
`[N, d_in]`, one activation store (a plain one or a union), or several stores combined. FVU uses the
SAE's recorded activation mean, as the gate does at test time. Stores must fit the SAE (CLS rows at its
hook, made by `model` when given and by the SAE's model); several must agree (`check_caches_agree`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from ..activation_cache import ActivationStore
from ..activation_cache.union import cache_dataset_names, check_caches_agree
from ..core.errors import UsageError
from ..data import DATASET_ALIASES
from ..data.union import parse_dataset_list
from ..sae.metadata import (
    activation_mean,
    check_activation_cache_for_sae,
    sae_hook_name,
)
from .fvu import per_sample_fvu, per_sample_fvu_on_cache


@torch.no_grad()
def gate_threshold(sae: SAE, reference: Any, quantile: float, datasets: Sequence[str] | str | None = None,
                   hook_name: str | None = None, model: Any = None, batch_size: int = 8192,
                   show_progress: bool = False) -> tuple[float, dict[str, Any]]:
    """`(tau, {"n_rows", "datasets", "rows_per_dataset"})`: the `quantile` of per-sample FVU over
    `reference`, a tensor `[N, d_in]`, a store (folder or `ActivationStore`), a list of stores, or
    comma-separated folders. `datasets` chooses the member data sets of union stores (default all)."""
    if not 0.0 <= quantile <= 1.0:
        raise UsageError(f"FVU quantile must be in [0, 1], got {quantile}")
    mu = activation_mean(sae).float()  # the same mean the gate uses at test time
    if isinstance(reference, torch.Tensor):
        if datasets is not None:
            raise UsageError("datasets chooses members of reference stores; a tensor reference has none")
        if reference.ndim != 2 or reference.shape[1] != sae.cfg.d_in:
            raise UsageError(f"reference activations must be [N, {sae.cfg.d_in}], got {list(reference.shape)}")
        if len(reference) == 0:
            raise UsageError("reference activations are empty")
        fvus = [per_sample_fvu(reference[i:i + batch_size].to(sae.device), sae, mu).double().cpu()
                for i in tqdm(range(0, len(reference), batch_size), desc="reference FVU", disable=not show_progress)]
        fvu = torch.cat(fvus).numpy()
        return _finite_quantile(fvu, quantile), {"n_rows": int(np.isfinite(fvu).sum()), "datasets": None,
                                                 "rows_per_dataset": {}}
    if isinstance(reference, (str, Path)):
        reference = [p for p in str(reference).split(",") if p.strip()]
    elif isinstance(reference, ActivationStore):
        reference = [reference]
    opened = [c if isinstance(c, ActivationStore) else ActivationStore.open(c) for c in reference]
    if not opened:
        raise UsageError("no reference cache given")
    hook = sae_hook_name(sae, hook_name)
    for c in opened:
        check_activation_cache_for_sae(c, sae, hook, "the reference cache", model)
    check_caches_agree(opened, hook)
    available = [n for c in opened for n in cache_dataset_names(c)]
    wanted = available if datasets is None else parse_dataset_list(datasets)
    wanted = [n if n in available else DATASET_ALIASES.get(n.lower(), n) for n in wanted]
    missing = [n for n in wanted if n not in available]
    if missing:
        raise UsageError(f"gate data set(s) {missing} are not in the reference cache(s); they hold {available}")
    fvus, per_dataset = [], {}
    for c in opened:
        names = cache_dataset_names(c)
        chosen = [i for i, n in enumerate(names) if n in wanted]
        if not chosen:
            continue
        mask = np.isin(c.dataset_ids(), chosen)
        fvus.append(per_sample_fvu_on_cache(sae, c, hook, rows=mask, mean=mu.cpu(), batch_size=batch_size))
        for i in chosen:
            per_dataset[names[i]] = int((c.dataset_ids() == i).sum())
    fvu = np.concatenate(fvus)
    return _finite_quantile(fvu, quantile), {"n_rows": int(np.isfinite(fvu).sum()), "datasets": wanted,
                                             "rows_per_dataset": per_dataset}


def fvu_threshold_from_reference(sae: SAE, reference: Any, quantile: float, hook_name: str | None = None,
                                 batch_size: int = 8192, show_progress: bool = False, model: Any = None) -> float:
    """`tau` alone: `gate_threshold(...)[0]` over every row of `reference`."""
    return gate_threshold(sae, reference, quantile, hook_name=hook_name, model=model, batch_size=batch_size,
                          show_progress=show_progress)[0]


def union_fvu_threshold(sae: SAE, caches: Any, quantile: float, datasets: Sequence[str] | str | None = None,
                        hook_name: str | None = None, model: Any = None,
                        batch_size: int = 8192) -> tuple[float, dict[str, Any]]:
    """The name of `gate_threshold` before 0.2 (union stores)."""
    return gate_threshold(sae, caches, quantile, datasets, hook_name, model, batch_size)


def _finite_quantile(fvu: np.ndarray, quantile: float) -> float:
    fvu = fvu[np.isfinite(fvu)]
    if fvu.size == 0:
        raise UsageError("no reference activation has a finite FVU")
    return float(np.quantile(fvu.astype(np.float64), quantile))


__all__ = ["fvu_threshold_from_reference", "gate_threshold", "union_fvu_threshold"]
