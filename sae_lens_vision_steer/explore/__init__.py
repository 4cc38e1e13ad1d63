"""A static feature browser for vision SAEs (`vision-steer features`): per-latent statistics from one
pass over an activation cache, promoted classes from the decoder directions, top images with patch
heatmaps, histograms, per-class means and VS2 per-class changes, written as HTML/JS/PNG."""

from .browser import MARKER, FeatureBrowser, build_feature_browser, check_sae_and_cache
from .directions import decoder_class_scores, promoted_classes
from .heatmaps import attention_maps, occlusion_maps, sae_patch_maps
from .stats import LatentStats, latent_stats

__all__ = [
    "MARKER", "FeatureBrowser", "LatentStats", "attention_maps", "build_feature_browser", "check_sae_and_cache",
    "decoder_class_scores", "latent_stats", "occlusion_maps", "promoted_classes", "sae_patch_maps",
]
