"""The feature browser: statistics against a dense recomputation, promoted classes against torch's own
LayerNorm, occlusion against a hand-blanked image, bad inputs, and the pages in a real headless Chromium."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from explore_fixtures import HOOK
from explore_fixtures import tiny_kwargs as _tiny_kwargs

from sae_lens_vision_steer import (
    ActivationStore,
    cache_activations,
    load_image_dataset,
    train_sae,
)
from sae_lens_vision_steer.cli import main as cli_main
from sae_lens_vision_steer.explore import (
    build_feature_browser,
    decoder_class_scores,
    occlusion_maps,
)
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier

pytest_plugins = ["explore_fixtures"]


def test_stats_match_a_dense_recomputation(setup):
    sae, st = setup["sae"], setup["fb"].stats
    cache = ActivationStore.open(setup["root"] / "cache")
    with torch.no_grad():
        codes = sae.encode(cache.load(HOOK)).numpy()  # [N, S], all at once
    fires = codes > 0
    np.testing.assert_allclose(st.freq_S, fires.mean(0))
    mean_active = np.where(fires.sum(0) > 0, codes.sum(0) / np.maximum(fires.sum(0), 1), 0)
    np.testing.assert_allclose(st.mean_act_S, mean_active, rtol=1e-5)
    labels = cache.labels
    for s in st.alive[:20]:
        want = np.argsort(-codes[:, s], kind="stable")[:min(5, fires[:, s].sum())]
        assert set(st.top_images_SK[s][st.top_images_SK[s] >= 0]) == set(want)
        for c in np.unique(labels)[:5]:
            assert st.class_means_SC[s, c] == pytest.approx(codes[labels == c, s].mean(), rel=1e-5, abs=1e-7)
        assert st.hist_counts_SB[s].sum() == fires[:, s].sum()
    assert set(st.dead) == set(np.nonzero(~fires.any(0))[0])


def test_promoted_classes_match_torch_layer_norm(setup, tiny_clip):
    sae = setup["sae"]
    clf = ZeroShotClassifier(tiny_clip, setup["ds"].classnames[:10], "single", show_progress=False)
    ours = decoder_class_scores(tiny_clip, sae, clf.weights_EC)
    ln = tiny_clip.visual.ln_post
    d = F.layer_norm(sae.W_dec.detach(), (sae.cfg.d_in,), weight=ln.weight, bias=None, eps=0.0)  # positive rescale only
    want = F.normalize(d @ tiny_clip.visual.proj, dim=-1) @ clf.weights_EC
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


def test_occlusion_matches_a_hand_blanked_patch(setup, tiny_clip):
    sae, ds = setup["sae"], setup["ds"]
    x = ds[0][0][None]
    s = int(setup["fb"].stats.alive[0])
    (heat,) = occlusion_maps(tiny_clip, sae, x, [[s]], HOOK, show_progress=False)
    blanked = x.clone()
    blanked[:, :, 8:16, 16:24] = 0  # patch (row 1, col 2) of the 4 x 4 grid
    with torch.no_grad():
        _, c0 = tiny_clip.run_with_cache(x, names_filter=[HOOK])
        _, c1 = tiny_clip.run_with_cache(blanked, names_filter=[HOOK])
        a0, a1 = sae.encode(c0[HOOK][:, 0])[0, s], sae.encode(c1[HOOK][:, 0])[0, s]
    assert heat.shape == (1, 16)
    assert heat[0, 1 * 4 + 2] == pytest.approx(max(0.0, float(a0 - a1)), abs=1e-5)


def test_layout_dead_latents_and_marker(setup):
    fb, out = setup["fb"], setup["root"] / "fb"
    st = fb.stats
    assert len(st.dead) > 0, "the fixture is meant to have dead latents"
    pages = sorted(p.name for p in (out / "latents").iterdir())
    assert pages == [f"latent_{s:05d}.html" for s in st.alive]
    index = (out / "index.html").read_text()
    dead_line = index.split('<p id="dead">')[1].split("</p>")[0].split()
    assert [int(d) for d in dead_line] == st.dead.tolist()
    marker = json.loads((out / "features.json").read_text())
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert marker["files"] == on_disk


def test_refuses_foreign_folder_and_mismatched_sae(setup, tiny_clip, tmp_path):
    root = setup["root"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("mine")
    args = ["features", "--cache", str(root / "cache"), "--sae", str(root / "sae"), "--no-progress",
            "--random-weights", "--model-kwargs", json.dumps(_tiny_kwargs()), "--templates", "single"]
    assert cli_main(args + ["--out", str(foreign)]) == 4
    assert (foreign / "thesis.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    # another model's weights: the cache's fingerprint differs
    assert cli_main(args + ["--out", str(tmp_path / "fb2"), "--seed", "1"]) == 3
    assert not (tmp_path / "fb2").exists() or not any((tmp_path / "fb2").iterdir())


def test_rebuild_replaces_own_folder_but_not_added_files(setup, tiny_clip):
    out = setup["root"] / "fb_rebuild"
    build_feature_browser(setup["root"] / "cache", setup["sae"], tiny_clip, out, top_k=2, heatmap="none",
                          templates="single", show_progress=False)
    build_feature_browser(setup["root"] / "cache", setup["sae"], tiny_clip, out, top_k=2, heatmap="none",
                          templates="single", show_progress=False)  # our own folder: replaced
    (out / "my_notes.md").write_text("keep")
    with pytest.raises(ValueError, match="did not write"):
        build_feature_browser(setup["root"] / "cache", setup["sae"], tiny_clip, out, top_k=2,
                              templates="single", show_progress=False)
    assert (out / "my_notes.md").read_text() == "keep"


def test_cache_without_labels_leaves_part_out_and_says_why(setup, tiny_clip, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(setup["root"] / "cache", cache)
    meta = json.loads((cache / "metadata.json").read_text())
    del meta["arrays"]["labels"]
    (cache / "metadata.json").write_text(json.dumps(meta))
    fb = build_feature_browser(cache, setup["sae"], tiny_clip, tmp_path / "fb", top_k=3, heatmap="none",
                               templates="single", show_progress=False)
    assert fb.stats.class_means_SC is None
    page = (tmp_path / "fb" / "latents" / f"latent_{int(fb.stats.alive[0]):05d}.html").read_text()
    assert "labels" in page and "per-class means are left out" in page
    assert 'id="class-means"' not in page


def test_vs2_section_from_results(setup, tiny_clip, tmp_path):
    names = setup["ds"].classnames
    zs = [50.0] * len(names)
    vs2 = [50.0 + (i % 7) - 3 for i in range(len(names))]
    results = {"methods": {"zeroshot": {"per_class_acc": zs}, "vs2": {"per_class_acc": vs2}}, "classnames": names}
    fb = build_feature_browser(setup["root"] / "cache", setup["sae"], tiny_clip, tmp_path / "fb", top_k=2,
                               heatmap="none", results=results, templates="single", show_progress=False)
    st = fb.stats
    s = int(st.alive[np.argmax(st.freq_S[st.alive])])
    page = (tmp_path / "fb" / "latents" / f"latent_{s:05d}.html").read_text()
    section = page.split('id="vs2-changes"')[1]
    first = np.nonzero(st.class_freq_SC[s] >= 0.10)[0]
    best = first[np.argmax(np.abs(np.array(vs2)[first] - 50))]
    assert names[best] in section.split("</tr>")[0]


# ------------------------------------------------------------------------------------------- real browser
def test_pages_in_headless_chromium(setup, browser, tmp_path):
    from selenium.webdriver.common.by import By

    out, st = setup["root"] / "fb", setup["fb"].stats
    browser.get((out / "index.html").as_uri())
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.latent")
    assert len(rows) == len(st.alive)
    freqs = [float(r.find_elements(By.TAG_NAME, "td")[1].text.rstrip("%")) for r in rows]
    assert freqs == sorted(freqs, reverse=True)  # default order: most frequent first
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="mean_act"]').click()
    shown = [int(r.get_attribute("data-id")) for r in browser.find_elements(By.CSS_SELECTOR, "tr.latent")]
    # Sorted by the stats' mean activation as the page holds it (5 decimals): ties there may come in either order.
    page_means = [round(float(st.mean_act_S[s]), 5) for s in shown]
    assert sorted(shown) == sorted(int(s) for s in st.alive)
    assert page_means == sorted(page_means, reverse=True)
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="id"]').click()
    ids = [int(r.get_attribute("data-id")) for r in browser.find_elements(By.CSS_SELECTOR, "tr.latent")]
    assert ids == sorted(ids)
    box = browser.find_element(By.ID, "search")
    box.send_keys(str(int(st.alive[0])))
    assert [r.get_attribute("data-id") for r in browser.find_elements(By.CSS_SELECTOR, "tr.latent")] == [str(int(st.alive[0]))]
    box.clear()
    name = browser.find_element(By.CSS_SELECTOR, "tr.latent td:nth-child(4)").text.split(", ")[0]
    box.send_keys(name)
    found = browser.find_elements(By.CSS_SELECTOR, "tr.latent")
    want = [r for r in json.loads((out / "index_data.js").read_text().split("=", 1)[1].rstrip().rstrip(";"))["latents"]
            if name.lower() in r["text"]]
    assert len(found) == len(want) >= 1
    assert browser.find_element(By.ID, "shown").text == str(len(want))
    assert browser.save_screenshot(str(tmp_path / "index.png"))

    s = int(st.alive[np.argmax(st.freq_S[st.alive])])
    browser.get((out / "latents" / f"latent_{s:05d}.html").as_uri())
    tiles = browser.find_elements(By.CSS_SELECTOR, "#top-images .top-image")
    assert len(tiles) == min(5, int(round(st.freq_S[s] * st.n_images)))
    imgs = browser.find_elements(By.CSS_SELECTOR, "#top-images img")
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in imgs)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#top-images .cell")) == len(tiles) * 16
    assert len(browser.find_elements(By.CSS_SELECTOR, "#histogram rect")) == 24
    assert browser.save_screenshot(str(tmp_path / "latent.png"))
    assert (tmp_path / "latent.png").read_bytes()[:4] == b"\x89PNG"


def test_all_token_sae_heatmaps_are_its_patch_activations(tiny_clip, tiny_imagenet_dir, tmp_path):
    """An SAE trained on all tokens: the heatmap is the SAE on each patch token, here recomputed from a
    fresh forward pass (not from the cache)."""
    from sae_lens_vision_steer.explore import sae_patch_maps

    ds = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=40)
    cache_activations(tiny_clip, ds, HOOK, positions="all", out_dir=tmp_path / "cache", show_progress=False)
    sae = train_sae(tmp_path / "cache", k=4, expansion_factor=2, epochs=1, batch_size=64, out_dir=tmp_path / "sae",
                    show_progress=False).sae
    fb = build_feature_browser(tmp_path / "cache", sae, tiny_clip, tmp_path / "fb", top_k=3,
                               templates="single", show_progress=False)
    assert fb.stats.n_images == 40
    s = int(fb.stats.alive[0])
    img = int(fb.stats.top_images_SK[s, 0])
    (maps,) = sae_patch_maps(ActivationStore.open(tmp_path / "cache"), sae, HOOK, [img], [[s]])
    with torch.no_grad():
        _, c = tiny_clip.run_with_cache(ds[img][0][None], names_filter=[HOOK])
        want = sae.encode(c[HOOK][0, 1:])[:, s]
    np.testing.assert_allclose(maps[0], want.numpy(), rtol=1e-2, atol=1e-2)  # the cache is float16
    # the image-level activation is the maximum over the image's tokens, CLS included
    assert fb.stats.top_values_SK[s, 0] == pytest.approx(float(sae.encode(c[HOOK][0])[:, s].max()), rel=1e-2, abs=1e-2)
    # a CLS-only SAE is refused on this cache of all tokens
    cls_sae = train_sae(tmp_path / "cache", k=4, expansion_factor=2, epochs=1, batch_size=64,
                        out_dir=tmp_path / "sae2", show_progress=False).sae
    cls_sae.cfg.metadata.positions = "cls"
    with pytest.raises(ValueError, match="positions"):
        build_feature_browser(tmp_path / "cache", cls_sae, tiny_clip, tmp_path / "fb2",
                              templates="single", show_progress=False)


def test_refuses_sae_of_another_hook_or_width(setup, tiny_clip, tmp_path):
    import copy

    from sae_lens_vision_steer.core.errors import InputError

    other_hook = copy.deepcopy(setup["sae"])
    other_hook.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with pytest.raises(InputError, match="not the SAE's hook 'blocks.0.hook_resid_post'"):
        build_feature_browser(setup["root"] / "cache", other_hook, tiny_clip, tmp_path / "a",
                              templates="single", show_progress=False)
    narrow = copy.deepcopy(setup["sae"])
    narrow.cfg.d_in = 32
    with pytest.raises(InputError, match="the SAE's d_in is 32"):
        build_feature_browser(setup["root"] / "cache", narrow, tiny_clip, tmp_path / "b",
                              templates="single", show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_out_is_a_file_and_results_not_json(setup, tmp_path):
    root = setup["root"]
    args = ["features", "--cache", str(root / "cache"), "--sae", str(root / "sae"), "--no-progress",
            "--random-weights", "--model-kwargs", json.dumps(_tiny_kwargs()), "--templates", "single"]
    (tmp_path / "file").write_text("x")
    assert cli_main(args + ["--out", str(tmp_path / "file")]) == 5
    (tmp_path / "r.json").write_text("{not json")
    assert cli_main(args + ["--out", str(tmp_path / "fb"), "--results", str(tmp_path / "r.json")]) == 3
    assert cli_main(args + ["--out", str(tmp_path / "fb"), "--results", str(tmp_path / "missing.json")]) == 3
    assert not (tmp_path / "fb").exists()
