"""Paper-style tables of a reproduce run: our number, the paper's, and the difference, per entry.

The paper's numbers are facts in `resources/paper_numbers.json`, each naming its table, row, data set,
backbone and metric; `paper_value(entry)` looks one up. Tables are written as Markdown (`tables.md`),
JSON (`tables.json`) and, where a picture helps, PNG (ours vs the paper per table; a heatmap for
lam x gamma). A failed cell shows as `failed` with its error; a cell not run yet as `-`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..core.fileio import write_bytes_atomic, write_json_atomic
from .grid import Entry, Grid

TITLES = {
    "headline": "Table 1: top-1 of the methods (main data sets, ViT-B/32 and ViT-B/16)",
    "sae_fvu": "SAE FVU (held-out images)", "vitl14": "ViT-L/14 (v3): zero-shot, VS2 and the gain",
    "ood": "Out-of-distribution data sets (v3), VS2 with the generalized SAE",
    "generalized": "The generalized SAE (v3): trained on the union, gate on CIFAR-100 + Tiny-ImageNet",
    "tta": "Table 1(b) (v3): test-time adaptation, ViT-B/32, each row with the paper's prompt protocol",
    "lam_gamma": "VS2 lambda x gamma", "layers": "Steering the last 1/2/3 layers", "gate": "FVU gate quantile",
    "pass_waux": "PASS w_aux trade-off", "width_k": "SAE width and k (Table 8)", "vs2pp_n": "VS2++ neighbours N",
    "reviewers": "The reviewers' baselines: the neighbours' label vote and a linear probe, next to VS2++",
    "data_fraction": "VS2's gain and the SAE's FVU against the amount of SAE training data",
}
REFERENCE_ROW = "open_clip zero-shot (reference)"
PROMPTS = {"single": "single", "ensemble": "ensemble", "none": "none"}


def declared_prompts(cell: Any) -> str:
    """A cell's prompt protocol before it has run: its own `templates`, else its method's, else the ensemble."""
    spec = cell.templates
    if spec is None:
        from ..core.errors import UnknownNameError
        from ..evaluation import get_method

        try:
            spec = get_method(cell.method).templates
        except UnknownNameError:
            spec = None
    return PROMPTS.get(spec or "ensemble", spec or "ensemble")


def declared_labels(cell: Any) -> str | None:
    from ..core.errors import UnknownNameError
    from ..evaluation import get_method

    try:
        m = get_method(cell.method)
    except UnknownNameError:
        return None
    return "evaluation labels: an oracle upper bound" if m.uses_eval_labels else m.uses_labels


@lru_cache(maxsize=1)
def paper_numbers() -> list[dict[str, Any]]:
    text = resources.files("sae_lens_vision_steer").joinpath("resources/paper_numbers.json").read_text()
    return json.loads(text)["facts"]


def paper_value(entry: Entry) -> dict[str, Any] | None:
    """The paper's fact for this entry (its table, row, data set, backbone, metric), or None."""
    metric = {"top1": "top1", "fvu": "fvu", "gain": "gain_range"}.get(entry.metric, entry.metric)
    for f in paper_numbers():
        if (f["table"], f["row"], f["dataset"], f["backbone"], f["metric"]) == (
                entry.table, entry.row, entry.cell.dataset, entry.cell.backbone, metric):
            return f
    return None


@dataclass
class TableRow:
    table: str
    row: str
    column: str
    metric: str
    status: str  # done | failed | pending
    ours: float | None
    paper: Any
    diff: float | None
    error: str | None
    paper_table: str | None
    prompts: str = ""  # the row's prompt protocol ("single", "imagenet (80)", "ensemble", "none")
    labels: str | None = None  # labels the row reads besides none (an oracle's, a probe's training labels)
    source: str | None = None  # a reference row's source


def reference_value(dataset: str, backbone: str) -> dict[str, Any] | None:
    """open_clip's published zero-shot top-1 for the same weights and data set (CLIP-benchmark protocol)."""
    return next((f for f in paper_numbers() if f["table"] == "reference" and f["dataset"] == dataset
                 and f["backbone"] == backbone), None)


