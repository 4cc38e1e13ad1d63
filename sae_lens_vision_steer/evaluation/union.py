"""Evaluation of one SAE on several data sets, each separately (its own class names, templates and
zero-shot classifier), with one combined summary: the per-data-set side of the union (`union.py`).

    members = load_union_dataset("cifar100,cub200,tiny-imagenet", split="val", transform=model.preprocess).members
    res = evaluate_members(model, members, sae, ["zeroshot", "vs2"], fvu_threshold=tau)
    res.results["cub200"]       # an `EvaluationResult`, as `evaluation.evaluate` gives for one data set
    print(res.table())          # method x data set: top-1 and its change against zero-shot
    res.save("runs/union_eval") # <member>/results.json (+ .md, plots) and summary.json, summary.md, summary_delta.png

Each member's `results.json` is the one `vision-steer eval` writes for that data set alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from ..core.errors import UsageError
from ..core.fileio import write_bytes_atomic, write_json_atomic, write_text_atomic
from ..core.names import slug
from ..data.base import ImageDataset
from .results import EvaluationResult, json_default

SUMMARY_FILE = "summary.json"


def member_folder_name(dataset_id: str) -> str:
    """A member's subfolder: `cifar100`, `owner_repo`, `imagefolder_photos`."""
    return slug(dataset_id, "dataset")  # a safe folder name: never `..` or a dot-file


@dataclass
class UnionEvaluation:
    results: dict[str, EvaluationResult]  # member data set id -> its results, in member order

    @property
    def datasets(self) -> list[str]:
        return list(self.results)

    def summary(self) -> dict[str, Any]:
        """`{"datasets", "n_images", "methods": {method: {dataset: {top1, delta_top1, coverage}, "mean": ...}}}`;
        `mean` averages over the data sets that have the method (unweighted, as the paper's tables)."""
        methods: dict[str, dict[str, Any]] = {}
        for name, res in self.results.items():
            for label, s in res.methods.items():
                methods.setdefault(label, {})[name] = {"top1": s.top1, "delta_top1": s.delta_top1,
                                                       "coverage": s.coverage}
        for label, per in methods.items():
            rows = list(per.values())
            per["mean"] = {k: float(np.mean([r[k] for r in rows])) for k in ("top1", "delta_top1", "coverage")}
        return {"datasets": self.datasets, "n_images": {n: r.config.get("n_images") for n, r in self.results.items()},
                "methods": methods,
                "folders": {n: member_folder_name(n) for n in self.datasets}}

    def table(self, fmt: Literal["text", "markdown"] = "text") -> str:
        """One row per method, one column per data set (top-1, change against zero-shot), and the mean."""
        summ = self.summary()
        cols = [*self.datasets, "mean"]
        header = ["method", *cols]
        body = []
        for label, per in summ["methods"].items():
            cells = [f"{per[c]['top1']:.2f} ({per[c]['delta_top1']:+.2f})" if c in per else "—" for c in cols]
            body.append([label, *cells])
        if fmt == "markdown":
            lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(cols)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        def row(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        return "\n".join([row(header), "  ".join("-" * w for w in widths)] + [row(r) for r in body])

    def save(self, out_dir: Any, plots: bool = True) -> dict[str, Path]:
        """Each member's results in `<out>/<member>/` (results.json, results.md, per-class plots) and the
        combined `summary.json`, `summary.md` and `summary_delta.png` in `<out>`. `out_dir` may be an
        `outputs.OutputFolder`: the summary files are recorded there."""
        from ..core.outputs import OutputFolder

        folder = out_dir if isinstance(out_dir, OutputFolder) else None
        out = folder.path if folder is not None else Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for name, res in self.results.items():
            for key, path in res.save(out / member_folder_name(name), plots=plots).items():
                written[f"{name}:{key}"] = path
        top = {"summary": write_json_atomic(out / SUMMARY_FILE, self.summary(), indent=2, default=json_default),
               "summary_table": write_text_atomic(out / "summary.md", self.table("markdown") + "\n")}
        if plots:
            top["summary_plot"] = plot_summary(self, out / "summary_delta.png")
        if folder is not None:
            for p in top.values():
                folder.add(p)
        return {**written, **top}


def plot_summary(res: UnionEvaluation, path: Path) -> Path:
    """Grouped bars: each method's change in top-1 against zero-shot, per data set."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res.summary()
    labels = [m for m in summ["methods"] if m != "zeroshot"]
    names = res.datasets
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) * max(len(labels), 1) ** 0.5 + 2), 3.2))
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        vals = [summ["methods"][label].get(n, {}).get("delta_top1", np.nan) for n in names]
        ax.bar(np.arange(len(names)) + (i - (len(labels) - 1) / 2) * width, vals, width, label=label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(names)), names, rotation=15)
    ax.set_ylabel("Δ top-1 vs zero-shot (points)")
    if labels:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def evaluate_members(model: Any, members: Sequence[ImageDataset], sae: Any, methods: Sequence[Any],
                     templates: str | Sequence[str] | None = None, config: dict[str, Any] | None = None,
                     show_progress: bool = True, **evaluate_kwargs: Any) -> UnionEvaluation:
    """`evaluation.evaluate` on each member data set in turn (each with its own class names, and its own
    templates unless `templates` is given); the other arguments (`lam`, `gamma`, `fvu_threshold`,
    `gate_methods`, `hook_name`, `options`, `text_cache`, ...) are shared."""
    from . import evaluate

    if not members:
        raise UsageError("no data sets to evaluate")
    names = [m.dataset_id for m in members]
    if len(set(names)) < len(names):
        raise UsageError(f"a data set appears twice among {names}")
    _check_pool(methods, (evaluate_kwargs.get("options") or {}).get("pool_cache"))
    results = {}
    for i, data in enumerate(members):
        if show_progress:
            print(f"data set {i + 1}/{len(members)}: {data.dataset_id}/{data.split}, {len(data)} images")
        results[data.dataset_id] = evaluate(model, data, sae, list(methods), templates=templates,
                                            show_progress=show_progress,
                                            config={**(config or {}), "union": names}, **evaluate_kwargs)
    return UnionEvaluation(results)


def _check_pool(methods: Sequence[Any], pool_cache: Any) -> None:
    """VS2++ and the retrieval baselines read the pool's images and labels: a union pool would hand a
    member's queries neighbours (and labels) of the other data sets. Refused."""
    if not pool_cache or not (Path(pool_cache) / "metadata.json").is_file():
        return
    import json

    req = json.loads((Path(pool_cache) / "metadata.json").read_text()).get("request", {})
    if not req.get("members"):
        return
    from .registry import get_method

    names = [getattr(m, "method", m) for m in methods]
    readers = [n for n in names if get_method(n).reads_pool]  # VS2++, its baselines, knn_vote, linear_probe
    if readers:
        raise UsageError(f"{', '.join(readers)} retrieve from the pool cache {pool_cache}, a union of data sets "
                         f"({req.get('dataset')}) whose images and labels belong to different data sets; evaluate "
                         "them per data set with --pool-cache of that data set's own training cache")
