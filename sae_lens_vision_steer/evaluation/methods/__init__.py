"""The built-in evaluation methods, registered when this package is imported (by `evaluation`): `builtin`
(zero-shot, VS2, the reconstruction baselines), `vs2pp` (VS2++ and the retrieval baselines, which read a
pool cache) and `labels` (the reviewers' kNN votes and linear probe, on the same pool) and `tta` (prompt ensembles, TPT,
C-TPT, ZERO, VS2 + Ens + Aug). Each adapts a steering or baseline module to the
runner's method interface; a plug-in registers its own with `register_method`."""

from . import builtin, labels, tta, vs2pp

__all__ = ["builtin", "labels", "tta", "vs2pp"]
