"""Evaluation results: per-method scores, the table, `results.json`, and the plots.

`EvaluationResult.save` writes `results.json`, `results.md` and one per-class gains/losses PNG per
method, atomically; `plot_sweep_heatmap` draws a lam x gamma sweep.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

import numpy as np

from ..core.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from ..core.outputs import OutputFolder

RESULTS_FILE = "results.json"


def json_default(o: Any) -> Any:
    """JSON for numpy arrays and scalars and paths (NaN becomes null)."""
    if isinstance(o, np.ndarray):
        return [None if (isinstance(v, float) and v != v) else v for v in o.tolist()]
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (numpy arrays and scalars and paths allowed), creating
    the folder; a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, obj, indent=2, default=json_default)


@dataclass
class MethodScores:
    top1: float
    top5: float
    mean_per_class: float
    delta_top1: float
    coverage: float
    per_class_acc: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    predictions: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    templates: str | list[str] | None = None  # the row's prompt protocol: a set name, the list, or "none"
    prompts: str = ""  # its short label for tables ("single", "imagenet (80)", ...)
    n_templates: int | None = None
    zeroshot_same_prompts: float | None = None  # zero-shot top-1 of the same pass under the row's prompts

    @property
    def delta_same_prompts(self) -> float | None:
        """Top-1 minus zero-shot with the same prompts (None for a row without prompts)."""
        if self.zeroshot_same_prompts is None or not self.n_templates:
            return None
        return self.top1 - self.zeroshot_same_prompts

    def to_json(self) -> dict[str, Any]:
        protocol = {} if self.templates is None else {
            "templates": self.templates, "prompts": self.prompts, "n_templates": self.n_templates,
            "zeroshot_same_prompts_top1": self.zeroshot_same_prompts,
            "delta_top1_same_prompts": self.delta_same_prompts}
        return {"top1": self.top1, "top5": self.top5, "mean_per_class": self.mean_per_class,
                "delta_top1": self.delta_top1, "coverage": self.coverage,
                "per_class_acc": _nan_to_none(self.per_class_acc), "settings": self.settings,
                "seconds": self.seconds, **protocol, **({"info": self.info} if self.info else {})}


@dataclass
class EvaluationResult:
    config: dict[str, Any]
    classnames: list[str]
    methods: dict[str, MethodScores]
    timing: dict[str, Any]
    labels: np.ndarray | None = None

    @property
    def zeroshot(self) -> MethodScores:
        return self.methods["zeroshot"]

    def table(self, fmt: Literal["text", "markdown"] = "text") -> str:
        return format_table(self.methods, fmt)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "methods": {k: v.to_json() for k, v in self.methods.items()},
                "classnames": self.classnames, "timing": self.timing}

    def save(self, out_dir: "str | Path | OutputFolder", plots: bool = True, n_classes_plot: int = 15) -> dict[str, Path]:
        """Write `results.json`, `results.md` and one per-class gains/losses PNG per method.

        `out_dir` may be an `outputs.OutputFolder` (from `prepare_output_dir`): the files are then
        recorded there, and the caller's `finish()` removes the earlier run's stale ones."""
        from ..core.outputs import OutputFolder

        folder = out_dir if isinstance(out_dir, OutputFolder) else None
        out = folder.path if folder is not None else Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {"json": write_json_atomic(out / RESULTS_FILE, self.to_json(), indent=2, default=json_default)}
        from . import fvu_harm

        harm = {label: s.info["fvu_harm"] for label, s in self.methods.items() if s.info.get("fvu_harm")}
        text = self.table("markdown") + "".join("\n\n" + fvu_harm.markdown(k, a) for k, a in harm.items())
        written["table"] = write_text_atomic(out / "results.md", text + "\n")
        if plots:
            for label in self.methods:
                if label != "zeroshot":
                    path = out / f"per_class_{_safe_name(label)}.png"
                    written[f"plot:{label}"] = plot_per_class_changes(self, label, path, n_classes_plot)
            for label, a in harm.items():
                written[f"plot:fvu_deciles_{label}"] = fvu_harm.plot(label, a, out / f"fvu_deciles_{_safe_name(label)}.png")
        if folder is not None:
            for p in written.values():
                folder.add(p)
        return written


def row_name(label: str, s: MethodScores) -> str:
    """The row's name in tables: oracles (evaluation labels) and rows that read training labels are marked."""
    if s.info.get("oracle_upper_bound"):
        return f"{label} (oracle upper bound)"
    if s.info.get("uses_labels"):
        return f"{label} (uses {s.info['uses_labels']})"
    return label


def format_table(rows: Mapping[str, MethodScores], fmt: Literal["text", "markdown"] = "text") -> str:
    """Every row with its prompt protocol; Δtop-1 is against the run's zero-shot row, and when some row
    uses other prompts than the run's, a column gives the change against zero-shot with its own prompts."""
    header = ["method", "prompts", "top-1", "top-5", "mean/class", "Δtop-1", "coverage"]
    body = [[row_name(label, s), s.prompts or "-", f"{s.top1:.2f}", f"{s.top5:.2f}", f"{s.mean_per_class:.2f}",
             f"{s.delta_top1:+.2f}", f"{s.coverage:.3f}"] for label, s in rows.items()]
    if len({s.prompts for s in rows.values()}) > 1:
        header.insert(6, "Δ same prompts")
        for r, s in zip(body, rows.values()):
            d = s.delta_same_prompts
            r.insert(6, "-" if d is None else f"{d:+.2f}")
    if any(s.info.get("image_forwards_per_image") for s in rows.values()):  # methods with their own passes (TPT)
        header.append("img fwd/img")
        for r, s in zip(body, rows.values()):
            r.append(f"{s.info.get('image_forwards_per_image') or 1:g}")  # TPT's 64 include the original
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in body])