def build_rows(grid: Grid, states: dict[Any, dict[str, Any] | None]) -> list[TableRow]:
    rows = []
    for e in grid.entries:
        st = states.get(e.cell) or {}
        status = st.get("status", "pending")
        ours = None
        if status == "done":
            ours = {"top1": st.get("top1"), "gain": st.get("gain"), "fvu": st.get("fvu")}.get(e.metric)
        fact = paper_value(e)
        paper = fact["value"] if fact else None
        diff = ours - paper if isinstance(paper, (int, float)) and ours is not None else None
        prompts = st.get("prompts") if status == "done" and st.get("prompts") else declared_prompts(e.cell)
        labels = declared_labels(e.cell) or st.get("labels")  # the method's registration says what it reads
        rows.append(TableRow(e.table, e.row, e.column, e.metric, status, ours, paper, diff, st.get("error"),
                             fact["paper_table"] if fact else None, prompts, labels))
    seen = set()  # open_clip's reference row under every zero-shot row that has one
    for e in grid.entries:
        ref = reference_value(e.cell.dataset, e.cell.backbone) if e.cell.method == "zeroshot" else None
        if ref is not None and (e.table, e.column) not in seen:
            seen.add((e.table, e.column))
            rows.append(TableRow(e.table, REFERENCE_ROW, e.column, "top1", "reference", None, ref["value"], None, None,
                                 None, ref["protocol"], None, ref["source"]))
    for table in {r.table for r in rows}:  # Table 8: the spread over the whole width x k grid
        if table == "width_k":
            done = [r.ours for r in rows if r.table == table and r.ours is not None]
            pending = any(r.status != "done" for r in rows if r.table == table)
            fact = next((f for f in paper_numbers() if f["table"] == "width_k"), None)
            spread = max(done) - min(done) if done and not pending else None
            rows.append(TableRow(table, "spread", "cifar100/ViT-B-32", "spread", "done" if spread is not None else
                                 "pending", spread, f"< {fact['value']:g}" if fact else None, None, None,
                                 fact["paper_table"] if fact else None))
    return rows


