"""The built-in evaluation methods, registered when this package is imported (by `evaluation`): `builtin`
(zero-shot, VS2, the reconstruction baselines), `vs2pp` (VS2++ and the retrieval baselines, which read a
pool cache) and `tta` (prompt ensembles, TPT, C-TPT). Each adapts a steering or baseline module to the
runner's method interface; a plug-in registers its own with `register_method`."""

from . import builtin, tta, vs2pp

__all__ = ["builtin", "tta", "vs2pp"]
