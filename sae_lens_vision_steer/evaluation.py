"""Evaluation runner: zero-shot accuracy of steering methods, sharing one backbone pass.

The backbone runs once: the tokens at the SAE's hook are cached in memory for the evaluation set
(the forward stops right after the hook's block), and every method and setting maps the cached CLS
tokens through the rest of the tower (for the final block: `model.head`, i.e. ln_post + projection).
Methods that need other layers (SAE-rec all) declare `kind="pass"` and get their own hooked pass.

A method is a registered function, so new ones plug in without touching the loop:

    @register_method("my_method", description="...")
    def my_method(tokens_ND, ctx, *, lam, gamma, **_):
        return MethodOutput(tokens=..., coverage=...)      # or embeds=[N, E]

`kind="pass"` methods are called as `fn(ctx, **settings)` and return a `TokenIntervention` (or a
list of forward hooks); the runner classifies a full hooked pass over `ctx.data`.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from sae_lens import SAE
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ImageDataset, make_loader
from .hooked_clip import HookedCLIP
from .sae_metadata import activation_mean, check_sae_fits_hook, sae_hook_name
from .steering.baselines import SAEReconstruction, sae_reconstruct
from .steering.hooks import TokenIntervention
from .steering.vs2 import PAPER_GAMMA, PAPER_LAM, vs2_from_reconstruction
from .zeroshot import ZeroShotClassifier, ZeroShotResult, accuracy_metrics

DEFAULT_METHODS = ("zeroshot", "vs2", "rec_final", "rec_final_gamma")
RESULTS_FILE = "results.json"
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


# ---------------------------------------------------------------------------------- method registry
@dataclass
class MethodOutput:
    """What a method returns for the evaluation set: steered tokens at the hook or embeddings."""

    tokens: torch.Tensor | None = None  # [N, D] CLS tokens at the SAE hook
    embeds: torch.Tensor | None = None  # [N, E] image embeddings (skips the rest of the tower)
    coverage: float = 0.0  # fraction of images whose token was changed
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodContext:
    """Everything a method may use. `scratch` is shared by all method calls of one run (e.g. for
    neighbour indices that several settings reuse). The evaluation set's labels are set only while a
    method registered with `uses_eval_labels=True` (an oracle) runs, and are None otherwise."""

    model: HookedCLIP
    classifier: ZeroShotClassifier
    sae: SAE | None
    hook_name: str | None
    data: ImageDataset | None
    tokens_to_embeds: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int = 256
    num_workers: int = 2
    show_progress: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)
    zeroshot_embeds_NE: torch.Tensor | None = None  # plain CLIP image embeddings of the evaluation set
    oracle_labels_N: torch.Tensor | None = None

    def require_sae(self, method: str) -> SAE:
        if self.sae is None:
            raise ValueError(f"method {method!r} needs an SAE (--sae)")
        return self.sae


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Any]
    kind: Literal["tokens", "pass"] = "tokens"
    needs_sae: bool = True
    uses_eval_labels: bool = False  # oracle methods: read the evaluation labels (never label-free)
    description: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, *, kind: Literal["tokens", "pass"] = "tokens", needs_sae: bool = True,
                    uses_eval_labels: bool = False,
                    description: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add `fn` to `METHODS` under `name` (replacing an older entry of that name)."""
    if kind not in ("tokens", "pass"):
        raise ValueError(f"method kind must be 'tokens' or 'pass', got {kind!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS[name] = Method(name, fn, kind, needs_sae, uses_eval_labels,
                               description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def get_method(name: str) -> Method:
    if name not in METHODS:
        _load_plugin_methods()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def _load_plugin_methods() -> None:
    """Import modules that register more methods (VS2++ and its baselines), if they exist."""
    import importlib

    # vs2pp_methods registers vs2pp*, clip_steer*, weighted_rag* (kept out of steering/vs2pp.py so that
    # the steering package never imports this runner: no import cycle).
    for mod in ("sae_lens_vision_steer.steering.vs2pp_methods",):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


@register_method("zeroshot", needs_sae=False, description="plain CLIP zero-shot")
def _zeroshot(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return MethodOutput(tokens=tokens_ND, coverage=0.0)


def sae_reconstruction(tokens_ND: torch.Tensor, ctx: MethodContext, sae: SAE) -> torch.Tensor:
    """`sae.decode(sae.encode(x))` for the cached tokens, computed once per run and shared by every
    VS2 setting and SAE-rec final (it does not depend on lam, gamma or the gate)."""
    hit = ctx.scratch.get("sae_reconstruction")
    if hit is None or hit[0] is not tokens_ND or hit[1] is not sae:
        rec = torch.cat([sae.decode(sae.encode(c.to(sae.device, sae.dtype))) for c in tokens_ND.split(ctx.batch_size)])
        hit = (tokens_ND, sae, rec)
        ctx.scratch["sae_reconstruction"] = hit
    return hit[2]


@register_method("vs2", description="VS2: x + lam (gamma-1) W_dec c, norm-preserving, FVU-gated")
def _vs2(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
         fvu_threshold: float | None = None, preserve_norm: bool = True, **_: Any) -> MethodOutput:
    sae = ctx.require_sae("vs2")
    mean_D = None
    if fvu_threshold is not None:  # look the mean up once per run, not once per setting
        if "activation_mean" not in ctx.scratch:
            ctx.scratch["activation_mean"] = activation_mean(sae)
        mean_D = ctx.scratch["activation_mean"]
    rec = sae_reconstruction(tokens_ND, ctx, sae)
    out = vs2_from_reconstruction(tokens_ND.to(sae.device), rec, sae, lam, gamma, fvu_threshold, mean_D, preserve_norm)
    return MethodOutput(tokens=out.steered, coverage=out.coverage)


@register_method("rec_final", description="SAE-rec final: the CLS token replaced by decode(encode(x))")
def _rec_final(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    sae = ctx.require_sae("rec_final")
    return MethodOutput(tokens=sae_reconstruction(tokens_ND, ctx, sae).to(tokens_ND.dtype), coverage=1.0)


@register_method("rec_final_gamma", description="SAE-rec final + gamma: the CLS token replaced by decode(gamma c)")
def _rec_final_gamma(tokens_ND: torch.Tensor, ctx: MethodContext, *, gamma: float = PAPER_GAMMA, **_: Any) -> MethodOutput:
    sae = ctx.require_sae("rec_final_gamma")
    rec = torch.cat([sae_reconstruct(c.to(sae.device), sae, gamma) for c in tokens_ND.split(ctx.batch_size)])
    return MethodOutput(tokens=rec, coverage=1.0)


@register_method("rec_all", kind="pass", needs_sae=False,
                 description="SAE-rec all: every layer's CLS replaced by its reconstruction (one SAE per layer)")
def _rec_all(ctx: MethodContext, **_: Any) -> TokenIntervention:
    saes = ctx.options.get("layer_saes")
    if not saes:
        raise ValueError("method 'rec_all' needs one SAE per layer (layer_saes=[...], CLI --layer-saes)")
    return SAEReconstruction(list(saes))


# ---------------------------------------------------------------------------------- cached tokens
@dataclass
class HookTokens:
    """The evaluation set's tokens at one residual hook, and how to finish the tower from there."""

    hook_name: str
    cls_ND: torch.Tensor  # CLS tokens at the hook (model device)
    labels_N: torch.Tensor
    n_skipped: int
    seconds: float
    resid_NTD: torch.Tensor | None = None  # all tokens (CPU), only when blocks remain after the hook
    start_block: int = 0  # first block still to run after the hook


def _hook_cut(model: HookedCLIP, hook_name: str) -> tuple[int, int]:
    """`(stop_at_layer, start_block)` for a residual hook: the forward that ends at the hook, and the
    first block the rest of the tower has to run."""
    model.check_hook_name(hook_name)
    m = _RESID_HOOK.match(hook_name)
    if not m:
        raise ValueError(f"the evaluation runner caches residual-stream hooks (blocks.i.hook_resid_pre/post); "
                         f"got {hook_name!r}")
    i = int(m.group(1))
    cut = i + 1 if m.group(2) == "post" else i
    return cut, cut


@torch.no_grad()
def cache_hook_tokens(model: HookedCLIP, data: ImageDataset | DataLoader, hook_name: str, batch_size: int = 256,
                      num_workers: int = 2, show_progress: bool = True) -> HookTokens:
    """One backbone pass up to `hook_name` (a residual hook), keeping the evaluation set's tokens there.

    For the final block only the CLS tokens are kept (the rest of the tower is `model.head`); for an
    earlier hook all tokens are kept on the CPU, since later blocks mix them.
    """
    stop, start = _hook_cut(model, hook_name)
    keep_all = start < model.cfg.n_layers
    loader = data if isinstance(data, DataLoader) else make_loader(data, batch_size, num_workers)
    cls, resid, labels, n_skipped = [], [], [], 0
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"backbone to {hook_name}", disable=not show_progress, unit="batch"):
        n_skipped += batch.n_skipped
        if len(batch.labels) == 0:
            continue
        tokens_BTD = model(batch.images.to(model.device), stop_at_layer=stop)
        cls.append(tokens_BTD[:, 0].clone())
        if keep_all:
            resid.append(tokens_BTD.cpu())
        labels.append(batch.labels)
    if not cls:
        raise ValueError("no images were evaluated (the data set is empty or every image was unreadable)")
    return HookTokens(hook_name, torch.cat(cls), torch.cat(labels), n_skipped, time.perf_counter() - t0,
                      torch.cat(resid) if keep_all else None, start)


def make_tower_tail(model: HookedCLIP, cached: HookTokens, batch_size: int = 256) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function mapping CLS tokens at the hook `[N, D]` to image embeddings `[N, E]`."""

    @torch.no_grad()
    def tail(cls_ND: torch.Tensor) -> torch.Tensor:
        if len(cls_ND) != len(cached.cls_ND):
            raise ValueError(f"expected {len(cached.cls_ND)} tokens (one per cached image), got {len(cls_ND)}")
        out = []
        for i in range(0, len(cls_ND), batch_size):
            c = cls_ND[i:i + batch_size].to(model.device, model.visual.class_embedding.dtype)
            if cached.resid_NTD is None:
                out.append(model.head(c))
            else:
                r = cached.resid_NTD[i:i + batch_size].to(model.device).clone()
                r[:, 0] = c
                out.append(model.head(model.run_blocks(r, cached.start_block)))
        return torch.cat(out)

    return tail


# ---------------------------------------------------------------------------------- results
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

    def to_json(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "mean_per_class": self.mean_per_class,
                "delta_top1": self.delta_top1, "coverage": self.coverage,
                "per_class_acc": _nan_to_none(self.per_class_acc), "settings": self.settings,
                "seconds": self.seconds, **({"info": self.info} if self.info else {})}


@dataclass(frozen=True)
class MethodSpec:
    """One row of the results: a registered method with its settings, under a row label."""

    label: str
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)


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

    def save(self, out_dir: str | Path, plots: bool = True, n_classes_plot: int = 15) -> dict[str, Path]:
        """Write `results.json`, `results.md` and one per-class gains/losses PNG per method."""
        from .cli.common import write_json_atomic

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {"json": write_json_atomic(out / RESULTS_FILE, self.to_json())}
        written["table"] = _write_text_atomic(out / "results.md", self.table("markdown") + "\n")
        if plots:
            for label in self.methods:
                if label != "zeroshot":
                    path = out / f"per_class_{_safe_name(label)}.png"
                    written[f"plot:{label}"] = plot_per_class_changes(self, label, path, n_classes_plot)
        return written


def format_table(rows: Mapping[str, MethodScores], fmt: Literal["text", "markdown"] = "text") -> str:
    header = ["method", "top-1", "top-5", "mean/class", "Δtop-1", "coverage"]
    # Rows that read the evaluation labels (VS2++/CLIP-steer/RAG oracles) are marked as upper bounds.
    body = [[label + (" (oracle upper bound)" if s.info.get("oracle_upper_bound") else ""), f"{s.top1:.2f}",
             f"{s.top5:.2f}", f"{s.mean_per_class:.2f}", f"{s.delta_top1:+.2f}", f"{s.coverage:.3f}"]
            for label, s in rows.items()]
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


def _write_text_atomic(path: Path, text: str) -> Path:
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)
    return path


# ---------------------------------------------------------------------------------- the runner
def _scores(result: ZeroShotResult, base: ZeroShotResult | None, coverage: float, settings: Mapping[str, Any],
            seconds: float, info: dict[str, Any]) -> MethodScores:
    return MethodScores(
        top1=result.top1, top5=result.top5, mean_per_class=result.mean_per_class,
        delta_top1=result.top1 - (base.top1 if base is not None else result.top1), coverage=coverage,
        per_class_acc=result.per_class_acc, settings=dict(settings), seconds=seconds,
        predictions=result.predictions, info=info)


def _as_specs(methods: Iterable[str | MethodSpec]) -> list[MethodSpec]:
    specs = [m if isinstance(m, MethodSpec) else MethodSpec(m, m) for m in methods]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate method labels: {labels}")
    for s in specs:
        get_method(s.method)  # unknown names fail before the backbone runs
    return specs


class Evaluator:
    """Holds one backbone pass of an evaluation set and scores any number of methods on it.

        ev = Evaluator(model, data, sae, classifier)   # runs the backbone once
        ev.score(MethodSpec("vs2", "vs2", {"lam": 2.1, "gamma": 1.5}))
    """

    def __init__(self, model: HookedCLIP, data: ImageDataset, sae: SAE | None, classifier: ZeroShotClassifier,
                 hook_name: str | None = None, batch_size: int = 256, num_workers: int = 2,
                 show_progress: bool = True, options: dict[str, Any] | None = None,
                 fvu_threshold: float | None = None):
        if sae is not None:
            hook_name = sae_hook_name(sae, hook_name)
            check_sae_fits_hook(sae, model, hook_name)
        hook_name = hook_name or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        self.model, self.data, self.sae, self.classifier = model, data, sae, classifier
        self.default_settings: dict[str, Any] = {"fvu_threshold": fvu_threshold}
        self.cached = cache_hook_tokens(model, data, hook_name, batch_size, num_workers, show_progress)
        self.n_backbone_passes = 1
        self.ctx = MethodContext(model, classifier, sae, hook_name, data, make_tower_tail(model, self.cached, batch_size),
                                 batch_size, num_workers, show_progress, dict(options or {}))
        self.ctx.zeroshot_embeds_NE = self.ctx.tokens_to_embeds(self.cached.cls_ND)
        self.zeroshot: ZeroShotResult = self._classify_embeds(self.ctx.zeroshot_embeds_NE)

    @property
    def labels_N(self) -> torch.Tensor:
        return self.cached.labels_N

    def _classify_tokens(self, tokens_ND: torch.Tensor) -> ZeroShotResult:
        return self._classify_embeds(self.ctx.tokens_to_embeds(tokens_ND))

    def _classify_embeds(self, embeds_NE: torch.Tensor) -> ZeroShotResult:
        return accuracy_metrics(self.classifier.logits(embeds_NE).cpu(), self.labels_N.cpu(), self.cached.n_skipped)

    @torch.no_grad()
    def score(self, spec: MethodSpec | str) -> MethodScores:
        spec = _as_specs([spec])[0]
        method = get_method(spec.method)
        settings = {**self.default_settings, **spec.settings}
        if method.needs_sae:
            self.ctx.require_sae(spec.method)
        t0 = time.perf_counter()
        self.ctx.oracle_labels_N = self.labels_N if method.uses_eval_labels else None
        try:
            if method.kind == "pass":
                result, coverage, info = self._score_pass(method, settings)
            else:
                out = method.fn(self.cached.cls_ND, self.ctx, **settings)
                if not isinstance(out, MethodOutput) or (out.tokens is None) == (out.embeds is None):
                    raise TypeError(f"method {spec.method!r} must return a MethodOutput with tokens or embeds")
                result = self._classify_tokens(out.tokens) if out.embeds is None else self._classify_embeds(out.embeds)
                coverage, info = out.coverage, out.info
        finally:
            self.ctx.oracle_labels_N = None
        return _scores(result, self.zeroshot, coverage, _json_settings(settings, method), time.perf_counter() - t0, info)

    def _score_pass(self, method: Method, settings: dict[str, Any]) -> tuple[ZeroShotResult, float, dict[str, Any]]:
        made = method.fn(self.ctx, **settings)
        if isinstance(made, TokenIntervention):
            hooks, coverage_fn = made.fwd_hooks(self.model), lambda: made.total_coverage
            made.reset_coverage()
        else:
            hooks, coverage_fn = list(made), lambda: float("nan")
        loader = make_loader(self.data, self.ctx.batch_size, self.ctx.num_workers)
        result = self.classifier.evaluate(self.model, loader, fwd_hooks=hooks, show_progress=self.ctx.show_progress)
        self.n_backbone_passes += 1
        return result, coverage_fn(), {"hooks": [h for h, _ in hooks]}


def _json_settings(settings: Mapping[str, Any], method: Method) -> dict[str, Any]:
    """The settings a method's function declares (so rows do not list unrelated knobs)."""
    import inspect

    params = inspect.signature(method.fn).parameters
    return {k: v for k, v in settings.items()
            if k in params and isinstance(v, (int, float, str, bool, type(None)))}


def evaluate(model: HookedCLIP, data: ImageDataset, sae: SAE | None,
             methods: Iterable[str | MethodSpec] = DEFAULT_METHODS, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
             fvu_threshold: float | None = None, templates: str | Sequence[str] | None = None,
             classifier: ZeroShotClassifier | None = None, hook_name: str | None = None,
             batch_size: int = 256, num_workers: int = 2, show_progress: bool = True,
             options: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
             out_dir: str | Path | None = None) -> EvaluationResult:
    """Zero-shot accuracy of each method on `data`, with one backbone pass for all token methods.

    `lam`, `gamma` and `fvu_threshold` are the shared settings; a `MethodSpec` can override them per
    row. The zero-shot row is always included (it is the reference for Δtop-1). With `out_dir`,
    writes `results.json`, `results.md` and per-class plots there.
    """
    from .zeroshot_resources import DEFAULT_TEMPLATES

    specs = _as_specs(methods)
    for spec in specs:  # fail before the backbone runs
        if sae is None and get_method(spec.method).needs_sae:
            raise ValueError(f"method {spec.method!r} needs an SAE (--sae)")
    if "zeroshot" not in [s.label for s in specs]:
        specs.insert(0, MethodSpec("zeroshot", "zeroshot"))
    t_start = time.perf_counter()
    if classifier is None:
        templates = templates or DEFAULT_TEMPLATES.get(data.dataset_id, "single")
        classifier = ZeroShotClassifier(model, data.classnames, templates, show_progress=show_progress)
    t_text = time.perf_counter() - t_start
    ev = Evaluator(model, data, sae, classifier, hook_name, batch_size, num_workers, show_progress, options,
                   fvu_threshold)
    ev.default_settings.update(lam=lam, gamma=gamma)
    rows = {}
    for spec in specs:
        rows[spec.label] = ev.score(spec)
    # Put zero-shot first whatever the order asked for.
    rows = {"zeroshot": rows["zeroshot"], **{k: v for k, v in rows.items() if k != "zeroshot"}}
    timing = {"text_s": t_text, "backbone_s": ev.cached.seconds, "n_backbone_passes": ev.n_backbone_passes,
              "methods_s": {k: v.seconds for k, v in rows.items()}, "total_s": time.perf_counter() - t_start,
              "n_images": len(ev.labels_N)}
    cfg = {
        "model": model.cfg.model_name, "pretrained": model.cfg.pretrained, "dataset": data.dataset_id,
        "split": data.split, "n_images": len(ev.labels_N), "n_skipped": ev.cached.n_skipped,
        "hook_name": ev.cached.hook_name, "lam": lam, "gamma": gamma, "fvu_threshold": fvu_threshold,
        "templates": templates if isinstance(templates, (str, type(None))) else list(templates),
        "methods": [s.label for s in specs], **_sae_summary(sae), **(config or {}),
    }
    result = EvaluationResult(cfg, list(data.classnames), rows, timing, ev.labels_N.cpu().numpy())
    if out_dir is not None:
        result.save(out_dir)
    return result


def _sae_summary(sae: SAE | None) -> dict[str, Any]:
    if sae is None:
        return {}
    meta = sae.cfg.metadata
    return {"sae": {"architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                    "k": getattr(sae.cfg, "k", None), "hook_name": meta.get("hook_name"),
                    "dataset": meta.get("dataset"), "heldout_fvu": meta.get("heldout_fvu")}}


# ---------------------------------------------------------------------------------- sweep
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


def sweep_vs2(evaluator: Evaluator, lams: Sequence[float], gammas: Sequence[float], selected_on: str = "eval",
              fvu_threshold: float | None = None, show_progress: bool = True) -> SweepResult:
    """VS2 top-1 over a lam x gamma grid on the evaluator's cached tokens (no extra backbone pass)."""
    if not lams or not gammas:
        raise ValueError("the sweep needs at least one lam and one gamma")
    t0 = time.perf_counter()
    top1 = np.zeros((len(gammas), len(lams)))
    cov = np.zeros_like(top1)
    cells = [(gi, li) for gi in range(len(gammas)) for li in range(len(lams))]
    for gi, li in tqdm(cells, desc="lam x gamma", disable=not show_progress):
        settings = {"lam": float(lams[li]), "gamma": float(gammas[gi])}
        if fvu_threshold is not None:
            settings["fvu_threshold"] = fvu_threshold
        s = evaluator.score(MethodSpec("vs2", "vs2", settings))
        top1[gi, li], cov[gi, li] = s.top1, s.coverage
    return SweepResult([float(v) for v in lams], [float(v) for v in gammas], top1, cov, evaluator.zeroshot.top1,
                       selected_on, len(evaluator.labels_N), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------- plots
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
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """A SAELens SAE saved with `save_model`/`save_inference_model` (a folder with cfg.json)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE folder {path} does not exist")
    if not (path / "cfg.json").is_file():
        found = sorted(p.parent for p in path.glob("*/cfg.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"{path} is not a SAELens SAE folder (no cfg.json"
                                    + (f"; candidates: {[str(p) for p in found]})" if found else ")"))
        path = found[0]
    return SAE.load_from_disk(path, device=str(device))


__all__ = [
    "DEFAULT_METHODS", "EvaluationResult", "Evaluator", "HookTokens", "METHODS", "Method", "MethodContext",
    "MethodOutput", "MethodScores", "MethodSpec", "SweepResult", "cache_hook_tokens", "evaluate", "format_table",
    "get_method", "load_sae", "make_tower_tail", "plot_per_class_changes", "plot_sweep_heatmap", "register_method",
    "sweep_vs2",
]