def _fmt(v: Any, metric: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return f"+{v[0]:g} .. +{v[1]:g}"
    if isinstance(v, str):
        return v
    if metric == "fvu":
        return f"{v:.3f}"
    return f"{v:+.2f}" if metric == "gain" else f"{v:.2f}"


def markdown(rows: list[TableRow]) -> str:
    out = ["# Reproduction of the paper's tables", "",
           "Ours next to the paper's number (resources/paper_numbers.json) and the difference (ours - paper). "
           "`failed` cells give their error; rerun the same command to retry only those.", ""]
    for table in dict.fromkeys(r.table for r in rows):
        sel = [r for r in rows if r.table == table]
        out += [f"## {TITLES.get(table, table)}", ""]
        src = next((r.paper_table for r in sel if r.paper_table), None)
        if src:
            out += [f"Paper: {src}.", ""]
        out += ["| row | column | prompts | metric | ours | paper | ours - paper |", "|---|---|---|---|---|---|---|"]
        for r in sel:
            ours = _fmt(r.ours, r.metric) if r.status == "done" else (
                f"failed: {r.error}" if r.status == "failed" else "-")
            diff = _fmt(r.diff, "gain" if r.metric in ("top1", "gain") else r.metric) if r.diff is not None else (
                _inside(r) if r.metric == "gain" else "")
            name = r.row + (f" (uses {r.labels})" if r.labels else "")
            out.append(f"| {name} | {r.column} | {r.prompts or '-'} | {r.metric} | {ours.replace('|', '/')} | "
                       f"{_fmt(r.paper, r.metric)} | {diff} |")
        refs = sorted({r.source for r in sel if r.source})
        if refs:
            out += ["", f"`{REFERENCE_ROW}`: a published number, not computed here: "
                    + "; ".join(refs) + ". The gap to our single-prompt zero-shot row is the prompt protocol."]
        out.append("")
    return "\n".join(out)


def _inside(r: TableRow) -> str:
    if isinstance(r.paper, list) and r.ours is not None:
        return "inside the paper's range" if r.paper[0] <= r.ours <= r.paper[1] else "outside the paper's range"
    return ""


def plot_tables(rows: list[TableRow], out_dir: Path) -> list[Path]:
    """One bar chart per table with numbers of ours and the paper's (top-1 entries), and a lam x gamma
    heatmap when that table has results."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for table in dict.fromkeys(r.table for r in rows):
        sel = [r for r in rows if r.table == table and r.metric == "top1" and r.ours is not None]
        if table == "data_fraction":
            sel = [r for r in rows if r.table == table and r.ours is not None]
        if not sel:
            continue
        if table == "data_fraction":
            fig = _fraction_plot(plt, sel)
        elif table == "lam_gamma":
            fig = _heatmap(plt, sel)
        else:
            fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(sel) + 2), 3.5))
            x = range(len(sel))
            ax.bar([i - 0.2 for i in x], [r.ours for r in sel], 0.4, label="ours")
            ax.bar([i + 0.2 for i in x], [r.paper if isinstance(r.paper, (int, float)) else math.nan for r in sel],
                   0.4, label="paper")
            ax.set_xticks(list(x), [f"{r.row}\n{r.column}" for r in sel], rotation=90, fontsize=6)
            ax.set_ylabel("top-1 (%)")
            ax.set_title(TITLES.get(table, table), fontsize=8)
            ax.legend(fontsize=7)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(write_bytes_atomic(out_dir / f"table_{table}.png", buf.getvalue()))
    return written


def _heatmap(plt, sel: list[TableRow]):
    import numpy as np

    cells = {}
    for r in sel:
        parts = dict(p.split("=") for p in r.row.split(","))
        cells[(float(parts["gamma"]), float(parts["lam"]))] = r.ours
    gammas, lams = sorted({g for g, _ in cells}), sorted({lam for _, lam in cells})
    grid = np.array([[cells.get((g, lam), np.nan) for lam in lams] for g in gammas])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    im = ax.imshow(grid, origin="lower", cmap="viridis")
    ax.set_xticks(range(len(lams)), [f"{v:g}" for v in lams])
    ax.set_yticks(range(len(gammas)), [f"{v:g}" for v in gammas])
    ax.set_xlabel("lambda")
    ax.set_ylabel("gamma")
    ax.set_title("VS2 top-1 (%) (paper's best: lam 2.1, gamma 1.5)", fontsize=8)
    fig.colorbar(im, ax=ax)
    return fig


def _fraction_plot(plt, sel: list[TableRow]):
    """VS2's gain (left axis) and the SAE's FVU (right axis) against the fraction of training data."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric, axis, style in (("gain", ax, "o-"), ("fvu", ax.twinx(), "s--")):
        pts = sorted((float(r.row.rstrip("%")), r.ours) for r in sel if r.metric == metric)
        if pts:
            axis.plot([p[0] for p in pts], [p[1] for p in pts], style, color="C0" if metric == "gain" else "C1",
                      label=metric)
        axis.set_ylabel("VS2 top-1 minus zero-shot (points)" if metric == "gain" else "SAE held-out FVU")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("SAE training data (% of the training split)")
    ax.set_title(TITLES["data_fraction"], fontsize=8)
    return fig


def write_tables(grid: Grid, states: dict[Any, dict[str, Any] | None], out_dir: str | Path,
                 plots: bool = True) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(grid, states)
    written = {"md": write_bytes_atomic(out / "tables.md", markdown(rows).encode()),
               "json": write_json_atomic(out / "tables.json", [r.__dict__ for r in rows], indent=1)}
    if plots:
        for p in plot_tables(rows, out):
            written[f"plot:{p.stem}"] = p
    return written


__all__ = ["REFERENCE_ROW", "TableRow", "build_rows", "declared_labels", "declared_prompts", "markdown",
           "paper_numbers", "paper_value", "reference_value", "write_tables"]
