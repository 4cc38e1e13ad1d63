"""The feature browser's pages: hostile class names stay text (headless Chromium, under the pages'
Content-Security-Policy), heatmap overlays on their images (measured on real pages), gradient heatmaps
against finite differences, histogram axes, previous/next links, per-class counts and standard errors
against their formulas, features.json's record, `--results` errors, and the swap that leaves a user's
folders alone."""

from __future__ import annotations

import hashlib
import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from explore_fixtures import HOOK, tiny_kwargs

from sae_lens_vision_steer import ActivationStore, cache_activations, load_image_dataset, train_sae
from sae_lens_vision_steer.cli import main as cli_main
from sae_lens_vision_steer.explore import build_feature_browser, gradient_maps
from sae_lens_vision_steer.sae.loading import load_sae

pytest_plugins = ["explore_fixtures"]

HOSTILE = [
    "<img src=x onerror=document.title='pwned1'>",
    "\"><svg onload=document.title='pwned2'>",
    "it's a \"quote\" & <b>bold",
    "\u202eevil gpj.exe",
    "<i>" + "w" * 237,  # 240 characters
]

# Each overlay's box minus its image's box: [dx, dy, dwidth, dheight] in CSS pixels.
OVERLAY_OFFSETS_JS = """return Array.from(document.querySelectorAll('#top-images .top-image')).map(t => {
  const i = t.querySelector('img'), h = t.querySelector('.heat'); if (!i || !h) return null;
  const a = i.getBoundingClientRect(), b = h.getBoundingClientRect();
  return [b.left - a.left, b.top - a.top, b.width - a.width, b.height - a.height]; }).filter(x => x)"""


