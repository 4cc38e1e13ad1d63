"""Assembling the latent pages and the index rows from `LatentStats` and the optional extras
(promoted classes, heatmaps, VS2 per-class changes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .html import bar_rows, histogram_svg, image_tile, notes_html, page
from .stats import LatentStats

N_CLASS_ROWS = 10
VS2_MIN_CLASS_FREQ = 0.10  # a class counts as "where the latent is active" above this firing rate


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
    vs2_delta_C: np.ndarray | None = None  # per-class VS2 - zero-shot top-1 (points), from results.json
    vs2_label: str = "vs2"
    notes: list[str] = field(default_factory=list)  # shown on every page (what was left out, and why)
    thumb_px: int = 96


def class_name(inputs: PageInputs, c: int) -> str:
    return inputs.classnames[c] if inputs.classnames and c < len(inputs.classnames) else f"class {c}"


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
    st = inputs.stats
    if inputs.vs2_delta_C is None:
        return ""
    freq_C = st.class_freq_SC[s]
    active = np.nonzero(freq_C >= VS2_MIN_CLASS_FREQ)[0]
    head = (f"<h2>{inputs.vs2_label} per-class changes where this latent is active</h2>"
            f'<p class="muted">Classes on whose images the latent fires at least {VS2_MIN_CLASS_FREQ:.0%} of the time, '
            f"with that class's top-1 change ({inputs.vs2_label} minus zero-shot, points, from results.json; "
            "per-class, since results.json holds no per-image predictions), largest changes first.</p>")
    if not len(active):
        return head + '<p class="muted">no class reaches that firing rate</p>'
    delta = inputs.vs2_delta_C[active]
    keep = ~np.isnan(delta)
    active, delta = active[keep], delta[keep]
    order = np.argsort(-np.abs(delta), kind="stable")[:N_CLASS_ROWS]
    rows = [(class_name(inputs, int(active[i])), float(delta[i]),
             f"{delta[i]:+.1f} points (fires on {freq_C[active[i]]:.0%})") for i in order]
    scale = float(np.abs(delta[order]).max()) if len(order) else 0.0
    return head + bar_rows(rows, scale, "vs2-changes")


def latent_page(inputs: PageInputs, s: int, summary_line: str) -> str:
    st = inputs.stats
    parts = [f'<p><a href="../index.html">&larr; all latents</a></p><h1>Latent {s}</h1><p>{summary_line}</p>',
             notes_html(inputs.notes),
             f'<p>fires on <b id="freq">{100 * st.freq_S[s]:.2f}%</b> of {st.n_images} images; mean activation '
             f"when active <b>{st.mean_act_S[s]:.4g}</b>, max <b>{st.max_act_S[s]:.4g}</b></p>"]
    if inputs.promoted_idx_SN is not None:
        rows = [(class_name(inputs, int(c)), float(v), f"{v:+.3f}")
                for c, v in zip(inputs.promoted_idx_SN[s], inputs.promoted_score_SN[s])]
        parts.append("<h2>Classes the decoder direction promotes</h2>"
                     '<p class="muted">cosine of the direction, through ln_post and the projection, with each '
                     "class-prompt embedding</p>" + bar_rows(rows, max(abs(r[1]) for r in rows), "promoted"))
    k = int((st.top_images_SK[s] >= 0).sum())
    method = {"attention": "CLS attention to each patch in the SAE's block (head mean; the same for every latent)",
              "occlusion": "drop of this latent's activation when the patch is blanked",
              "sae": "this latent's activation on each patch token"}.get(inputs.heatmap_method or "", "none")
    tiles = []
    for j in range(k):
        img, val = int(st.top_images_SK[s, j]), float(st.top_values_SK[s, j])
        label = ""
        if st.labels_N is not None:
            label = " " + class_name(inputs, int(st.labels_N[img]))
        tiles.append(image_tile(inputs.image_src.get(img), f"{val:.3g}{label}", inputs.heatmaps.get((s, img)),
                                inputs.grid, inputs.thumb_px))
    parts.append(f"<h2>Top {k} images</h2><p class=\"muted\">heatmap: {method}</p>"
                 f'<div class="grid" id="top-images">{"".join(tiles)}</div>')
    parts.append("<h2>Activation histogram (images where it fires)</h2>"
                 + histogram_svg(st.hist_counts_SB[s], st.hist_edges_SB1[s]))
    if st.class_means_SC is not None:
        means = st.class_means_SC[s]
        order = np.argsort(-means, kind="stable")[:N_CLASS_ROWS]
        rows = [(class_name(inputs, int(c)), float(means[c]),
                 f"{means[c]:.4g} (fires on {st.class_freq_SC[s, c]:.0%} of {int(st.class_counts_C[c])})") for c in order]
        parts.append("<h2>Per-class mean activation (top classes)</h2>"
                     + bar_rows(rows, float(means[order[0]]) if len(order) else 0.0, "class-means"))
    parts.append(_vs2_section(inputs, s))
    return page(f"latent {s}", "\n".join(p for p in parts if p), depth=1)


def latent_file(s: int) -> str:
    return f"latents/latent_{s:05d}.html"


def summary_line(items: Sequence[tuple[str, Any]]) -> str:
    from html import escape

    return " &middot; ".join(f"{escape(k)} <b>{escape(str(v))}</b>" for k, v in items)
