"""sae_lens_vision_steer: vision towers as TransformerLens models for SAELens, and Visual Sparse Steering
(VS2, VS2++, PASS).

The public names below are exported lazily (PEP 562): `import sae_lens_vision_steer` imports neither
torch's model libraries nor TransformerLens, SAELens or open_clip; the first use of a name imports its
module. The package is layered, lowest first: `core`, `data`, `models`, `sae`, `activation_cache`,
`zeroshot`, `training`, `retrieval`, `steering` / `baselines`, `evaluation`, `hub` / `explore`,
`pipeline`, `reproduce`, `cli` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__  # noqa: F401  (public)

# public name -> the module that defines it
_EXPORTS = {
    "ActivationStore": "activation_cache",
    "cache_activations": "activation_cache",
    "load_image_dataset": "data",
    "make_loader": "data",
    "HookedCLIP": "sae.splice",
    "HookedCLIPConfig": "models.config",
    "VisionSAEInfo": "sae.loading",
    "ImportOptions": "sae.formats",
    "load_vision_sae": "sae.loading",
    "publish_sae": "hub.publish",
    "train_sae": "training.trainer",
    "train_pass_sae": "training.pass_sae",
    "fvu_distribution": "training.fvu",
    "per_sample_fvu": "training.fvu",
    "per_sample_fvu_on_cache": "training.fvu",
    "gate_threshold": "training.gate",
    "fvu_threshold_from_reference": "training.gate",
    "ZeroShotClassifier": "zeroshot.classifier",
    "ZeroShotResult": "zeroshot.classifier",
    "accuracy_metrics": "zeroshot.classifier",
    "build_index": "retrieval.index",
    "SAEReconstruction": "steering.baselines",
    "VS2Steering": "steering.vs2",
    "vs2_steer": "steering.vs2",
    "VS2PP": "steering.vs2pp",
    "VS2PPSteering": "steering.vs2pp",
    "vs2pp_steering_vector": "steering.vs2pp",
    "Evaluator": "evaluation.runner",
    "evaluate": "evaluation",
    "sweep_vs2": "evaluation.runner",
    "save_json": "evaluation.results",
}
_DEPRECATED = {"ActivationCache": ("ActivationStore", "activation_cache")}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _DEPRECATED:
        import warnings

        new, module = _DEPRECATED[name]
        warnings.warn(f"sae_lens_vision_steer.{name} is now {new}; the old name goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        value = getattr(importlib.import_module(f"{__name__}.{module}"), new)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly  # noqa: F401
    from .activation_cache import ActivationStore, cache_activations
    from .data import load_image_dataset, make_loader
    from .evaluation import evaluate
    from .evaluation.results import save_json
    from .evaluation.runner import Evaluator, sweep_vs2
    from .hub.publish import publish_sae
    from .models.config import HookedCLIPConfig
    from .retrieval.index import build_index
    from .sae.formats import ImportOptions
    from .sae.loading import VisionSAEInfo, load_vision_sae
    from .sae.splice import HookedCLIP
    from .steering.baselines import SAEReconstruction
    from .steering.vs2 import VS2Steering, vs2_steer
    from .steering.vs2pp import VS2PP, VS2PPSteering, vs2pp_steering_vector
    from .training.fvu import fvu_distribution, per_sample_fvu, per_sample_fvu_on_cache
    from .training.gate import fvu_threshold_from_reference, gate_threshold
    from .training.pass_sae import train_pass_sae
    from .training.trainer import train_sae
    from .zeroshot.classifier import (
        ZeroShotClassifier,
        ZeroShotResult,
        accuracy_metrics,
    )
