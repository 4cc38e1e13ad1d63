"""The browser's HTML: an index page (every latent, sortable and searchable, rendered by `browser.js`
from `index_data.js`) and one static page per live latent. Plain files that open from disk: data is
loaded with `<script>` tags, never `fetch`, so `file://` works without a server."""

from __future__ import annotations

import json
from html import escape
from typing import Any, Sequence

import numpy as np

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
th[data-key]{cursor:pointer;user-select:none}th[data-key]:hover{background:#eef}
th.sorted-desc::after{content:" \\25BC"}th.sorted-asc::after{content:" \\25B2"}
.note{background:#fff6d5;padding:4px 8px;margin:4px 0;border-left:3px solid #e0b000}
.grid{display:flex;flex-wrap:wrap;gap:8px}.top-image{position:relative;font-size:11px;text-align:center}
.heat{position:absolute;top:0;left:0;display:grid}.cell{background:#ff2a00}
.bar{background:#4a7fd4;height:10px;display:inline-block}.neg{background:#d45a4a}
.muted{color:#777}#search{width:24em;padding:3px}
"""

BROWSER_JS = r"""
(function(){
  const data = window.FEATURES; let key = "freq", desc = true;
  const body = document.querySelector("#latents tbody"), search = document.getElementById("search");
  function row(l){
    const tr = document.createElement("tr"); tr.className = "latent"; tr.dataset.id = l.id;
    tr.innerHTML = `<td><a href="latents/latent_${String(l.id).padStart(5,"0")}.html">${l.id}</a></td>`
      + `<td>${(100*l.freq).toFixed(2)}%</td><td>${l.mean_act.toFixed(3)}</td>`
      + `<td>${l.promoted.join(", ")}</td><td>${l.top_class || ""}</td>`;
    return tr;
  }
  function render(){
    const q = search.value.trim().toLowerCase();
    const rows = data.latents.filter(l => !q || (/^\d+$/.test(q) ? String(l.id) === q : l.text.includes(q)));
    rows.sort((a,b) => { const x = a[key], y = b[key];
      const c = (typeof x === "string") ? x.localeCompare(y) : x - y; return desc ? -c : c; });
    body.replaceChildren(...rows.map(row));
    document.getElementById("shown").textContent = rows.length;
    document.querySelectorAll("th[data-key]").forEach(th => {
      th.classList.remove("sorted-asc","sorted-desc");
      if (th.dataset.key === key) th.classList.add(desc ? "sorted-desc" : "sorted-asc"); });
  }
  document.querySelectorAll("th[data-key]").forEach(th => th.addEventListener("click", () => {
    if (key === th.dataset.key) desc = !desc; else { key = th.dataset.key; desc = th.dataset.key !== "id"; }
    render(); }));
  search.addEventListener("input", render);
  render();
})();
"""


def page(title: str, body: str, depth: int = 0) -> str:
    css = "../" * depth + "style.css"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<link rel="stylesheet" href="{css}"></head>\n<body>\n{body}\n</body></html>\n')


def notes_html(notes: Sequence[str]) -> str:
    return "".join(f'<p class="note">{escape(n)}</p>' for n in notes)


def index_page(summary: dict[str, Any], dead: Sequence[int], notes: Sequence[str]) -> str:
    info = " &middot; ".join(f"{escape(k)}: <b>{escape(str(v))}</b>" for k, v in summary.items())
    dead_html = (f'<h2>Dead latents ({len(dead)})</h2><p class="muted">Never active on the cache\'s images; '
                 f'no pages.</p><p id="dead">{" ".join(str(int(d)) for d in dead)}</p>') if len(dead) else \
        '<h2>Dead latents (0)</h2><p id="dead"></p>'
    body = (f"<h1>SAE feature browser</h1><p>{info}</p>{notes_html(notes)}"
            '<p><input id="search" type="search" placeholder="search a latent id or a class name">'
            ' <span class="muted"><span id="shown"></span> latents shown</span></p>'
            '<table id="latents"><thead><tr><th data-key="id">latent</th><th data-key="freq">firing frequency</th>'
            '<th data-key="mean_act">mean activation (when active)</th><th data-key="promoted_text">promoted classes '
            '(decoder direction)</th><th data-key="top_class">top class (mean activation)</th></tr></thead>'
            f"<tbody></tbody></table>{dead_html}"
            '<script src="index_data.js"></script><script src="browser.js"></script>')
    return page("SAE feature browser", body)


def index_data_js(latents: list[dict[str, Any]]) -> str:
    return "window.FEATURES = " + json.dumps({"latents": latents}, separators=(",", ":")) + ";\n"


def histogram_svg(counts: np.ndarray, edges: np.ndarray, width: int = 360, height: int = 110) -> str:
    """Bars of the nonzero activations' histogram, with the axis range written under it."""
    if counts.sum() == 0:
        return '<p class="muted">no activations</p>'
    top = counts.max()
    bw = width / len(counts)
    bars = "".join(
        f'<rect class="hist-bar" x="{i * bw:.1f}" y="{height - 14 - h:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{h:.1f}" fill="#4a7fd4"><title>{edges[i]:.3g}-{edges[i + 1]:.3g}: {int(c)}</title></rect>'
        for i, c in enumerate(counts) for h in [(height - 16) * c / top])
    return (f'<svg id="histogram" width="{width}" height="{height}" role="img">{bars}'
            f'<text x="0" y="{height - 2}" font-size="10">{edges[0]:.3g}</text>'
            f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text></svg>')


def image_tile(src: str | None, caption: str, heat: np.ndarray | None, grid: tuple[int, int], px: int) -> str:
    """A top image with its patch heatmap as a translucent grid over it (opacity = value / max)."""
    overlay = ""
    if heat is not None and heat.size:
        peak = float(heat.max())
        norm = heat / peak if peak > 0 else heat * 0
        cells = "".join(f'<div class="cell" style="opacity:{0.6 * v:.2f}"></div>' for v in norm.ravel())
        overlay = (f'<div class="heat" style="width:{px}px;height:{px}px;grid-template-columns:repeat({grid[1]},1fr);'
                   f'grid-template-rows:repeat({grid[0]},1fr)">{cells}</div>')
    img = f'<img src="{escape(src)}" width="{px}" height="{px}" alt="">' if src else \
        f'<div style="width:{px}px;height:{px}px;background:#eee"></div>'
    return f'<div class="top-image"><div style="position:relative">{img}{overlay}</div>{escape(caption)}</div>'


def bar_rows(rows: Sequence[tuple[str, float, str]], scale: float, table_id: str) -> str:
    """A table of (label, value, text) with a bar proportional to |value| / scale."""
    out = []
    for label, value, text in rows:
        w = 0 if scale <= 0 else 160 * abs(value) / scale
        cls = "bar neg" if value < 0 else "bar"
        out.append(f'<tr><td>{escape(label)}</td><td><span class="{cls}" style="width:{w:.0f}px"></span></td>'
                   f"<td>{escape(text)}</td></tr>")
    return f'<table id="{table_id}">{"".join(out)}</table>'
