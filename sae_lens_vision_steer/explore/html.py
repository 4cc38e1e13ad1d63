"""The browser's HTML: an index page (every latent, sortable and searchable, rendered by `browser.js`
from `index_data.js`) and one static page per live latent. Plain files that open from disk: data is
loaded with `<script>` tags, never `fetch`, so `file://` works without a server.

Safety: every page carries a Content-Security-Policy that allows scripts, styles and images from the
folder's own files only (no inline script, no inline style, nothing from the network). Strings from
data (class names, notes, paths) are HTML-escaped on the static pages and set with `textContent` by
`browser.js`, never with `innerHTML`; class names sit in `<bdi>` so a right-to-left override in one
name cannot reorder its neighbours. Sizes and opacities are SVG attributes, not inline styles."""

from __future__ import annotations

import json
from html import escape
from typing import Any, Sequence

import numpy as np

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'")

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
th[data-key]{cursor:pointer;user-select:none}th[data-key]:hover{background:#eef}
th.sorted-desc::after{content:" \\25BC"}th.sorted-asc::after{content:" \\25B2"}
.note{background:#fff6d5;padding:4px 8px;margin:4px 0;border-left:3px solid #e0b000}
.grid{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.top-image{margin:0;font-size:11px;text-align:center;max-width:160px;overflow-wrap:anywhere}
.thumb{position:relative;width:max-content;margin:0 auto}.thumb img,.thumb .noimg{display:block}
.heat{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}.heat rect{fill:#ff2a00}
.noimg rect{fill:#eee}.bar{vertical-align:middle}.bar .pos{fill:#4a7fd4}.bar .neg{fill:#d45a4a}
.bar .band{fill:#000;fill-opacity:.18}.hist-bar{fill:#4a7fd4}.axis{stroke:#555;stroke-width:1}
.tick{font-size:10px;fill:#333}nav a{margin-right:1.2em}
.muted{color:#777}#search{width:24em;padding:3px}
"""

BROWSER_JS = r"""
(function(){
  "use strict";
  const data = window.FEATURES; let key = "freq", desc = true;
  const body = document.querySelector("#latents tbody"), search = document.getElementById("search");
  function cell(tr, child){ const td = document.createElement("td"); td.append(child); tr.append(td); return td; }
  function names(list){  // class names as text, each isolated (<bdi>) so one name cannot reorder the others
    const span = document.createElement("span");
    list.forEach((n, i) => { if (i) span.append(", "); const b = document.createElement("bdi");
      b.textContent = String(n); span.append(b); });
    return span;
  }
  function row(l){
    const id = Number(l.id), tr = document.createElement("tr"); tr.className = "latent"; tr.dataset.id = id;
    const a = document.createElement("a"); a.href = "latents/latent_" + String(id).padStart(5, "0") + ".html";
    a.textContent = String(id); cell(tr, a);
    cell(tr, (100 * l.freq).toFixed(2) + "%"); cell(tr, Number(l.mean_act).toFixed(3));
    cell(tr, names(l.promoted)); cell(tr, names(l.top_class ? [l.top_class] : []));
    return tr;
  }
  function render(){
    const q = search.value.trim().toLowerCase();
    const rows = data.latents.filter(l => !q || (/^\d+$/.test(q) ? String(l.id) === q : l.text.includes(q)));
    rows.sort((a,b) => { const x = a[key], y = b[key];
      const c = (typeof x === "string") ? x.localeCompare(y) : x - y; return desc ? -c : c; });
    body.replaceChildren(...rows.map(row));
    document.getElementById("shown").textContent = String(rows.length);
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


def display_text(text: Any) -> str:
    """A string safe to encode as UTF-8: a name read from a non-UTF-8 file name (surrogate escapes)
    shows its undecodable bytes as U+FFFD instead of failing the write."""
    s = str(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates outside the escape range
        return s.encode("utf-8", "replace").decode("utf-8")


def esc(text: Any) -> str:
    return escape(display_text(text))


def name_html(name: str) -> str:
    """A class name on a static page: escaped and bidi-isolated."""
    return f"<bdi>{esc(name)}</bdi>"


def page(title: str, body: str, depth: int = 0) -> str:
    css = "../" * depth + "style.css"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{esc(title)}</title>'
            f'<link rel="stylesheet" href="{css}"></head>\n<body>\n{body}\n</body></html>\n')


def notes_html(notes: Sequence[str]) -> str:
    return "".join(f'<p class="note">{esc(n)}</p>' for n in notes)


def index_page(summary: dict[str, Any], dead: Sequence[int], notes: Sequence[str]) -> str:
    info = " &middot; ".join(f"{esc(k)}: <b>{esc(v)}</b>" for k, v in summary.items())
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
    """The index's data as a script (JSON is a JS literal; ensure_ascii escapes U+2028/9 and surrogates)."""
    return "window.FEATURES = " + json.dumps({"latents": latents}, separators=(",", ":"), ensure_ascii=True) + ";\n"


def _nice_ticks(top: float, n: int = 4) -> list[float]:
    """Round tick values from 0 to at least `top` (1, 2, 2.5 or 5 times a power of ten apart)."""
    if top <= 0:
        return [0.0]
    raw = top / n
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(np.ceil(top / step - 1e-9)) + 1)]


def histogram_svg(counts: np.ndarray, edges: np.ndarray, width: int = 420, height: int = 160) -> str:
    """Bars of the nonzero activations' histogram, with a y-axis (images) and an x-axis (activation)."""
    if counts.sum() == 0:
        return '<p class="muted">no activations</p>'
    left, bottom, top_pad, right = 44, 32, 8, 12
    pw, ph = width - left - right, height - bottom - top_pad
    yticks = _nice_ticks(float(counts.max()))
    ymax = yticks[-1]
    lo, hi = float(edges[0]), float(edges[-1])
    span = (hi - lo) or 1.0
    bw = pw / len(counts)
    y0 = top_pad + ph
    bars = "".join(
        f'<rect class="hist-bar" x="{left + i * bw:.1f}" y="{y0 - h:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{h:.1f}"><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {int(c)} images</title></rect>'
        for i, c in enumerate(counts) for h in [ph * c / ymax])
    ys = "".join(f'<line class="axis" x1="{left - 4}" x2="{left}" y1="{y0 - ph * t / ymax:.1f}" '
                 f'y2="{y0 - ph * t / ymax:.1f}"/><text class="tick y-tick" x="{left - 6}" '
                 f'y="{y0 - ph * t / ymax + 3:.1f}" text-anchor="end">{t:g}</text>' for t in yticks)
    xticks = [t for t in _nice_ticks(hi) if lo <= t <= hi + 1e-12]
    xs = "".join(f'<line class="axis" x1="{left + pw * (t - lo) / span:.1f}" x2="{left + pw * (t - lo) / span:.1f}" '
                 f'y1="{y0}" y2="{y0 + 4}"/><text class="tick x-tick" x="{left + pw * (t - lo) / span:.1f}" '
                 f'y="{y0 + 14}" text-anchor="middle">{t:.3g}</text>' for t in xticks)
    return (f'<svg id="histogram" width="{width}" height="{height}" role="img" '
            f'aria-label="histogram of the activation over the images where the latent fires">{bars}'
            f'<line class="axis" x1="{left}" x2="{left}" y1="{top_pad}" y2="{y0}"/>'
            f'<line class="axis" x1="{left}" x2="{left + pw}" y1="{y0}" y2="{y0}"/>{ys}{xs}'
            f'<text class="tick" x="{left + pw / 2:.0f}" y="{height - 2}" text-anchor="middle">activation</text>'
            f'<text class="tick" x="10" y="{top_pad + ph / 2:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 10 {top_pad + ph / 2:.0f})">images</text></svg>')


def image_tile(src: str | None, caption_html: str, heat: np.ndarray | None, grid: tuple[int, int], px: int) -> str:
    """A top image with its patch heatmap as a translucent grid over it (opacity = value / max).

    The image and the overlay share one box (`.thumb`, as large as the image), so the overlay sits
    on the image whatever the caption's width. `caption_html` must already be escaped."""
    overlay = ""
    if heat is not None and heat.size:
        peak = float(heat.max())
        norm = heat.reshape(grid) / peak if peak > 0 else heat.reshape(grid) * 0
        cells = "".join(f'<rect class="cell" x="{c}" y="{r}" width="1" height="1" fill-opacity="{0.6 * v:.2f}"/>'
                        for (r, c), v in np.ndenumerate(norm))
        overlay = (f'<svg class="heat" viewBox="0 0 {grid[1]} {grid[0]}" preserveAspectRatio="none" '
                   f'width="{px}" height="{px}">{cells}</svg>')
    img = f'<img src="{esc(src)}" width="{px}" height="{px}" alt="">' if src else \
        f'<svg class="noimg" width="{px}" height="{px}"><rect width="{px}" height="{px}"/></svg>'
    return (f'<figure class="top-image"><div class="thumb">{img}{overlay}</div>'
            f'<figcaption>{caption_html}</figcaption></figure>')


def bar_svg(value: float, scale: float, band: float | None = None, width: int = 160) -> str:
    """A bar of length |value| / scale, with an optional noise band of +-`band` around its end."""
    w = 0.0 if scale <= 0 else width * abs(value) / scale
    cls = "neg" if value < 0 else "pos"
    out = f'<rect class="{cls}" width="{min(w, width):.1f}" height="10"/>'
    if band is not None and scale > 0 and np.isfinite(band):
        a = max(0.0, abs(value) - band) * width / scale
        b = min(width, (abs(value) + band) * width / scale)
        out += f'<rect class="band" x="{a:.1f}" width="{max(b - a, 0.5):.1f}" y="2" height="6"/>'
    return f'<svg class="bar" width="{width}" height="10">{out}</svg>'


def bar_rows(rows: Sequence[tuple[str, float, str]], scale: float, table_id: str, *,
             bands: Sequence[float] | None = None, counts: Sequence[int] | None = None,
             header: Sequence[str] | None = None) -> str:
    """A table of (class name, value, text) with a bar proportional to |value| / scale, and optionally
    each row's noise band (same units as value) and count of images."""
    out = []
    if header:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for i, (label, value, text) in enumerate(rows):
        n = f'<td class="count">{int(counts[i])}</td>' if counts is not None else ""
        bar = bar_svg(value, scale, None if bands is None else float(bands[i]))
        out.append(f"<tr><td>{name_html(label)}</td>{n}<td>{bar}</td><td>{esc(text)}</td></tr>")
    return f'<table id="{table_id}">{"".join(out)}</table>'
