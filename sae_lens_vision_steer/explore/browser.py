"""`build_feature_browser`: a static folder of HTML, JS and PNG showing what each SAE latent does.

Layout of the output folder (opens from disk, no server; can be uploaded next to the SAE)::

    index.html  index_data.js  browser.js  style.css   every latent, sortable and searchable
    latents/latent_00042.html                           one page per live latent (dead ones: listed only)
    images/img_000123.png                               thumbnails of the top images (the model's view)
    features.json                                       what was built from what, timings, file list

The folder is written next to its destination and renamed into place, so an interrupted build
leaves the previous browser untouched. A destination holding anything else (no `features.json`, or
files that the previous build did not write) is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sae_lens import SAE
from tqdm.auto import tqdm

from ..activation_cache import ActivationStore, model_fingerprint
from ..core.errors import ConflictError, InputError, OutputError, UsageError
from ..core.fileio import file_mode, write_json_atomic
from ..core.identity import portable_model_name
from ..sae.metadata import check_sae_fits_hook, check_sae_positions, sae_hook_name
from ..sae.splice import HookedCLIP
from . import heatmaps as hm
from .directions import decoder_class_scores, promoted_classes
from .html import BROWSER_JS, CSS, index_data_js, index_page
from .images import THUMB_PX, load_images, open_cache_dataset, thumbnail
from .pages import PageInputs, index_rows, latent_file, latent_page, summary_line
from .stats import LatentStats, latent_stats

MARKER = "features.json"


@dataclass
class FeatureBrowser:
    path: Path
    stats: LatentStats
    n_pages: int
    n_images_written: int
    timing: dict[str, float]
    notes: list[str]


def check_sae_and_cache(sae: SAE, cache: ActivationStore, model: HookedCLIP, hook_name: str | None) -> str:
    """The SAE's hook, after checking that cache, SAE and model belong together (each difference named)."""
    hook = sae_hook_name(sae, hook_name)
    problems = []
    if hook not in cache.hook_names:
        problems.append(f"the cache holds hooks {cache.hook_names}, not the SAE's hook {hook!r}")
    elif cache.d_in(hook) != sae.cfg.d_in:
        problems.append(f"the cache's width at {hook!r} is {cache.d_in(hook)}, the SAE's d_in is {sae.cfg.d_in}")
    req, meta = cache.metadata.get("request", {}), sae.cfg.metadata
    same_name = portable_model_name(meta.get("model_name")) == portable_model_name(req.get("model_name"))
    if meta.get("model_name") and req.get("model_name") and not same_name:  # local-dir: by folder name
        problems.append(f"the cache was made with {req['model_name']!r}, the SAE with {meta['model_name']!r}")
    if req.get("model_fingerprint") and req["model_fingerprint"] != model_fingerprint(model):
        problems.append("the cache was made with other model weights than the model loaded")
    if problems:
        raise InputError(f"the SAE does not fit the cache {cache.root}: " + "; ".join(problems))
    check_sae_fits_hook(sae, model, hook)
    check_sae_positions(sae, cache.positions, where=f"in the cache {cache.root}")
    return hook


