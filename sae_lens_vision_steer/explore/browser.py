"""`build_feature_browser`: a static folder of HTML, JS and PNG showing what each SAE latent does.

Layout of the output folder (opens from disk, no server; can be uploaded next to the SAE)::

    index.html  index_data.js  browser.js  style.css   every latent, sortable and searchable
    latents/latent_00042.html                           one page per live latent (dead ones: listed only)
    images/img_000123.png                               thumbnails of the top images (the model's view)
    features.json                                       what was built from what, timings, file list

The folder is written next to its destination and renamed into place (`folder.py`), so an
interrupted build leaves the previous browser untouched. A destination holding anything else (no
`features.json`, or files that the previous build did not write) is refused.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sae_lens import SAE
from tqdm.auto import tqdm

from ..activation_cache import ActivationStore, model_fingerprint
from ..core.errors import InputError, UsageError
from ..core.fileio import write_json_atomic
from ..core.identity import portable_model_name, tensors_fingerprint
from ..sae.metadata import check_sae_fits_hook, check_sae_positions, sae_hook_name
from ..sae.splice import HookedCLIP
from . import heatmaps as hm
from .directions import decoder_class_scores, promoted_classes
from .folder import MARKER, check_destination, new_build_folder, set_modes, swap_into_place
from .html import BROWSER_JS, CSS, display_text, index_data_js, index_page
from .images import THUMB_PX, load_images, open_cache_dataset, thumbnail
from .pages import PageInputs, index_rows, latent_file, latent_page, summary_line
from .stats import LatentStats, latent_stats
from .vs2 import read_results, vs2_changes


@dataclass(frozen=True, kw_only=True)
class BrowserConfig:
    """What to build. `heatmap`: auto (`sae` for patch/all-token caches, else `gradient`), attention,
    gradient, occlusion, sae or none. `data_dir`: the cache's image folder if it moved."""

    hook_name: str | None = None
    top_k: int = 12
    heatmap: str = "auto"
    data_dir: str | Path | None = None
    templates: str | None = None
    n_promoted: int = 5

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UsageError(f"top_k must be at least 1, got {self.top_k}")
        if self.n_promoted < 1:
            raise UsageError(f"n_promoted must be at least 1, got {self.n_promoted}")
        if self.heatmap not in ("auto", "none", *hm.METHODS):
            raise UsageError(f"heatmap must be auto, none, {', '.join(hm.METHODS)}; got {self.heatmap!r}")


@dataclass
class FeatureBrowser:
    path: Path
    stats: LatentStats
    n_pages: int
    n_images_written: int
    timing: dict[str, float]
    notes: list[str]
    record: dict[str, Any] = field(default_factory=dict)  # features.json


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


def sae_record(sae: SAE, source: str | Path | None) -> dict[str, Any]:
    """What features.json says about the SAE: where it came from and a fingerprint of its weights."""
    meta = sae.cfg.metadata
    return {"source": None if source is None else display_text(source),
            "fingerprint": tensors_fingerprint(sorted(sae.state_dict().items())),
            "architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
            "k": getattr(sae.cfg, "k", None), "hook_name": meta.get("hook_name"),
            "model_name": meta.get("model_name"), "positions": meta.get("positions")}