def _open(browser, page):
    """Load a page and wait until its stylesheet applies (a loaded machine may run the script first)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page.as_uri())
    WebDriverWait(browser, 10).until(lambda d: d.execute_script("return getComputedStyle(document.body).maxWidth")
                                     == "1200px")


def _latent_pages(out):
    return sorted((out / "latents").glob("latent_*.html"))


def _csp_messages(browser):
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


@pytest.fixture(scope="module")
def hostile(tiny_clip, tmp_path_factory):
    """A browser over an image folder whose class folders carry hostile names."""
    root = tmp_path_factory.mktemp("hostile")
    write_image_folder(root / "imgs", n_classes=len(HOSTILE), per_class=4)
    for c, name in enumerate(HOSTILE):
        os.rename(root / "imgs" / f"class_{c}", root / "imgs" / name)
    ds = load_image_dataset("imagefolder", None, root / "imgs", transform=tiny_clip.preprocess)
    assert sorted(ds.classnames) == sorted(HOSTILE)
    cache_activations(tiny_clip, ds, HOOK, positions="cls", out_dir=root / "cache", show_progress=False)
    sae = train_sae(root / "cache", k=2, expansion_factor=1, epochs=1, batch_size=8, out_dir=root / "sae",
                    show_progress=False).sae
    fb = build_feature_browser(root / "cache", sae, tiny_clip, root / "fb", top_k=4, show_progress=False)
    return root / "fb", fb, sae


def test_hostile_class_names_stay_text(hostile, browser):
    from selenium.webdriver.common.by import By

    out, fb, _ = hostile
    browser.get_log("browser")  # drop earlier messages
    _open(browser, out / "index.html")
    assert browser.title == "SAE feature browser"
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.latent")
    assert len(rows) == len(fb.stats.alive) > 0  # the scripts ran under the CSP
    injected = ", ".join(f"#latents {t}" for t in ("img", "svg", "script", "b", "i", "[onerror]", "[onload]"))
    assert browser.find_elements(By.CSS_SELECTOR, injected) == []
    shown = [b.get_attribute("textContent") for b in browser.find_elements(By.CSS_SELECTOR, "#latents bdi")]
    assert set(shown) == set(HOSTILE)  # every name appears (5 promoted per row), exactly as written
    csp = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="Content-Security-Policy"]').get_attribute("content")
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    for page in _latent_pages(out):
        _open(browser, page)
        s = int(page.stem.split("_")[1])
        assert browser.title == f"latent {s}"
        assert browser.find_elements(By.CSS_SELECTOR, "[onerror], [onload], script") == []
        tiles = browser.find_elements(By.CSS_SELECTOR, "#top-images .top-image")
        assert len(browser.find_elements(By.TAG_NAME, "img")) == len(tiles)  # our thumbnails only
        names = {b.get_attribute("textContent") for b in browser.find_elements(By.TAG_NAME, "bdi")}
        assert names and names <= set(HOSTILE)
        offsets = browser.execute_script(OVERLAY_OFFSETS_JS)  # long captions do not move the overlays
        assert offsets and max(abs(v) for o in offsets for v in o) < 0.5
    assert "pwned" not in browser.title
    assert _csp_messages(browser) == []  # nothing of ours needed an inline script or style


def _overlay_offsets(setup, browser, n_pages=None):
    """Overlay-minus-image boxes on the latent pages of a browser over real photos and class names:
    all pages, or the `n_pages` whose captions are the longest (where a misplaced overlay shows)."""
    out, st, names = setup["root"] / "fb", setup["fb"].stats, setup["ds"].classnames
    pages = _latent_pages(out)
    if n_pages is not None:
        def widest(page):
            s = int(page.stem.split("_")[1])
            return max(len(names[st.labels_N[i]]) for i in st.top_images_SK[s] if i >= 0)
        pages = sorted(pages, key=widest, reverse=True)[:n_pages]
    offsets = []
    for page in pages:
        _open(browser, page)
        offsets += browser.execute_script(OVERLAY_OFFSETS_JS)
    return pages, offsets


def test_heatmap_overlays_sit_on_their_images(setup, browser):
    """The overlay's box is the image's box (before the fix, on all 131 pages of this browser 101 of 338
    overlays were shifted left, up to 41 px, wherever a caption was wider than the image)."""
    pages, offsets = _overlay_offsets(setup, browser, n_pages=12)
    assert len(offsets) >= len(pages)
    worst = max(abs(v) for o in offsets for v in o)
    assert worst < 0.5, f"overlay off its image by {worst:.1f} px"


@pytest.mark.slow
def test_heatmap_overlays_sit_on_their_images_on_every_page(setup, browser):
    pages, offsets = _overlay_offsets(setup, browser)
    st = setup["fb"].stats
    assert len(offsets) == int((st.top_images_SK[st.alive] >= 0).sum()) > 100
    worst = max(abs(v) for o in offsets for v in o)
    assert worst < 0.5, f"overlay off its image by {worst:.1f} px"


def test_gradient_heatmap_is_gradient_times_input(setup, tiny_clip):
    """Against central finite differences: scaling patch p's embedding by (1 + h) changes the latent by
    h * (e_p . grad_p) to first order; and it approximates occlusion (blanking = a zero embedding)."""
    model, sae = tiny_clip, setup["sae"]
    x = setup["ds"][3][0][None]
    with torch.no_grad():
        _, c = model.run_with_cache(x, names_filter=[HOOK])
        codes = sae.encode(c[HOOK][:, 0])[0]
    s1, s2 = [int(i) for i in torch.nonzero(codes > 0).flatten()[:2]]
    (maps,) = gradient_maps(model, sae, x, [[s1, s2]], HOOK)
    assert maps.shape == (2, 16)

    def latent(s, p, scale):
        def hook(act, hook):
            act = act.clone()
            act[:, p] *= scale
            return act

        with torch.no_grad():
            out = model.run_with_hooks(x, stop_at_layer=2, fwd_hooks=[("hook_patch_embed", hook)])
            return float(sae.encode(out[:, 0])[0, s])

    h = 1e-2
    for j, s in enumerate((s1, s2)):
        want = np.array([max(0.0, (latent(s, p, 1 + h) - latent(s, p, 1 - h)) / (2 * h)) for p in range(16)])
        assert want.max() > 0
        np.testing.assert_allclose(maps[j], want, rtol=1e-2, atol=5e-3 * want.max())  # float32 rounding
    assert not np.allclose(maps[0], maps[1])  # specific to the latent (attention maps are not)


def test_histogram_axes_and_neighbour_links(setup):
    out, st = setup["root"] / "fb", setup["fb"].stats
    alive = [int(s) for s in st.alive]
    for j, s in enumerate(alive[:30]):
        html = (out / "latents" / f"latent_{s:05d}.html").read_text()
        prev = re.search(r'<a id="prev" href="latent_(\d+)\.html"', html)
        nxt = re.search(r'<a id="next" href="latent_(\d+)\.html"', html)
        assert (int(prev.group(1)) if prev else None) == (alive[j - 1] if j > 0 else None)
        assert (int(nxt.group(1)) if nxt else None) == (alive[j + 1] if j + 1 < len(alive) else None)
        svg = ET.fromstring(re.search(r'<svg id="histogram".*?</svg>', html, re.S).group(0))
        counts = [int(r.find("title").text.split(": ")[1].split()[0]) for r in svg.iter("rect")]
        assert counts == st.hist_counts_SB[s].tolist()
        # the y-axis: tick labels at their heights; each bar's top read off the axis is its count
        yt = {float(t.text): float(t.get("y")) - 3 for t in svg.iter("text") if "y-tick" in t.get("class", "")}
        (t0, y0), (t1, y1) = min(yt.items()), max(yt.items())
        assert t0 == 0 and t1 >= max(counts)
        for r, n in zip(svg.iter("rect"), counts):
            top = float(r.get("y"))
            assert t0 + (t1 - t0) * (y0 - top) / (y0 - y1) == pytest.approx(n, abs=0.05 * t1 / 100 + 0.02)
        # the x-axis: tick labels at their positions; the last bar ends at the latent's maximum
        xt = [(float(t.text), float(t.get("x"))) for t in svg.iter("text") if "x-tick" in t.get("class", "")]
        assert xt[0][0] == 0 and xt[-1][0] <= st.max_act_S[s] * (1 + 1e-3)
        rects = list(svg.iter("rect"))
        left = float(rects[0].get("x"))
        right = float(rects[-1].get("x")) + float(rects[-1].get("width")) + 1  # bars have 1 px gaps
        for v, x in xt:
            assert x == pytest.approx(left + (right - left) * v / st.max_act_S[s], abs=0.2)


def test_per_class_counts_and_standard_errors(setup, tiny_clip, tmp_path):
    """Class means: n and the standard error against numpy on the dense codes; VS2 changes: n and the
    binomial standard error sqrt(p1(1-p1)/n + p0(1-p0)/n) written here; features.json names the SAE
    (a fingerprint of its weights, the same for the folder re-loaded) and the results file (sha256)."""
    names = setup["ds"].classnames
    C = len(names)
    rng = np.random.default_rng(0)
    counts = rng.integers(20, 60, C).tolist()
    zs = [100 * int(rng.integers(0, n + 1)) / n for n in counts]
    vs2 = [min(100.0, z + 100 * int(rng.integers(0, 4)) / n) for z, n in zip(zs, counts)]
    results = {"methods": {"zeroshot": {"per_class_acc": zs}, "vs2": {"per_class_acc": vs2}}, "classnames": names,
               "class_counts": counts, "config": {"n_images": sum(counts)}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    fb = build_feature_browser(setup["root"] / "cache", setup["sae"], tiny_clip, tmp_path / "fb", top_k=2,
                               heatmap="none", results=path, sae_source=setup["root"] / "sae", templates="single",
                               show_progress=False)
    st = fb.stats
    s = int(st.alive[np.argmax(st.freq_S[st.alive])])
    page = (tmp_path / "fb" / "latents" / f"latent_{s:05d}.html").read_text()
    means = page.split('id="class-means"')[1].split("</table>")[0]
    for row in re.findall(r"<tr><td><bdi>(.*?)</bdi></td><td class=\"count\">(\d+)</td>", means):
        assert int(row[1]) == int(st.class_counts_C[names.index(row[0])])
    section = page.split('id="vs2-changes"')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td><bdi>(.*?)</bdi></td><td class=\"count\">(\d+)</td>.*?<td>([+-][\d.]+) \+- ([\d.]+)",
                      section)
    assert rows
    for name, n, delta, se in rows:
        c = names.index(name)
        p1, p0 = vs2[c] / 100, zs[c] / 100
        assert int(n) == counts[c]
        assert float(delta) == pytest.approx(vs2[c] - zs[c], abs=0.051)
        assert float(se) == pytest.approx(100 * np.sqrt((p1 * (1 - p1) + p0 * (1 - p0)) / counts[c]), abs=0.051)
    record = json.loads((tmp_path / "fb" / "features.json").read_text())
    assert record["results"] == {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                 "vs2_method": "vs2"}
    reloaded = load_sae(setup["root"] / "sae")
    from sae_lens_vision_steer.explore.browser import sae_record

    assert record["sae"]["fingerprint"] == sae_record(reloaded, None)["fingerprint"]
    assert record["sae"]["source"] == str(setup["root"] / "sae") and record["sae"]["d_sae"] == st.d_sae
    with torch.no_grad():
        reloaded.W_enc[0, 0] += 1e-3
    assert sae_record(reloaded, None)["fingerprint"] != record["sae"]["fingerprint"]


def test_class_mean_standard_errors(hostile):
    """Against numpy on the dense codes (4 images per class; NaN for classes of fewer than 2 images)."""
    out, fb, sae = hostile
    cache = ActivationStore.open(out.parent / "cache")
    with torch.no_grad():
        codes = sae.encode(cache.load(HOOK)).numpy()
    labels = cache.labels
    for s in fb.stats.alive:
        want = [codes[labels == c, s].std(ddof=1) / np.sqrt((labels == c).sum()) for c in range(len(HOSTILE))]
        np.testing.assert_allclose(fb.stats.class_sem_SC[s], want, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(fb.stats.class_counts_C, np.bincount(labels))


def test_results_errors_are_one_line(setup, tmp_path, capsys):
    root = setup["root"]
    n = len(setup["ds"].classnames)
    args = ["features", "--cache", str(root / "cache"), "--sae", str(root / "sae"), "--no-progress",
            "--random-weights", "--model-kwargs", json.dumps(tiny_kwargs()), "--heatmap", "none",
            "--templates", "single"]
    cases = {
        "short.json": ({"methods": {"zeroshot": {"per_class_acc": [50.0] * n}, "vs2": {"per_class_acc": [50.0] * 3}}},
                       "methods.vs2.per_class_acc has 3 entries"),
        "abc.json": ({"methods": {"zeroshot": {"per_class_acc": "abc"}, "vs2": {"per_class_acc": [1.0] * n}}},
                     "methods.zeroshot.per_class_acc must be a list"),
    }
    for fname, (content, message) in cases.items():
        (tmp_path / fname).write_text(json.dumps(content))
        capsys.readouterr()
        assert cli_main(args + ["--out", str(tmp_path / "fb"), "--results", str(tmp_path / fname)]) == 3
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and fname in err and "Traceback" not in err
    (tmp_path / "latin1.json").write_bytes('{"methods": {"caf\xe9": 1}}'.encode("latin-1"))
    assert cli_main(args + ["--out", str(tmp_path / "fb"), "--results", str(tmp_path / "latin1.json")]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "latin1.json" in err and "not UTF-8" in err
    assert not (tmp_path / "fb").exists()


def test_non_utf8_file_name_is_named_not_a_traceback(setup, tiny_clip, tmp_path):
    """A class folder renamed to a Latin-1 name after caching: the build finishes, the note that leaves
    the images out names the folder and says why, and every page is valid UTF-8."""
    import shutil

    src = write_image_folder(tmp_path / "imgs", n_classes=2, per_class=3)
    ds = load_image_dataset("imagefolder", None, src, transform=tiny_clip.preprocess)
    cache_activations(tiny_clip, ds, HOOK, positions="cls", out_dir=tmp_path / "cache", show_progress=False)
    sae = train_sae(tmp_path / "cache", k=2, expansion_factor=1, epochs=1, batch_size=3, out_dir=tmp_path / "sae",
                    holdout_fraction=0, show_progress=False).sae
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    os.rename(moved / "class_1", os.fsdecode(os.fsencode(moved) + b"/caf\xe9"))
    fb = build_feature_browser(tmp_path / "cache", sae, tiny_clip, tmp_path / "fb", top_k=2, data_dir=moved,
                               heatmap="none", show_progress=False)
    note = " ".join(fb.notes)
    assert "Images are left out" in note and "caf" in note and "UTF-8" in note
    for p in (tmp_path / "fb").rglob("*.html"):
        p.read_bytes().decode("utf-8")


def test_swap_leaves_a_users_old_folder_alone(setup, tiny_clip, tmp_path):
    out = tmp_path / "fb"
    mine = tmp_path / ".fb.old"  # the name the swap used to delete
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    for _ in range(2):  # the second build replaces the first
        build_feature_browser(setup["root"] / "cache", setup["sae"], tiny_clip, out, top_k=1, heatmap="none",
                              templates="single", show_progress=False)
    assert (mine / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fb.old", "fb"]  # no temporary folder left
    assert json.loads((out / "features.json").read_text())["top_k"] == 1
