"""Shared fixtures: a tiny random CLIP (no weights, no network) and the shared Tiny-ImageNet folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sae_lens_vision_steer import HookedCLIP

# The test models are tiny: thread start-up costs more than it saves, and the CI machine has 2 cores.
torch.set_num_threads(1)

TINY_CLIP_KWARGS = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
    text_cfg=dict(context_length=16, width=32, heads=2, layers=1),
)
TINY_IMAGENET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "tiny-imagenet-200"


def make_tiny_clip(seed: int = 0) -> HookedCLIP:
    torch.manual_seed(seed)
    return HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, **TINY_CLIP_KWARGS)


@pytest.fixture(autouse=True)
def _text_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The CLI caches text embeddings in the user's cache dir by default: keep tests out of it."""
    monkeypatch.setenv("VISION_STEER_TEXT_CACHE", str(tmp_path_factory.mktemp("text_cache")))


@pytest.fixture(scope="session")
def tiny_clip() -> HookedCLIP:
    return make_tiny_clip()


@pytest.fixture(scope="session")
def tiny_imagenet_dir() -> Path:
    if not (TINY_IMAGENET / "wnids.txt").is_file():
        pytest.skip(f"shared Tiny-ImageNet data not found at {TINY_IMAGENET}")
    return TINY_IMAGENET


def write_image_folder(root: Path, n_classes: int = 3, per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    """Generate `root/<class_i>/<j>.png` images with class-dependent colours (RGB, L, RGBA, CMYK mixed)."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA", "CMYK"]
    for c in range(n_classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            arr = (rng.random((size, size, 3)) * 60 + c * 60).astype(np.uint8)
            img = Image.fromarray(arr).convert(modes[j % len(modes)])
            img.save(d / f"{j}.{'jpg' if img.mode == 'CMYK' else 'png'}")
    return root