def _nan_to_none(a: np.ndarray) -> list[float | None]:
    return [None if (isinstance(v, float) and math.isnan(v)) else v for v in np.asarray(a, dtype=float).tolist()]


def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label).strip("_")


@dataclass
class SweepResult:
    lams: list[float]
    gammas: list[float]
    top1_GL: np.ndarray  # [n_gammas, n_lams]
    coverage_GL: np.ndarray
    zeroshot_top1: float
    selected_on: str  # "eval" or "train-holdout"
    n_images: int
    seconds: float

    @property
    def delta_GL(self) -> np.ndarray:
        return self.top1_GL - self.zeroshot_top1

    @property
    def best(self) -> tuple[float, float, float]:
        """`(lam, gamma, top1)` of the best cell (first one on ties, scanning gammas then lams)."""
        g, l = np.unravel_index(int(np.argmax(self.top1_GL)), self.top1_GL.shape)
        return self.lams[l], self.gammas[g], float(self.top1_GL[g, l])

    def to_json(self) -> dict[str, Any]:
        lam, gamma, top1 = self.best
        return {"lams": self.lams, "gammas": self.gammas, "top1": self.top1_GL.tolist(),
                "delta_top1": self.delta_GL.tolist(), "coverage": self.coverage_GL.tolist(),
                "zeroshot_top1": self.zeroshot_top1, "selected_on": self.selected_on, "n_images": self.n_images,
                "best": {"lam": lam, "gamma": gamma, "top1": top1, "delta_top1": top1 - self.zeroshot_top1},
                "seconds": self.seconds}


def _new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    # A bare `Figure` (no pyplot): no global backend switch, so notebooks keep their inline backend,
    # and nothing piles up in pyplot's figure list.
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots()


def plot_per_class_changes(result: EvaluationResult, method: str, path: str | Path, n: int = 15) -> Path:
    """Horizontal bars: the `n` classes `method` helps most and the `n` it hurts most, vs zero-shot."""
    diff = result.methods[method].per_class_acc - result.zeroshot.per_class_acc
    valid = np.flatnonzero(~np.isnan(diff))
    order = valid[np.argsort(diff[valid], kind="stable")]
    losses = [i for i in order[:n] if diff[i] < 0]
    gains = [i for i in order[::-1][:n] if diff[i] > 0]
    picked = losses + gains[::-1]  # barh draws bottom-up: biggest loss at the bottom, biggest gain on top
    fig, ax = _new_figure((8, max(2.5, 0.28 * len(picked) + 1.2)))
    if picked:
        vals = [diff[i] for i in picked]
        names = [result.classnames[i] for i in picked]
        ax.barh(range(len(vals)), vals, color=["tab:green" if v > 0 else "tab:red" for v in vals])
        ax.set_yticks(range(len(vals)), names, fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
    else:
        ax.text(0.5, 0.5, "no per-class changes", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    s = result.methods[method]
    ax.set_xlabel("per-class top-1 change vs zero-shot (points)")
    ax.set_title(f"{method}: top-1 {s.top1:.2f} ({s.delta_top1:+.2f}), coverage {s.coverage:.2f}\n"
                 f"{result.config.get('dataset')} / {result.config.get('split')}, {result.config.get('model')}",
                 fontsize=9)
    fig.tight_layout()
    return _save_fig(fig, Path(path))


def plot_sweep_heatmap(sweep: SweepResult, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of VS2 top-1 minus zero-shot over the grid, the best cell boxed."""
    from matplotlib.patches import Rectangle

    delta = sweep.delta_GL
    lim = max(float(np.abs(delta).max()), 1e-6)
    fig, ax = _new_figure((1.1 * len(sweep.lams) + 2.5, 0.8 * len(sweep.gammas) + 2))
    im = ax.imshow(delta, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
    ax.set_xticks(range(len(sweep.lams)), [f"{v:g}" for v in sweep.lams])
    ax.set_yticks(range(len(sweep.gammas)), [f"{v:g}" for v in sweep.gammas])
    ax.set_xlabel("lambda")
    ax.set_ylabel("gamma")
    for gi in range(len(sweep.gammas)):
        for li in range(len(sweep.lams)):
            dark = abs(delta[gi, li]) > 0.6 * lim  # white text on the saturated cells
            ax.text(li, gi, f"{delta[gi, li]:+.2f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    g_best, l_best = np.unravel_index(int(np.argmax(sweep.top1_GL)), sweep.top1_GL.shape)
    ax.add_patch(Rectangle((l_best - 0.5, g_best - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    fig.colorbar(im, ax=ax, label="top-1 minus zero-shot (points)")
    ax.set_title(title or f"VS2 sweep on {sweep.selected_on} ({sweep.n_images} images), "
                          f"zero-shot {sweep.zeroshot_top1:.2f}", fontsize=9)
    fig.tight_layout()
    return _save_fig(fig, Path(path))


def _save_fig(fig: Any, path: Path) -> Path:
    import io

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    return write_bytes_atomic(path, buf.getvalue())
