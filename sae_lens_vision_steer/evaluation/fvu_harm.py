"""Does the reconstruction error predict when steering hurts? (the reviewers' per-sample test of the gate)

Per evaluation image: its FVU `||x - x_rec||^2 / ||x - mu||^2` at the steered hook, and whether VS2 flipped
its prediction (against zero-shot with the same prompts) from right to wrong (harm) or from wrong to right
(help). Reported:

- Spearman's rank correlation of FVU with harm (0/1) and with the net change (+1 help, -1 harm, 0 else);
- per FVU decile (of the evaluation images): the FVU range, the harm and help rates and the net change;
- the gate the deciles suggest: the decile edge `tau` that maximises help minus harm over the images with
  FVU <= tau (all images when no edge does better), as a quantile of the evaluation images' FVU and, when a
  reference (the unlabeled training activations the gate is calibrated on) is given, as a quantile of the
  reference's FVU, the unit of `--fvu-quantile`; next to the gate used. It is chosen with the evaluation
  labels: an analysis, not a setting to report accuracy with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=r) / counts)[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho (Pearson's correlation of the average ranks); None when either side is constant."""
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def fvu_harm(fvu_N: np.ndarray, base_pred_N: np.ndarray, steered_pred_N: np.ndarray, labels_N: np.ndarray,
             used_tau: float | None = None, reference_fvu: np.ndarray | None = None, n_bins: int = 10,
             used_quantile: float | None = None) -> dict[str, Any]:
    """The analysis as a JSON-ready dict (see the module docstring)."""
    fvu = np.asarray(fvu_N, dtype=float)
    right0, right1 = np.asarray(base_pred_N) == labels_N, np.asarray(steered_pred_N) == labels_N
    harm, help_ = right0 & ~right1, ~right0 & right1
    net = help_.astype(int) - harm.astype(int)
    edges = np.quantile(fvu, np.linspace(0, 1, n_bins + 1))
    which = np.clip(np.searchsorted(edges[1:-1], fvu, side="right"), 0, n_bins - 1)
    deciles = []
    for d in range(n_bins):
        m = which == d
        n = int(m.sum())
        deciles.append({"decile": d + 1, "n": n, "fvu_low": float(fvu[m].min()) if n else None,
                        "fvu_high": float(fvu[m].max()) if n else None,
                        "harm_rate": 100.0 * harm[m].mean() if n else None,
                        "help_rate": 100.0 * help_[m].mean() if n else None,
                        "net": 100.0 * net[m].mean() if n else None})
    cuts = sorted({float(fvu[which == d].max()) for d in range(n_bins) if (which == d).any()})
    gains = [(int(net[fvu <= c].sum()), c) for c in cuts]
    best_gain, best_cut = max(gains, key=lambda g: (g[0], g[1]))  # ties: the larger tau (steer more)
    suggested = {"tau": best_cut, "net_images": best_gain,
                 "net_points": 100.0 * best_gain / len(fvu), "eval_quantile": float((fvu <= best_cut).mean())}
    used = {"tau": used_tau, "quantile": used_quantile}
    if reference_fvu is not None and len(reference_fvu):
        ref = np.asarray(reference_fvu, dtype=float)
        ref = ref[np.isfinite(ref)]
        suggested["reference_quantile"] = float((ref <= best_cut).mean())
        if used_tau is not None:
            used["reference_quantile"] = float((ref <= used_tau).mean())
    return {"n_images": int(len(fvu)), "n_harm": int(harm.sum()), "n_help": int(help_.sum()),
            "spearman_fvu_harm": spearman(fvu, harm.astype(float)), "spearman_fvu_net": spearman(fvu, net),
            "deciles": deciles, "suggested_gate": suggested, "gate_used": used,
            "note": "deciles of the evaluation images' FVU; the suggested gate is chosen with the evaluation labels"}


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(label: str, a: dict[str, Any]) -> str:
    """A table of the deciles, the correlations and the suggested gate next to the one used."""
    s, u = a["suggested_gate"], a["gate_used"]
    lines = [f"### Does FVU predict harm? `{label}` ({a['n_images']} images: {a['n_harm']} right -> wrong, "
             f"{a['n_help']} wrong -> right)", "",
             f"Spearman rho (FVU, harm) = {_f(a['spearman_fvu_harm'], '+.3f')}, rho (FVU, net change) = "
             f"{_f(a['spearman_fvu_net'], '+.3f')}.", "",
             "| FVU decile | images | FVU range | harm % | help % | net (points) |", "|---|---|---|---|---|---|"]
    for d in a["deciles"]:
        lines.append(f"| {d['decile']} | {d['n']} | {_f(d['fvu_low'], '.3f')} - {_f(d['fvu_high'], '.3f')} | "
                     f"{_f(d['harm_rate'], '.1f')} | {_f(d['help_rate'], '.1f')} | {_f(d['net'], '+.1f')} |")
    sugg = (f"Suggested gate: tau = {s['tau']:.4f} (steer FVU <= tau: {s['net_images']:+d} images, "
            f"{s['net_points']:+.2f} points; the {s['eval_quantile']:.2f} quantile of the evaluation FVU"
            + (f", the {s['reference_quantile']:.3f} quantile of the reference FVU"
               if "reference_quantile" in s else "")
            + "). Gate used: " + ("none" if u["tau"] is None else f"tau = {u['tau']:.4f}"
                                  + (f" (quantile {u['quantile']:g})" if u.get("quantile") is not None else "")
                                  + (f", the {u['reference_quantile']:.3f} quantile of the reference FVU"
                                     if "reference_quantile" in u else ""))
            + ". Chosen with the evaluation labels: an analysis, not a tuned setting.")
    return "\n".join(lines + ["", sugg])


def plot(label: str, a: dict[str, Any], path: str | Path) -> Path:
    """Harm and help rates per FVU decile (bars) and the net change (line)."""
    import io

    from matplotlib.figure import Figure

    from ..core.fileio import write_bytes_atomic

    d = [x for x in a["deciles"] if x["n"]]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    x = np.arange(len(d))
    ax.bar(x - 0.2, [v["harm_rate"] for v in d], 0.4, color="tab:red", label="harm: right -> wrong")
    ax.bar(x + 0.2, [v["help_rate"] for v in d], 0.4, color="tab:green", label="help: wrong -> right")
    ax.plot(x, [v["net"] for v in d], "k.-", label="net (help - harm)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [f"{v['decile']}\n<={v['fvu_high']:.2f}" for v in d], fontsize=7)
    ax.set_xlabel("FVU decile (upper edge)")
    ax.set_ylabel("% of the decile's images")
    rho = a["spearman_fvu_harm"]
    ax.set_title(f"{label}: does FVU predict harm? rho(FVU, harm) = {_f(rho, '+.3f')}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    return write_bytes_atomic(Path(path), buf.getvalue())


__all__ = ["fvu_harm", "markdown", "plot", "ranks", "spearman"]
