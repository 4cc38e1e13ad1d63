"""ViSAEBench's own metrics (PyPI `visaebench`, `visaebench.metrics.METRIC_REGISTRY`) on an SAE and the
activations `sae-eval` collected at its hook, as an option of `sae-eval` (`--visaebench NAMES`).

ViSAEBench's metrics take any object with `encode`/`decode` (a SAELens SAE is one), activations
`[N, P, D]` (images x tokens x width; P = 1 for a CLS SAE) and, for some, class labels. Three of its seven
metrics need only that and run here; the other four need data this package does not have, and are
refused with what they need. `visaebench` (and scikit-learn, which it imports) are optional: install
them with `pip install visaebench`.

Note: ViSAEBench 0.1.0's `fvu` is `(E||r||^2 - (E sum_d r_d)^2) / (E||x||^2 - (E sum_d x_d)^2)` over tokens
(`r = x - x_hat`; its code subtracts the squared mean of each token's *sum over dimensions*), not the
per-dimension mean-centred FVU `E||r||^2 / (E||x||^2 - ||E x||^2)` of `sae-eval` (SAELens' formula); the
two differ, and ViSAEBench's denominator can be negative (its FVU is then `inf`) for activations with a
large mean. It is reported as ViSAEBench computes it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from sae_lens import SAE

from ..core.errors import UnknownNameError, UsageError

RUNNABLE = ("fvu", "downstream_preservation", "sparse_probing")  # M2, M3, M4
NEEDS_DATA = {
    "localization": "segmentation masks for the evaluated images (M1)",
    "monosemanticity": "a second, pretrained evaluator backbone and the PIL images (M5; weights from the Hub)",
    "cross_domain": "EuroSAT, iNaturalist and DTD downloaded from the Hub (M6)",
    "absorption": "ImageNet-1k class indices and WordNet sibling groups for the labels (M7)",
}


def check_visaebench_names(names: Sequence[str]) -> list[str]:
    """The metric names, checked before any work: unknown names and metrics needing data we lack are refused."""
    out = []
    for name in names:
        if name in NEEDS_DATA:
            raise UsageError(f"ViSAEBench's {name!r} needs {NEEDS_DATA[name]}, which sae-eval does not have; "
                             f"it can run {list(RUNNABLE)}")
        if name not in RUNNABLE:
            raise UnknownNameError(f"ViSAEBench has no metric {name!r}; sae-eval can run {list(RUNNABLE)} "
                                   f"(and not {sorted(NEEDS_DATA)}, which need other data)")
        out.append(name)
    return out


def visaebench_metrics(sae: SAE, acts_NPD: torch.Tensor, labels_N: np.ndarray | Sequence[int],
                       names: Sequence[str], device: str = "cpu", seed: int = 42) -> dict[str, dict[str, Any]]:
    """`{name: {"value", "higher_is_better", "metadata"}}` from ViSAEBench's own `Metric.compute`."""
    names = check_visaebench_names(names)
    if sae.cfg.metadata.get("hook_name_out"):
        raise UsageError("ViSAEBench's metrics reconstruct the SAE's input; a transcoder writes another hook")
    try:
        from visaebench.metrics import METRIC_REGISTRY
    except ImportError as e:
        raise UsageError(f"--visaebench needs the optional package visaebench (pip install visaebench): {e}") from None
    labels = np.asarray(labels_N, dtype=np.int64)
    acts = acts_NPD.to(sae.W_dec.dtype)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        metric = METRIC_REGISTRY[name]()
        kwargs: dict[str, Any] = {"device": device}
        if name == "fvu":  # its FVU takes flat tokens; dict_size gives its dead-latent count
            data, kwargs["dict_size"] = acts.reshape(-1, acts.shape[-1]), sae.cfg.d_sae
        else:
            data, kwargs["labels"], kwargs["seed"] = acts, labels, seed
        with torch.no_grad():
            r = metric.compute(sae, data, **kwargs)
        out[name] = {"value": float(r.value), "higher_is_better": bool(r.higher_is_better),
                     "metadata": {k: v for k, v in dict(r.metadata).items() if isinstance(v, (int, float, str, bool))}}
    return out


__all__ = ["NEEDS_DATA", "RUNNABLE", "check_visaebench_names", "visaebench_metrics"]
