"""Assembling the latent pages and the index rows from `LatentStats` and the optional extras
(promoted classes, heatmaps, VS2 per-class changes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .html import bar_rows, display_text, esc, histogram_svg, image_tile, name_html, notes_html, page
from .stats import LatentStats

N_CLASS_ROWS = 10
VS2_MIN_CLASS_FREQ = 0.10  # a class counts as "where the latent is active" above this firing rate

HEATMAP_TEXT = {
    "attention": "CLS attention to each patch in the SAE's block (head mean; the same for every latent)",
    "occlusion": "drop of this latent's activation when the patch is blanked (latent-specific)",
    "sae": "this latent's activation on each patch token (latent-specific)",
    "gradient": "gradient x input at the patch embeddings, positive part: the first-order estimate of how much "
                "this latent drops when the patch is blanked (latent-specific; one backward pass per image)",
}


@dataclass
class PageInputs:
    stats: LatentStats
    classnames: list[str] | None
    promoted_idx_SN: np.ndarray | None = None  # [S, n] class indices
    promoted_score_SN: np.ndarray | None = None
    image_src: dict[int, str] = field(default_factory=dict)  # cache image number -> thumbnail path
    heatmaps: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # (latent, image) -> [n_patches]
    heatmap_method: str | None = None
    grid: tuple[int, int] = (1, 1)
    vs2: Any = None  # a `vs2.VS2Changes`, from results.json
    notes: list[str] = field(default_factory=list)  # shown on every page (what was left out, and why)
    thumb_px: int = 96


def class_name(inputs: PageInputs, c: int) -> str:
    name = inputs.classnames[c] if inputs.classnames and c < len(inputs.classnames) else f"class {c}"
    return display_text(name)


def index_rows(inputs: PageInputs) -> list[dict[str, Any]]:
    st = inputs.stats
    rows = []
    for s in st.alive:
        promoted = [class_name(inputs, int(c)) for c in inputs.promoted_idx_SN[s]] \
            if inputs.promoted_idx_SN is not None else []
        top_class = class_name(inputs, int(st.class_means_SC[s].argmax())) if st.class_means_SC is not None else ""
        rows.append({"id": int(s), "freq": round(float(st.freq_S[s]), 6), "mean_act": round(float(st.mean_act_S[s]), 5),
                     "promoted": promoted, "promoted_text": ", ".join(promoted), "top_class": top_class,
                     "text": " | ".join([*promoted, top_class]).lower()})
    return rows


def _vs2_section(inputs: PageInputs, s: int) -> str:
    st, v = inputs.stats, inputs.vs2
    if v is None:
        return ""
    freq_C = st.class_freq_SC[s]
    active = np.nonzero(freq_C >= VS2_MIN_CLASS_FREQ)[0]
    counts_text = ("the evaluation's image count per class" if v.counts_exact else
                   "about n_images / n_classes images per class (results.json records no per-class counts)")
    head = (f"<h2>{esc(v.label)} per-class changes where this latent is active</h2>"
            f'<p class="muted">Classes on whose images the latent fires at least {VS2_MIN_CLASS_FREQ:.0%} of the time, '
            f"with that class's top-1 change ({esc(v.label)} minus zero-shot, points, from results.json; "
            "per-class, since results.json holds no per-image predictions), largest changes first. "
            f"n: {counts_text}; one image is 100 / n points. The grey band is +-1 binomial standard error of the "
            "change, sqrt(p1(1-p1)/n + p0(1-p0)/n), as if the two methods erred independently (an upper bound "
            "when they err on the same images).</p>")
    if not len(active):
        return head + '<p class="muted">no class reaches that firing rate</p>'
    delta = v.delta_C[active]
    keep = ~np.isnan(delta)
    active, delta = active[keep], delta[keep]
    order = np.argsort(-np.abs(delta), kind="stable")[:N_CLASS_ROWS]
    cls = active[order]
    se = v.std_error_C[cls] if v.std_error_C is not None else None
    rows = [(class_name(inputs, int(c)), float(d),
             f"{d:+.1f}" + (f" +- {se[j]:.1f}" if se is not None and np.isfinite(se[j]) else "")
             + f" points (fires on {freq_C[c]:.0%})") for j, (c, d) in enumerate(zip(cls, delta[order]))]
    scale = float(np.nanmax(np.abs(delta[order]) + (np.nan_to_num(se) if se is not None else 0))) if len(order) else 0
    counts = None if v.counts_C is None else [int(v.counts_C[c]) for c in cls]
    return head + bar_rows(rows, scale, "vs2-changes", bands=None if se is None else list(se), counts=counts,
                           header=["class", "n", "change", ""] if counts is not None else None)


def _class_means_section(inputs: PageInputs, s: int) -> str:
    st = inputs.stats
    means, sem, freq, n = st.class_means_SC[s], st.class_sem_SC[s], st.class_freq_SC[s], st.class_counts_C
    order = np.argsort(-means, kind="stable")[:N_CLASS_ROWS]
    fse = np.sqrt(freq * (1 - freq) / np.maximum(n, 1))  # binomial standard error of the firing rate
    rows = [(class_name(inputs, int(c)), float(means[c]),
             f"{means[c]:.4g} +- {sem[c]:.2g}" if np.isfinite(sem[c]) else f"{means[c]:.4g} (one image: no error)")
            for c in order]
    rows = [(name, v, f"{text}; fires on {freq[c]:.0%} +- {fse[c]:.0%} of {int(n[c])}")
            for (name, v, text), c in zip(rows, order)]
    scale = float(np.nan_to_num(means[order] + sem[order], nan=0.0).max(initial=0.0)) if len(order) else 0.0
    scale = max(scale, float(means[order].max()) if len(order) else 0.0)
    return ("<h2>Per-class mean activation (top classes)</h2>"
            '<p class="muted">n: the cache\'s images of the class. Mean over all of them (zeros included) '
            "+- its standard error s / sqrt(n) (grey band); firing rate +- its binomial standard error "
            "sqrt(f(1-f)/n).</p>"
            + bar_rows(rows, scale, "class-means", bands=[float(sem[c]) for c in order],
                       counts=[int(n[c]) for c in order], header=["class", "n", "mean activation", ""]))


def _nav(inputs: PageInputs, s: int) -> str:
    alive = inputs.stats.alive
    j = int(np.searchsorted(alive, s))
    prev = f'<a id="prev" href="{latent_file(int(alive[j - 1]))[8:]}">&larr; latent {int(alive[j - 1])}</a>' \
        if j > 0 else '<span class="muted">first latent</span>'
    nxt = f'<a id="next" href="{latent_file(int(alive[j + 1]))[8:]}">latent {int(alive[j + 1])} &rarr;</a>' \
        if j + 1 < len(alive) else '<span class="muted">last latent</span>'
    return f'<nav>{prev} <a id="up" href="../index.html">all latents</a> {nxt}</nav>'


def latent_page(inputs: PageInputs, s: int, summary_line: str) -> str:
    st = inputs.stats
    parts = [_nav(inputs, s), f"<h1>Latent {s}</h1><p>{summary_line}</p>", notes_html(inputs.notes),
             f'<p>fires on <b id="freq">{100 * st.freq_S[s]:.2f}%</b> of {st.n_images} images; mean activation '
             f"when active <b>{st.mean_act_S[s]:.4g}</b>, max <b>{st.max_act_S[s]:.4g}</b></p>"]
    if inputs.promoted_idx_SN is not None:
        rows = [(class_name(inputs, int(c)), float(v), f"{v:+.3f}")
                for c, v in zip(inputs.promoted_idx_SN[s], inputs.promoted_score_SN[s])]
        parts.append("<h2>Classes the decoder direction promotes</h2>"
                     '<p class="muted">cosine of the direction, through ln_post and the projection, with each '
                     "class-prompt embedding</p>" + bar_rows(rows, max(abs(r[1]) for r in rows), "promoted"))
    k = int((st.top_images_SK[s] >= 0).sum())
    method = HEATMAP_TEXT.get(inputs.heatmap_method or "", "none")
    tiles = []
    for j in range(k):
        img, val = int(st.top_images_SK[s, j]), float(st.top_values_SK[s, j])
        label = " " + name_html(class_name(inputs, int(st.labels_N[img]))) if st.labels_N is not None else ""
        tiles.append(image_tile(inputs.image_src.get(img), f"{val:.3g}{label}", inputs.heatmaps.get((s, img)),
                                inputs.grid, inputs.thumb_px))
    parts.append(f'<h2>Top {k} images</h2><p class="muted" id="heatmap-method" '
                 f'data-method="{esc(inputs.heatmap_method or "none")}">heatmap: {esc(method)}</p>'
                 f'<div class="grid" id="top-images">{"".join(tiles)}</div>')
    parts.append("<h2>Activation histogram (images where it fires)</h2>"
                 + histogram_svg(st.hist_counts_SB[s], st.hist_edges_SB1[s]))
    if st.class_means_SC is not None:
        parts.append(_class_means_section(inputs, s))
    parts.append(_vs2_section(inputs, s))
    return page(f"latent {s}", "\n".join(p for p in parts if p), depth=1)


def latent_file(s: int) -> str:
    return f"latents/latent_{s:05d}.html"


def summary_line(items: Sequence[tuple[str, Any]]) -> str:
    return " &middot; ".join(f"{esc(k)} <b>{esc(v)}</b>" for k, v in items)
