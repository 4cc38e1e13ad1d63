"""sae_lens_vision_steer: CLIP image towers for SAELens, and Visual Sparse Steering (VS2, VS2++, PASS)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sae-lens-vision-steer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from .activation_cache import ActivationCache, cache_activations
from .data import load_image_dataset, make_loader
from .evaluation import Evaluator, evaluate, sweep_vs2
from .hooked_clip import HookedCLIP, HookedCLIPConfig
from .hub import VisionSAEInfo, load_vision_sae, publish_sae
from .pass_sae import train_pass_sae
from .results import save_json
from .retrieval import build_index
from .steering import (
    SAEReconstruction,
    VS2Steering,
    fvu_threshold_from_reference,
    per_sample_fvu,
    vs2_steer,
)
from .steering.vs2pp import VS2PP, VS2PPSteering, vs2pp_steering_vector
from .training import fvu_distribution, per_sample_fvu_on_cache, train_sae
from .zeroshot import ZeroShotClassifier, ZeroShotResult, accuracy_metrics

__all__ = [
    "ActivationCache", "Evaluator", "HookedCLIP", "HookedCLIPConfig", "SAEReconstruction", "VS2PP",
    "VS2PPSteering", "VS2Steering", "VisionSAEInfo", "ZeroShotClassifier", "ZeroShotResult", "__version__",
    "accuracy_metrics", "build_index", "cache_activations", "evaluate", "fvu_distribution",
    "fvu_threshold_from_reference", "load_image_dataset", "load_vision_sae", "make_loader", "per_sample_fvu",
    "per_sample_fvu_on_cache", "publish_sae", "save_json", "sweep_vs2", "train_pass_sae", "train_sae", "vs2_steer",
    "vs2pp_steering_vector",
]
