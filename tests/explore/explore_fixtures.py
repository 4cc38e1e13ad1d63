"""Shared by the feature-browser tests (loaded with `pytest_plugins = ["explore_fixtures"]`, so that each
fixture is built once per session): one browser built on 120 Tiny-ImageNet images (real class names,
real photos), and a headless Chromium (Debian `chromium` + `chromium-driver`, via selenium)."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from sae_lens_vision_steer import cache_activations, load_image_dataset, train_sae
from sae_lens_vision_steer.explore import build_feature_browser

HOOK = "blocks.1.hook_resid_post"
N_IMAGES = 120


def tiny_kwargs():
    from conftest import TINY_CLIP_KWARGS

    return TINY_CLIP_KWARGS


@pytest.fixture(scope="session")
def setup(tiny_clip, tiny_imagenet_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    ds = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=N_IMAGES)
    cache_activations(tiny_clip, ds, HOOK, positions="cls", out_dir=root / "cache", shard_size=50, show_progress=False)
    # 4x expansion of a 64-wide tower, k 4: some latents die on 108 training images
    res = train_sae(root / "cache", k=4, expansion_factor=4, epochs=2, batch_size=32, out_dir=root / "sae",
                    show_progress=False)
    fb = build_feature_browser(root / "cache", res.sae, tiny_clip, root / "fb", top_k=5, templates="single",
                               show_progress=False)
    return {"root": root, "ds": ds, "sae": res.sae, "fb": fb}


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium(), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
              "--window-size=1200,1000"):
        opts.add_argument(a)
    opts.binary_location = binary
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=opts, service=Service(driver))
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)