def check_destination(out: Path) -> list[str]:
    """Files of the previous build in `out` (to be replaced), or a ConflictError for a foreign folder."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the feature browser")
    entries = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    if not entries:
        return []
    if not (out / MARKER).is_file():
        raise ConflictError(f"{out} holds other files ({', '.join(sorted(entries)[:3])}, ...) and no {MARKER}; "
                            "give an empty or new folder for the feature browser")
    try:
        previous = set(json.loads((out / MARKER).read_text()).get("files", []))
    except (ValueError, AttributeError):
        raise ConflictError(f"{out / MARKER} is unreadable; give another --out") from None
    foreign = [e for e in entries if e not in previous and e != MARKER]
    if foreign:
        raise ConflictError(f"{out} holds files that the previous feature browser did not write "
                            f"({', '.join(sorted(foreign)[:3])}); move them or give another --out")
    return entries


def _vs2_delta(results: dict[str, Any] | None, classnames: list[str] | None, notes: list[str]):
    if results is None:
        return None, "vs2"
    methods = results.get("methods", {})
    label = next((m for m in ("vs2", "vs2_pass") if m in methods), None) or \
        next((m for m in methods if m.startswith("vs2") and "pp" not in m), None)
    if label is None or "zeroshot" not in methods:
        notes.append("the results file has no zeroshot and VS2 rows; VS2 per-class changes are left out")
        return None, "vs2"
    names = results.get("classnames")
    if classnames is not None and names is not None and list(names) != list(classnames):
        notes.append("the results file's classes differ from the cache's; VS2 per-class changes are left out")
        return None, label
    nan = float("nan")
    a = np.array([nan if v is None else v for v in methods[label]["per_class_acc"]], dtype=float)
    b = np.array([nan if v is None else v for v in methods["zeroshot"]["per_class_acc"]], dtype=float)
    return a - b, label


def build_feature_browser(cache_dir: str | Path, sae: SAE, model: HookedCLIP, out_dir: str | Path, *,
                          hook_name: str | None = None, top_k: int = 12, heatmap: str = "auto",
                          results: dict[str, Any] | None = None, data_dir: str | Path | None = None,
                          templates: str | None = None, n_promoted: int = 5,
                          show_progress: bool = True) -> FeatureBrowser:
    """Build the browser in `out_dir` (see the module docstring). `heatmap`: auto (`sae` for patch/all
    token caches, else `attention`), attention, occlusion, sae or none. `results`: a parsed
    `results.json` of `vision-steer eval`, for the VS2 per-class changes."""
    from ..data.resources import DEFAULT_TEMPLATES
    from ..zeroshot.classifier import ZeroShotClassifier

    if top_k < 1:
        raise UsageError(f"top_k must be at least 1, got {top_k}")
    if heatmap not in ("auto", "none", *hm.METHODS):
        raise UsageError(f"heatmap must be auto, none, {', '.join(hm.METHODS)}; got {heatmap!r}")
    out = Path(out_dir)
    check_destination(out)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    cache = ActivationStore.open(cache_dir)
    hook = check_sae_and_cache(sae, cache, model, hook_name)
    if heatmap == "auto":
        heatmap = "sae" if cache.positions != "cls" else "attention"
    if heatmap == "sae" and cache.positions == "cls":
        raise UsageError("heatmap 'sae' needs a cache of patch or all tokens; this cache holds CLS rows only")
    notes: list[str] = []
    ds, why = open_cache_dataset(cache, model, data_dir)
    classnames = list(ds.classnames) if ds is not None and getattr(ds, "classnames", None) else None
    if ds is None:
        notes.append(f"Images are left out: {why}.")
    timing["open_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    stats = latent_stats(cache, sae, hook, top_k=top_k, n_classes=len(classnames) if classnames else None,
                         show_progress=show_progress)
    timing["stats_pass_s"] = time.perf_counter() - t
    notes += [m[0].upper() + m[1:] + "." for m in stats.missing.values()]
    if stats.image_index_N is None:
        ds = None

    t = time.perf_counter()
    inputs = PageInputs(stats=stats, classnames=classnames, notes=notes, thumb_px=THUMB_PX, grid=hm.grid_shape(model))
    if classnames:
        tmpl = templates or DEFAULT_TEMPLATES.get(cache.metadata.get("dataset", ""), "single")
        clf = ZeroShotClassifier(model, classnames, tmpl, show_progress=show_progress)
        idx, val = promoted_classes(decoder_class_scores(model, sae, clf.weights_EC), n_promoted)
        inputs.promoted_idx_SN, inputs.promoted_score_SN = idx.numpy(), val.numpy()
    else:
        notes.append("The data set's class names are unknown; promoted classes are left out.")
    inputs.vs2_delta_C, inputs.vs2_label = _vs2_delta(results, classnames, notes)
    if inputs.vs2_delta_C is not None and stats.class_freq_SC is None:
        inputs.vs2_delta_C = None
    timing["classes_s"] = time.perf_counter() - t

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))
    try:
        written = _write(tmp, inputs, ds, model, sae, cache, hook, heatmap, timing, show_progress)
        summary = {"model": model.cfg.model_name, "hook": hook, "d_sae": sae.cfg.d_sae,
                   "images": stats.n_images, "alive": len(stats.alive), "dead": len(stats.dead),
                   "heatmaps": inputs.heatmap_method or "none"}
        (tmp / "index.html").write_text(index_page(summary, stats.dead.tolist(), notes))
        (tmp / "index_data.js").write_text(index_data_js(index_rows(inputs)))
        (tmp / "browser.js").write_text(BROWSER_JS)
        (tmp / "style.css").write_text(CSS)
        files = sorted(written + ["index.html", "index_data.js", "browser.js", "style.css", MARKER])
        timing["total_s"] = time.perf_counter() - t0
        write_json_atomic(tmp / MARKER, {"summary": summary, "cache": str(cache.root), "sae": sae.cfg.metadata.get(
            "sae_folder"), "top_k": top_k, "notes": notes, "timing": timing, "files": files}, indent=2)
        _set_modes(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureBrowser(out, stats, len(stats.alive), len([f for f in files if f.startswith("images/")]),
                          timing, notes)


def _write(tmp: Path, inputs: PageInputs, ds, model, sae, cache, hook, heatmap, timing, show_progress) -> list[str]:
    st = inputs.stats
    written: list[str] = []
    (tmp / "latents").mkdir()
    t = time.perf_counter()
    if ds is not None:
        (tmp / "images").mkdir()
        wanted = sorted({int(i) for s in st.alive for i in st.top_images_SK[s] if i >= 0})
        items = [int(st.image_index_N[i]) for i in wanted]
        batch = 256
        for j in tqdm(range(0, len(wanted), batch), desc="top images and heatmaps", unit="batch",
                      disable=not show_progress):
            imgs = load_images(ds, items[j:j + batch])
            chunk = wanted[j:j + batch]
            for i, x in zip(chunk, imgs):
                name = f"images/img_{i:06d}.png"
                thumbnail(model, x).save(tmp / name)
                inputs.image_src[i] = "../" + name
                written.append(name)
            if heatmap != "none":
                _heatmaps(inputs, imgs, chunk, model, sae, cache, hook, heatmap)
        inputs.heatmap_method = heatmap if heatmap != "none" else None
    elif heatmap == "sae":
        wanted = sorted({int(i) for s in st.alive for i in st.top_images_SK[s] if i >= 0})
        _heatmaps(inputs, None, wanted, model, sae, cache, hook, heatmap)
        inputs.heatmap_method = "sae"
    timing["images_heatmaps_s"] = time.perf_counter() - t
    t = time.perf_counter()
    line = summary_line([("model", model.cfg.model_name), ("hook", hook), ("d_sae", sae.cfg.d_sae)])
    for s in tqdm(st.alive, desc="latent pages", unit="page", disable=not show_progress, mininterval=1):
        name = latent_file(int(s))
        (tmp / name).write_text(latent_page(inputs, int(s), line))
        written.append(name)
    timing["pages_s"] = time.perf_counter() - t
    return written


def _heatmaps(inputs: PageInputs, imgs, chunk: list[int], model, sae, cache, hook, method: str) -> None:
    st = inputs.stats
    latents_of: dict[int, list[int]] = {}
    for s in st.alive:
        for i in st.top_images_SK[s]:
            if i >= 0:
                latents_of.setdefault(int(i), []).append(int(s))
    per_image = [latents_of.get(i, []) for i in chunk]
    if method == "attention":
        maps = hm.attention_maps(model, imgs, hook)
        for i, lats, m in zip(chunk, per_image, maps):
            for s in lats:
                inputs.heatmaps[(s, i)] = m.reshape(inputs.grid)
        return
    if method == "occlusion":
        maps = hm.occlusion_maps(model, sae, imgs, per_image, hook, show_progress=False)
    else:
        maps = hm.sae_patch_maps(cache, sae, hook, chunk, per_image)
    for i, lats, m in zip(chunk, per_image, maps):
        for s, row in zip(lats, m):
            inputs.heatmaps[(s, i)] = row.reshape(inputs.grid)


def _set_modes(root: Path) -> None:
    """The usual umask permissions (mkdtemp makes the folder 0700)."""
    fmode = file_mode()
    dmode = fmode | ((fmode & 0o444) >> 2)  # r -> x for folders
    os.chmod(root, dmode)
    for p in root.rglob("*"):
        os.chmod(p, dmode if p.is_dir() else fmode)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        tmp.rename(out)


__all__ = ["FeatureBrowser", "build_feature_browser", "check_sae_and_cache"]
