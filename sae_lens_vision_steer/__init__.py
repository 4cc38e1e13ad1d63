"""sae_lens_vision_steer: CLIP image towers for SAELens, and Visual Sparse Steering (VS2, VS2++, PASS)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sae-lens-vision-steer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from .data import load_image_dataset, make_loader
from .hooked_clip import HookedCLIP, HookedCLIPConfig
from .zeroshot import ZeroShotClassifier, ZeroShotResult, accuracy_metrics

__all__ = [
    "HookedCLIP", "HookedCLIPConfig", "ZeroShotClassifier", "ZeroShotResult", "accuracy_metrics",
    "load_image_dataset", "make_loader", "__version__",
]
