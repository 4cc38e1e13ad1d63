"""A static feature browser for vision SAEs (`vision-steer features`): per-latent statistics from one
pass over an activation cache, promoted classes from the decoder directions, top images with patch
heatmaps, histograms, per-class means and VS2 per-class changes, written as HTML/JS/PNG."""

from .browser import MARKER, BrowserConfig, FeatureBrowser, build_feature_browser, check_sae_and_cache
from .directions import decoder_class_scores, promoted_classes
from .folder import check_destination
from .heatmaps import attention_maps, gradient_maps, occlusion_maps, sae_patch_maps
from .stats import LatentStats, latent_stats
from .vs2 import VS2Changes, read_results

__all__ = [
    "MARKER", "BrowserConfig", "FeatureBrowser", "LatentStats", "VS2Changes", "attention_maps",
    "build_feature_browser", "check_destination", "check_sae_and_cache", "decoder_class_scores", "gradient_maps",
    "latent_stats", "occlusion_maps", "promoted_classes", "read_results", "sae_patch_maps",
]