def build_feature_browser(cache_dir: str | Path, sae: SAE, model: HookedCLIP, out_dir: str | Path,
                          config: BrowserConfig | None = None, *, results: dict[str, Any] | str | Path | None = None,
                          sae_source: str | Path | None = None, show_progress: bool = True,
                          **config_fields: Any) -> FeatureBrowser:
    """Build the browser in `out_dir` (see the module docstring); settings in `config` or as its fields
    (`top_k=...`). `results`: the path of a `results.json` of `vision-steer eval` (or its parsed
    content), for the VS2 per-class changes. `sae_source`: where the SAE was loaded from, recorded in
    features.json with a fingerprint of its weights."""
    from ..data.resources import DEFAULT_TEMPLATES
    from ..zeroshot.classifier import ZeroShotClassifier

    unknown = set(config_fields) - {f.name for f in fields(BrowserConfig)}
    if unknown:
        raise UsageError(f"unknown feature-browser settings {sorted(unknown)}")
    cfg = BrowserConfig(**{**(asdict(config) if config else {}), **config_fields})
    out = Path(out_dir)
    check_destination(out)
    results_record, where = None, "results"
    if results is not None and not isinstance(results, dict):
        results, results_record = read_results(results)
        where = f"results file {results_record['path']}"
    elif results is not None and not isinstance(results.get("methods"), dict):
        raise InputError("results is not a results.json of `vision-steer eval` (no 'methods')")
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    cache = ActivationStore.open(cache_dir)
    hook = check_sae_and_cache(sae, cache, model, cfg.hook_name)
    heatmap = cfg.heatmap
    if heatmap == "auto":
        heatmap = "sae" if cache.positions != "cls" else "gradient"
    if heatmap == "sae" and cache.positions == "cls":
        raise UsageError("heatmap 'sae' needs a cache of patch or all tokens; this cache holds CLS rows only")
    if heatmap == "gradient":
        hm.check_gradient_hook(hook)  # refuses hooks where the CLS row does not see the patches
    notes: list[str] = []
    ds, why = open_cache_dataset(cache, model, cfg.data_dir)
    classnames = list(ds.classnames) if ds is not None and getattr(ds, "classnames", None) else None
    if ds is None:
        notes.append(f"Images are left out: {why}.")
    vs2 = vs2_changes(results, classnames, len(classnames) if classnames else None, notes, where)
    timing["open_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    stats = latent_stats(cache, sae, hook, top_k=cfg.top_k, n_classes=len(classnames) if classnames else None,
                         show_progress=show_progress)
    timing["stats_pass_s"] = time.perf_counter() - t
    notes += [m[0].upper() + m[1:] + "." for m in stats.missing.values()]
    if stats.image_index_N is None:
        ds = None
    if vs2 is not None and stats.class_freq_SC is None:
        vs2 = None
    elif vs2 is not None and classnames is None:  # only the largest cached label is known, and only now
        vs2 = vs2_changes(results, None, stats.class_freq_SC.shape[1], [], where, at_least=True)

    t = time.perf_counter()
    inputs = PageInputs(stats=stats, classnames=classnames, notes=notes, thumb_px=THUMB_PX, grid=hm.grid_shape(model),
                        vs2=vs2)
    if classnames:
        tmpl = cfg.templates or DEFAULT_TEMPLATES.get(cache.metadata.get("dataset", ""), "single")
        clf = ZeroShotClassifier(model, classnames, tmpl, show_progress=show_progress)
        idx, val = promoted_classes(decoder_class_scores(model, sae, clf.weights_EC), cfg.n_promoted)
        inputs.promoted_idx_SN, inputs.promoted_score_SN = idx.numpy(), val.numpy()
    else:
        notes.append("The data set's class names are unknown; promoted classes are left out.")
    timing["classes_s"] = time.perf_counter() - t

    notes[:] = [display_text(n) for n in notes]  # a non-UTF-8 file name in a note: printable and writable
    tmp = new_build_folder(out)
    try:
        written = _write(tmp, inputs, ds, model, sae, cache, hook, heatmap, timing, show_progress)
        summary = {"model": display_text(model.cfg.model_name), "hook": hook, "d_sae": sae.cfg.d_sae,
                   "images": stats.n_images, "alive": len(stats.alive), "dead": len(stats.dead),
                   "heatmaps": inputs.heatmap_method or "none"}
        (tmp / "index.html").write_text(index_page(summary, stats.dead.tolist(), notes), encoding="utf-8")
        (tmp / "index_data.js").write_text(index_data_js(index_rows(inputs)), encoding="utf-8")
        (tmp / "browser.js").write_text(BROWSER_JS, encoding="utf-8")
        (tmp / "style.css").write_text(CSS, encoding="utf-8")
        files = sorted(written + ["index.html", "index_data.js", "browser.js", "style.css", MARKER])
        timing["total_s"] = time.perf_counter() - t0
        record = {"summary": summary, "cache": display_text(cache.root), "sae": sae_record(sae, sae_source),
                  "results": None if results is None else {
                      **(results_record or {"path": None, "sha256": None}),
                      "vs2_method": vs2.label if vs2 is not None else None},
                  "settings": {**asdict(cfg), "data_dir": None if cfg.data_dir is None else display_text(cfg.data_dir),
                               "heatmap": inputs.heatmap_method or "none"},
                  "top_k": cfg.top_k, "notes": notes, "timing": timing, "files": files}
        write_json_atomic(tmp / MARKER, record, indent=2)
        set_modes(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureBrowser(out, stats, len(stats.alive), len([f for f in files if f.startswith("images/")]),
                          timing, notes, record)


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
        (tmp / name).write_text(latent_page(inputs, int(s), line), encoding="utf-8")
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
    elif method == "gradient":
        maps = hm.gradient_maps(model, sae, imgs, per_image, hook)
    else:
        maps = hm.sae_patch_maps(cache, sae, hook, chunk, per_image)
    for i, lats, m in zip(chunk, per_image, maps):
        for s, row in zip(lats, m):
            inputs.heatmaps[(s, i)] = row.reshape(inputs.grid)


__all__ = ["BrowserConfig", "FeatureBrowser", "build_feature_browser", "check_destination", "check_sae_and_cache"]
