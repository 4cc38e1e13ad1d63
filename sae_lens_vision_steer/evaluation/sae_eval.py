"""`sae-eval`: one yardstick for any SAE (ours or imported, SAE or transcoder) on the same images.

For each SAE, on the tokens it was trained on (its recorded positions) at its hook, over the images:

- **FVU and explained variance**, mean-centred: `EV = 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)`,
  computed with SAELens' own `sae_lens.evals.ExplainedVarianceCalculator` (the `explained_variance`
  of `sae_lens.evals.get_sparsity_and_variance_metrics`); `FVU = 1 - EV`. For a transcoder, `x` is the
  output hook's activation and `x_hat` the transcoder's prediction from the input hook.
- **L0**: mean number of non-zero latents per token (`(acts != 0).sum(-1)`, SAELens' `l0`);
  **dead fraction**: latents that never fire on any token of the images; **alive** = 1 - dead.
- **Δ top-1**: zero-shot top-1 with the reconstruction spliced in (error term off, the SAE's positions
  only) minus plain zero-shot top-1, in percentage points.
- **KL recovered**, from CLIP's scaled zero-shot logits (`logit_scale * cos`): per image
  `KL(p_clean || p_new)` (the `_kl` of `sae_lens.evals`, i.e. `kl_div(log_softmax(new), softmax(clean))`
  summed over classes), averaged over images; `score = (KL_ablation - KL_reconstruction) / KL_ablation`
  (`kl_div_score` of `sae_lens.evals.get_downstream_reconstruction_metrics`). The ablation replaces the
  same positions of the (output) hook by zeros (`baseline="zero"`, SAELens' zero-ablation) or by their
  mean over the evaluated images, per token position (`baseline="mean"`).

`evaluate_saes` returns an `SAEEvalResult` (table, JSON, plot); `record_in_sae_folder` stores a row in
the SAE folder's `cfg.json` metadata (`sae_eval`, keyed by data set and split), which the model card shows.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from sae_lens import SAE
from sae_lens.evals import ExplainedVarianceCalculator
from tqdm.auto import tqdm

from ..core.errors import InputError, UsageError
from ..core.fileio import write_json_atomic, write_text_atomic
from ..core.identity import model_identity, portable_model_name
from ..data.base import ImageDataset, make_loader
from ..sae.metadata import check_sae_fits_hook, sae_hook_name
from ..sae.splice import HookedCLIP, resolve_positions
from ..zeroshot.classifier import ZeroShotClassifier

BASELINES = ("zero", "mean")
RECORD_KEY = "sae_eval"  # cfg.json metadata key
METRICS = ("fvu", "explained_variance", "l0", "dead_fraction", "alive_fraction", "top1_clean",
           "top1_reconstruction", "delta_top1", "kl_reconstruction", "kl_ablation", "kl_recovered")


@dataclass
class SAEEvalRow:
    """The yardstick for one SAE (one hook) on one set of images."""

    label: str
    hook_name: str
    hook_name_out: str | None
    architecture: str
    positions: Any
    d_sae: int
    baseline: str
    n_images: int
    n_tokens: int
    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    alive_fraction: float
    top1_clean: float
    top1_reconstruction: float
    delta_top1: float
    top1_ablation: float
    kl_reconstruction: float
    kl_ablation: float
    kl_recovered: float | None
    visaebench: dict[str, Any] | None = None  # ViSAEBench's own metrics, when asked for

    def metrics(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (*METRICS, "top1_ablation", "baseline", "n_images", "n_tokens")} | (
            {"visaebench": {n: v["value"] for n, v in self.visaebench.items()}} if self.visaebench else {})


@dataclass
class SAEEvalResult:
    config: dict[str, Any]
    rows: list[SAEEvalRow]
    timing: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "rows": [asdict(r) for r in self.rows], "timing": self.timing}

    def table(self, fmt: str = "text") -> str:
        cols = ["SAE", "hook", "arch", "FVU", "EV", "L0", "dead", "alive", "top-1", "Δ top-1",
                f"KL rec / {self.config['baseline']}-abl", "KL recovered"]
        body = [[r.label, r.hook_name + (f" -> {r.hook_name_out}" if r.hook_name_out else ""), r.architecture,
                 f"{r.fvu:.4f}", f"{r.explained_variance:.4f}", f"{r.l0:.2f}", f"{r.dead_fraction:.4f}",
                 f"{r.alive_fraction:.4f}", f"{r.top1_reconstruction:.2f}", f"{r.delta_top1:+.2f}",
                 f"{r.kl_reconstruction:.4f} / {r.kl_ablation:.4f}",
                 "n/a" if r.kl_recovered is None else f"{r.kl_recovered:.4f}"] for r in self.rows]
        if fmt == "markdown":
            return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                             + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body])
        widths = [max(len(c), *(len(row[i]) for row in body)) for i, c in enumerate(cols)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [cols, *body])

    def save(self, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {"json": write_json_atomic(out / "sae_eval.json", self.to_json(), indent=2)}
        c = self.config
        md = (f"# SAE yardstick: {c['dataset']} / {c['split']}, {c['n_images']} images, model {c['model']}\n\n"
              f"Zero-shot top-1 of plain CLIP: {c['top1_clean']:.2f}%. KL recovered against {c['baseline']}-ablation "
              "(scaled zero-shot logits).\n\n" + self.table("markdown") + "\n")
        write_text_atomic(out / "sae_eval.md", md)
        written["markdown"] = out / "sae_eval.md"
        if plot:
            written["plot"] = plot_rows(self.rows, out / "sae_eval.png")
        return written


def plot_rows(rows: Sequence[SAEEvalRow], path: Path) -> Path:
    """One panel per metric (FVU, L0, dead fraction, Δ top-1, KL recovered), one bar per SAE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fvu", "FVU"), ("l0", "L0"), ("dead_fraction", "dead fraction"), ("delta_top1", "Δ top-1 (pp)"),
              ("kl_recovered", "KL recovered")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    labels = [r.label for r in rows]
    for ax, (key, title) in zip(axes, panels):
        vals = [getattr(r, key) if getattr(r, key) is not None else math.nan for r in rows]
        ax.bar(range(len(rows)), vals, color="#4c72b0")
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def kl_clean_to(new_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """Per-image `KL(softmax(clean) || softmax(new))`, as `sae_lens.evals._kl`."""
    return F.kl_div(F.log_softmax(new_logits.double(), -1), F.softmax(clean_logits.double(), -1),
                    reduction="none").sum(-1)


def _index(positions: Any, n_prefix: int) -> Any:
    """The token index the splice uses for `positions` (as `HookedCLIP._splice`)."""
    if positions == "all":
        return slice(None)
    if positions == "cls":
        return slice(0, 1)
    if positions == "patches":
        return slice(n_prefix, None)
    return list(positions)


def _select(act: torch.Tensor, idx: Any) -> torch.Tensor:
    return act if act.ndim == 2 else act[:, idx]


@torch.no_grad()
def evaluate_one(model: HookedCLIP, data: ImageDataset, sae: SAE, classifier: ZeroShotClassifier, *,
                 baseline: str = "zero", label: str | None = None, batch_size: int = 64, num_workers: int = 2,
                 show_progress: bool = True, collect: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> SAEEvalRow:
    """The yardstick for one SAE (see the module docstring). `collect`: a list that receives the SAE's input
    tokens `[B, P, D]` (CPU) and the labels, batch by batch, for metrics that need the activations."""
    if baseline not in BASELINES:
        raise UsageError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
    hook_in = sae_hook_name(sae)
    hook_out = sae.cfg.metadata.get("hook_name_out") or hook_in
    check_sae_fits_hook(sae, model, hook_in)  # width, recorded model
    if hook_out != hook_in:
        model.check_hook_name(hook_out)
    positions = resolve_positions(sae, None, model.cfg.n_tokens, model.cfg.n_prefix_tokens)
    idx = _index(positions, model.cfg.n_prefix_tokens)
    dev, dtype = sae.W_dec.device, sae.W_dec.dtype
    ev = ExplainedVarianceCalculator()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    l0_sum, n_tokens = 0.0, 0
    clean_logits, rec_logits, labels = [], [], []
    mean_sum: torch.Tensor | None = None

    def ablate(fill: torch.Tensor | None):
        def hook(act: torch.Tensor, hook=None) -> torch.Tensor:  # noqa: ARG001 (TransformerLens signature)
            value = torch.zeros_like(_select(act, idx)) if fill is None else fill.to(act.dtype).expand_as(_select(act, idx))
            if act.ndim == 2:
                return value.clone()
            out = act.clone()
            out[:, idx] = value
            return out
        return hook

    abl_logits: list[torch.Tensor] = []
    loader = make_loader(data, batch_size, num_workers)
    for batch in tqdm(loader, desc=f"sae-eval {label or hook_in}", disable=not show_progress, unit="batch"):
        if len(batch.labels) == 0:
            continue
        images = batch.images.to(model.device)
        embeds, cache = model.run_with_cache(images, names_filter=list(dict.fromkeys([hook_in, hook_out])))
        x_in, target = _select(cache[hook_in], idx), _select(cache[hook_out], idx)
        if collect is not None:
            collect.append(((x_in if x_in.ndim == 3 else x_in[:, None]).float().cpu(), batch.labels.cpu()))
        codes = sae.encode(x_in.to(dev, dtype))
        rec = sae.decode(codes)
        d_out = target.shape[-1]
        ev.add_batch(sae_output=rec.reshape(-1, d_out), hidden_acts=target.to(dev, dtype).reshape(-1, d_out))
        active = codes.reshape(-1, sae.cfg.d_sae) != 0
        l0_sum += float(active.sum())
        n_tokens += active.shape[0]
        fired |= active.any(0).cpu()
        t64 = target.double().sum(0).cpu()
        mean_sum = t64 if mean_sum is None else mean_sum + t64
        clean_logits.append(classifier.logits(embeds).cpu())
        with model.saes([sae], use_error_term=False):
            rec_logits.append(classifier.logits(model.encode_image(images)).cpu())
        if baseline == "zero":
            with model.hooks(fwd_hooks=[(hook_out, ablate(None))]):
                abl_logits.append(classifier.logits(model.encode_image(images)).cpu())
        labels.append(batch.labels.cpu())
    if not labels:
        raise UsageError("no images were evaluated (the data set is empty or every image was unreadable)")
    if baseline == "mean":  # a second pass: the fill is the mean over every evaluated image
        n_images = sum(len(y) for y in labels)
        fill = (mean_sum / n_images).float().to(model.device)
        for batch in tqdm(make_loader(data, batch_size, num_workers), desc="mean-ablation", disable=not show_progress,
                          unit="batch"):
            if len(batch.labels) == 0:
                continue
            with model.hooks(fwd_hooks=[(hook_out, ablate(fill))]):
                abl_logits.append(classifier.logits(model.encode_image(batch.images.to(model.device))).cpu())
    clean, recon, abl, y = torch.cat(clean_logits), torch.cat(rec_logits), torch.cat(abl_logits), torch.cat(labels)
    explained = float(ev.compute())
    top1 = {name: 100.0 * float((lg.argmax(-1) == y).double().mean()) for name, lg in
            (("clean", clean), ("rec", recon), ("abl", abl))}
    kl_rec, kl_abl = float(kl_clean_to(recon, clean).mean()), float(kl_clean_to(abl, clean).mean())
    dead = float((~fired).double().mean())
    return SAEEvalRow(
        label=label or hook_in, hook_name=hook_in, hook_name_out=hook_out if hook_out != hook_in else None,
        architecture=sae.cfg.architecture(), positions=positions if isinstance(positions, str) else list(positions),
        d_sae=sae.cfg.d_sae, baseline=baseline, n_images=len(y), n_tokens=n_tokens, fvu=1.0 - explained,
        explained_variance=explained, l0=l0_sum / max(n_tokens, 1), dead_fraction=dead, alive_fraction=1.0 - dead,
        top1_clean=top1["clean"], top1_reconstruction=top1["rec"], delta_top1=top1["rec"] - top1["clean"],
        top1_ablation=top1["abl"], kl_reconstruction=kl_rec, kl_ablation=kl_abl,
        kl_recovered=(kl_abl - kl_rec) / kl_abl if kl_abl > 0 else None,
    )


def evaluate_saes(model: HookedCLIP, data: ImageDataset, saes: SAE | Sequence[SAE], *,
                  labels: Sequence[str] | None = None, baseline: str = "zero",
                  templates: str | Sequence[str] | None = None, classifier: ZeroShotClassifier | None = None,
                  batch_size: int = 64, num_workers: int = 2, show_progress: bool = True,
                  text_cache: str | Path | None = None, visaebench: Sequence[str] = ()) -> SAEEvalResult:
    """The yardstick for each SAE on the same images (one row per SAE, i.e. per hook). `visaebench`: names
    of ViSAEBench metrics to run too on each SAE's activations (`evaluation/visaebench.py`)."""
    from ..data.ood import dataset_templates
    from ..data.resources import DEFAULT_TEMPLATES
    from .visaebench import check_visaebench_names, visaebench_metrics

    sae_list = [saes] if isinstance(saes, SAE) else list(saes)
    if not sae_list:
        raise UsageError("need at least one SAE")
    if baseline not in BASELINES:
        raise UsageError(f"baseline must be one of {list(BASELINES)}, got {baseline!r}")
    vsb = check_visaebench_names(visaebench)
    names = list(labels) if labels is not None else [sae_hook_name(s) for s in sae_list]
    if len(names) != len(sae_list):
        raise UsageError(f"{len(sae_list)} SAEs but {len(names)} labels")
    t0 = time.perf_counter()
    if classifier is None:
        templates = templates or dataset_templates(data, DEFAULT_TEMPLATES.get(data.dataset_id, "single"))
        classifier = ZeroShotClassifier(model, data.classnames, templates, show_progress=show_progress,
                                        text_cache=text_cache)
    rows = []
    for sae, name in zip(sae_list, names):
        acts: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if vsb else None
        row = evaluate_one(model, data, sae, classifier, baseline=baseline, label=name, batch_size=batch_size,
                           num_workers=num_workers, show_progress=show_progress, collect=acts)
        if vsb:
            x = torch.cat([a for a, _ in acts])
            y = torch.cat([lab for _, lab in acts]).numpy()
            row.visaebench = visaebench_metrics(sae, x, y, vsb, device=str(sae.W_dec.device))
        rows.append(row)
    identity = model_identity(model)
    config = {"model": identity.pop("model_name"), **identity, "dataset": data.dataset_id, "split": data.split,
              "n_images": rows[0].n_images, "baseline": baseline, "top1_clean": rows[0].top1_clean,
              "templates": templates if isinstance(templates, (str, type(None))) else list(templates)}
    return SAEEvalResult(config, rows, {"total_s": time.perf_counter() - t0})


def record_in_sae_folder(sae_dir: str | Path, row: SAEEvalRow, config: dict[str, Any]) -> Path:
    """Store `row`'s figures in the SAE folder's `cfg.json` (metadata `sae_eval`, keyed by
    `<dataset>/<split>`; portable: no local paths). SAELens ignores unknown metadata keys."""
    path = Path(sae_dir) / "cfg.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot record the figures in {path}: {e}") from None
    meta = cfg.setdefault("metadata", {})
    data = config["dataset"]
    if isinstance(data, str) and data.startswith("imagefolder:"):
        data = "imagefolder:" + Path(data.split(":", 1)[1]).name
    key = f"{data}/{config['split']}"
    record = dict(meta.get(RECORD_KEY) or {})
    record[key] = {**row.metrics(), "model": portable_model_name(config["model"])}
    meta[RECORD_KEY] = record
    write_json_atomic(path, cfg, indent=2)
    return path


__all__ = ["BASELINES", "METRICS", "SAEEvalResult", "SAEEvalRow", "evaluate_one", "evaluate_saes", "kl_clean_to",
           "plot_rows", "record_in_sae_folder"]
