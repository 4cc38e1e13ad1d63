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
list of forward hooks); the runner classifies a full hooked pass over `ctx.data`. A method may
register `prepare(ctx)`, run before the backbone pass to check its inputs (a pool cache, layer SAEs).

The FVU gate is per method: `fvu_threshold` reaches only the methods in `gate_methods` (default
`vs2`, as in the paper); `results.json` lists them under `config.gated_methods`.
Results and plots are in `results.py`.
"""

from __future__ import annotations

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

from . import distributed
from .data import ImageDataset, make_loader
from .hooked_clip import HookedCLIP
from .identity import model_identity
from .results import (  # noqa: F401  (re-exported: the results API used to live here)
    RESULTS_FILE,
    EvaluationResult,
    MethodScores,
    SweepResult,
    format_table,
    plot_per_class_changes,
    plot_sweep_heatmap,
)
from .sae_metadata import activation_mean, check_sae_fits_hook, check_sae_positions, sae_hook_name
from .steering.baselines import SAEReconstruction, sae_reconstruct
from .steering.hooks import TokenIntervention
from .steering.vs2 import PAPER_GAMMA, PAPER_LAM, vs2_from_reconstruction
from .zeroshot import ZeroShotClassifier, ZeroShotResult, accuracy_metrics

DEFAULT_METHODS = ("zeroshot", "vs2", "rec_final", "rec_final_gamma")
DEFAULT_GATED_METHODS = ("vs2",)  # the paper gates VS2 only
_RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


# ---------------------------------------------------------------------------------- method registry
@dataclass
class MethodOutput:
    """What a method returns for the evaluation set: steered tokens at the hook or embeddings."""

    tokens: torch.Tensor | None = None  # [N, D] CLS tokens at the SAE hook
    embeds: torch.Tensor | None = None  # [N, E] image embeddings (skips the rest of the tower)
    logits: torch.Tensor | None = None  # [N, C] class logits (methods with their own head, e.g. TPT)
    coverage: float = 0.0  # fraction of images whose token was changed
    image_forwards: int = 0  # image-tower forwards the method ran itself (TPT: 64 views per image)
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
    prepare: Callable[["MethodContext"], None] | None = None  # checks run before the backbone pass


METHODS: dict[str, Method] = {}


def register_method(name: str, *, kind: Literal["tokens", "pass"] = "tokens", needs_sae: bool = True,
                    uses_eval_labels: bool = False, description: str = "",
                    prepare: Callable[["MethodContext"], None] | None = None,
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add `fn` to `METHODS` under `name` (replacing an older entry of that name)."""
    if kind not in ("tokens", "pass"):
        raise ValueError(f"method kind must be 'tokens' or 'pass', got {kind!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        METHODS[name] = Method(name, fn, kind, needs_sae, uses_eval_labels,
                               description or (fn.__doc__ or "").strip().split("\n")[0], prepare)
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
    for mod in ("sae_lens_vision_steer.steering.vs2pp_methods", "sae_lens_vision_steer.steering.tta_methods"):
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


def _check_rec_all(ctx: MethodContext) -> None:
    """`rec_all` means every block: refuse layer SAEs that leave blocks out (before the backbone pass)."""
    saes = ctx.options.get("layer_saes")
    if not saes:
        raise ValueError("method 'rec_all' needs one SAE per layer (layer_saes=[...], CLI --layer-saes)")
    blocks = []
    for sae in saes:
        hook = sae_hook_name(sae)
        m = _RESID_HOOK.match(hook)
        if not m:
            raise ValueError(f"rec_all takes SAEs on blocks.i.hook_resid_post/pre; got one for {hook!r}")
        check_sae_fits_hook(sae, ctx.model, hook)
        check_sae_positions(sae, "cls", "by rec_all (CLS tokens)")
        blocks.append(int(m.group(1)))
    missing = sorted(set(range(ctx.model.cfg.n_layers)) - set(blocks))
    if missing:
        raise ValueError(f"rec_all replaces the CLS token at every block, but --layer-saes covers blocks {sorted(blocks)} "
                         f"only (missing {missing}); give one SAE per block (it would not be SAE-rec all)")


@register_method("rec_all", kind="pass", needs_sae=False, prepare=_check_rec_all,
                 description="SAE-rec all: every layer's CLS replaced by its reconstruction (one SAE per layer)")
def _rec_all(ctx: MethodContext, **_: Any) -> TokenIntervention:
    _check_rec_all(ctx)
    return SAEReconstruction(list(ctx.options["layer_saes"]))


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
    if hook_name == "hook_pooled":  # families without a CLS token: the pooled token, after every block
        return model.cfg.n_layers, model.cfg.n_layers
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
    # Under torchrun each rank runs its block of the batch grid; the tokens are gathered in order below.
    loader = data if isinstance(data, DataLoader) else distributed.shard_loader(data, batch_size, num_workers)
    cls, resid, labels, n_skipped = [], [], [], 0
    t0 = time.perf_counter()
    for batch in tqdm(loader, desc=f"backbone to {hook_name}", disable=not show_progress, unit="batch"):
        n_skipped += batch.n_skipped
        if len(batch.labels) == 0:
            continue
        if hook_name == "hook_pooled":
            _, acts = model.run_with_cache(batch.images.to(model.device), names_filter=[hook_name],
                                           return_cache_object=False)
            cls.append(acts[hook_name])
            labels.append(batch.labels)
            continue
        tokens_BTD = model(batch.images.to(model.device), stop_at_layer=stop)
        cls.append(tokens_BTD[:, 0].clone())
        if keep_all:
            resid.append(tokens_BTD.cpu())
        labels.append(batch.labels)
    if distributed.active() and not isinstance(data, DataLoader):
        cls_, labels_, resid_ = distributed.gather_cat([torch.cat(cls) if cls else None,
                                                        torch.cat(labels) if labels else None,
                                                        torch.cat(resid) if resid else None])
        cls, labels, resid = ([t] if t is not None else [] for t in (cls_, labels_, resid_))
        cls = [c.to(model.device) for c in cls]
        n_skipped = distributed.sum_int(n_skipped)
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
        # Blocks after the hook are backbone work: under torchrun each rank runs its block of the batch grid.
        split = cached.resid_NTD is not None and distributed.active()
        starts = [b[0] for b in distributed.batch_block(len(cls_ND), batch_size)] if split else \
            range(0, len(cls_ND), batch_size)
        for i in starts:
            c = cls_ND[i:i + batch_size].to(model.device, model.cfg.dtype)
            if cached.resid_NTD is None:
                out.append(model.head(c))
            else:
                r = cached.resid_NTD[i:i + batch_size].to(model.device).clone()
                r[:, 0] = c
                out.append(model.head(model.run_blocks(r, cached.start_block)))
        if split:
            return distributed.gather_cat([torch.cat(out) if out else None], model.device)[0]
        return torch.cat(out)

    return tail


@dataclass(frozen=True)
class MethodSpec:
    """One row of the results: a registered method with its settings, under a row label."""

    label: str
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)


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
                 fvu_threshold: float | None = None, gate_methods: Sequence[str] = DEFAULT_GATED_METHODS,
                 prepare: Sequence[str] = ()):
        if sae is not None:
            hook_name = sae_hook_name(sae, hook_name)
            check_sae_fits_hook(sae, model, hook_name)
            check_sae_positions(sae, "cls", "by the evaluation runner (it steers the CLS token)")
        hook_name = hook_name or model.steer_hook
        _hook_cut(model, hook_name)  # a hook the runner cannot cache fails before the backbone pass
        self.model, self.data, self.sae, self.classifier = model, data, sae, classifier
        self.default_settings: dict[str, Any] = {"fvu_threshold": fvu_threshold}
        self.gate_methods = tuple(gate_methods)
        self.ctx = MethodContext(model, classifier, sae, hook_name, data, lambda t: t, batch_size, num_workers,
                                 show_progress, dict(options or {}))
        for name in dict.fromkeys(prepare):  # each method's own checks, before the backbone pass
            check = get_method(name).prepare
            if check is not None:
                check(self.ctx)
        if distributed.active():  # torchrun: every rank must evaluate the same model, SAE and images
            distributed.check_same("evaluation request", _request_fingerprint(model, data, sae, hook_name, batch_size))
        self.cached = cache_hook_tokens(model, data, hook_name, batch_size, num_workers, show_progress)
        self.n_backbone_passes = 1
        self.n_image_forwards = len(self.cached.labels_N)  # every image-tower forward, methods' own included
        self.ctx.tokens_to_embeds = make_tower_tail(model, self.cached, batch_size)
        self.ctx.zeroshot_embeds_NE = self.ctx.tokens_to_embeds(self.cached.cls_ND)
        self.zeroshot: ZeroShotResult = self._classify_embeds(self.ctx.zeroshot_embeds_NE)

    @property
    def labels_N(self) -> torch.Tensor:
        return self.cached.labels_N

    @property
    def tokens_ND(self) -> torch.Tensor:
        """The evaluation images' CLS tokens at the hook, from the one backbone pass."""
        return self.cached.cls_ND

    @property
    def backbone_seconds(self) -> float:
        return self.cached.seconds

    def embed_tokens(self, tokens_ND: torch.Tensor) -> torch.Tensor:
        """Image embeddings of (edited) hook tokens: the rest of the tower, as every method uses it."""
        return self.ctx.tokens_to_embeds(tokens_ND)

    def _classify_tokens(self, tokens_ND: torch.Tensor) -> ZeroShotResult:
        return self._classify_embeds(self.ctx.tokens_to_embeds(tokens_ND))

    def _classify_embeds(self, embeds_NE: torch.Tensor) -> ZeroShotResult:
        return accuracy_metrics(self.classifier.logits(embeds_NE).cpu(), self.labels_N.cpu(), self.cached.n_skipped)

    @torch.no_grad()
    def score(self, spec: MethodSpec | str) -> MethodScores:
        spec = _as_specs([spec])[0]
        method = get_method(spec.method)
        settings = {**self.default_settings, **spec.settings}
        if spec.method not in self.gate_methods and "fvu_threshold" not in spec.settings:
            settings["fvu_threshold"] = None  # the gate is per method (the paper gates VS2 only)
        if method.needs_sae:
            self.ctx.require_sae(spec.method)
        t0 = time.perf_counter()
        self.ctx.oracle_labels_N = self.labels_N if method.uses_eval_labels else None
        try:
            if method.kind == "pass":
                result, coverage, info = self._score_pass(method, settings)
            else:
                out = method.fn(self.cached.cls_ND, self.ctx, **settings)
                if not isinstance(out, MethodOutput) or sum(o is not None for o in (out.tokens, out.embeds, out.logits)) != 1:
                    raise TypeError(f"method {spec.method!r} must return a MethodOutput with tokens, embeds or logits")
                if out.logits is not None:
                    result = accuracy_metrics(out.logits.cpu(), self.labels_N.cpu(), self.cached.n_skipped)
                else:
                    result = self._classify_tokens(out.tokens) if out.embeds is None else self._classify_embeds(out.embeds)
                coverage, info = out.coverage, out.info
                if out.image_forwards:  # a method's own forwards (TPT's views), per image in results.json
                    self.n_image_forwards += out.image_forwards
                    info = {**info, "image_forwards_per_image": out.image_forwards / len(self.labels_N)}
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
        if distributed.active():
            result, coverage_fn = self._distributed_pass(hooks, coverage_fn)
        else:
            loader = make_loader(self.data, self.ctx.batch_size, self.ctx.num_workers)
            result = self.classifier.evaluate(self.model, loader, fwd_hooks=hooks, show_progress=self.ctx.show_progress)
        self.n_backbone_passes += 1
        self.n_image_forwards += len(self.labels_N)
        return result, coverage_fn(), {"hooks": [h for h, _ in hooks]}


    def _distributed_pass(self, hooks: list, coverage_fn: Callable[[], float]) -> tuple[ZeroShotResult, Callable[[], float]]:
        """A hooked pass under torchrun: each rank classifies its block of the batch grid, the logits are
        gathered in order and scored once. Coverage is the image-weighted mean of the ranks' coverages
        (equal to one process's up to float rounding)."""
        loader = distributed.shard_loader(self.data, self.ctx.batch_size, self.ctx.num_workers)
        logits, labels, n_skipped = [], [], 0
        with torch.no_grad(), self.model.hooks(fwd_hooks=list(hooks)):
            for batch in tqdm(loader, desc="zero-shot", disable=not self.ctx.show_progress, unit="batch"):
                n_skipped += batch.n_skipped
                if len(batch.labels):
                    logits.append(self.classifier.logits(self.model.encode_image(batch.images.to(self.model.device))).cpu())
                    labels.append(batch.labels)
        n_mine = sum(len(t) for t in labels)
        cov = coverage_fn() if n_mine else 0.0
        logits_, labels_ = distributed.gather_cat([torch.cat(logits) if logits else None,
                                                   torch.cat(labels) if labels else None])
        weighted = distributed.all_gather_object((n_mine, cov))
        if logits_ is None:
            raise ValueError("no images were evaluated (the data set is empty or every image was unreadable)")
        total = sum(n for n, _ in weighted)
        coverage = sum(n * c for n, c in weighted if n) / total
        return accuracy_metrics(logits_, labels_, distributed.sum_int(n_skipped)), lambda: coverage


def _request_fingerprint(model: HookedCLIP, data: ImageDataset, sae: SAE | None, hook_name: str,
                         batch_size: int) -> dict[str, Any]:
    """What the ranks of a distributed evaluation must agree on (compared by `distributed.check_same`)."""
    import hashlib

    from .activation_cache import dataset_fingerprint, model_fingerprint

    sae_hash = None
    if sae is not None:
        h = hashlib.sha256()
        for name, t in sae.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
        sae_hash = h.hexdigest()[:16]
    return {"model_name": model.cfg.model_name, "model_fingerprint": model_fingerprint(model), "sae": sae_hash,
            "hook_name": hook_name, "dataset": getattr(data, "dataset_id", None), "split": getattr(data, "split", None),
            "n_images": len(data), "dataset_fingerprint": dataset_fingerprint(data), "batch_size": batch_size}


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
             out_dir: str | Path | None = None,
             gate_methods: Sequence[str] = DEFAULT_GATED_METHODS,
             text_cache: str | Path | None = None) -> EvaluationResult:
    """Zero-shot accuracy of each method on `data`, with one backbone pass for all token methods.

    `lam`, `gamma` and `fvu_threshold` are the shared settings; a `MethodSpec` can override them per
    row. The gate (`fvu_threshold`) applies to the methods named in `gate_methods` only (default VS2,
    as in the paper); each method's inputs are checked before the backbone pass. The zero-shot row is always included (it is the reference for Δtop-1). With `out_dir`,
    writes `results.json`, `results.md` and per-class plots there. `text_cache`: a folder for the
    class-prompt embeddings (`text_cache.py`), used when no `classifier` is given.
    """
    from .ood_datasets import dataset_templates
    from .zeroshot_resources import DEFAULT_TEMPLATES

    specs = _as_specs(methods)
    for spec in specs:  # fail before the backbone runs
        if sae is None and get_method(spec.method).needs_sae:
            raise ValueError(f"method {spec.method!r} needs an SAE (--sae)")
    if "zeroshot" not in [s.label for s in specs]:
        specs.insert(0, MethodSpec("zeroshot", "zeroshot"))
    t_start = time.perf_counter()
    if classifier is None:
        templates = templates or dataset_templates(data, DEFAULT_TEMPLATES.get(data.dataset_id, "single"))
        classifier = ZeroShotClassifier(model, data.classnames, templates, show_progress=show_progress,
                                        text_cache=text_cache)
    t_text = time.perf_counter() - t_start
    ev = Evaluator(model, data, sae, classifier, hook_name, batch_size, num_workers, show_progress, options,
                   fvu_threshold, gate_methods, prepare=[s.method for s in specs])
    ev.default_settings.update(lam=lam, gamma=gamma)
    rows = {}
    for spec in specs:
        rows[spec.label] = ev.score(spec)
    # Put zero-shot first whatever the order asked for.
    rows = {"zeroshot": rows["zeroshot"], **{k: v for k, v in rows.items() if k != "zeroshot"}}
    timing = {"text_s": t_text, "text_cache": getattr(classifier, "text_cache_status", "off"), "backbone_s": ev.cached.seconds, "n_backbone_passes": ev.n_backbone_passes,
              "n_image_forwards": ev.n_image_forwards,
              "methods_s": {k: v.seconds for k, v in rows.items()}, "total_s": time.perf_counter() - t_start,
              "n_images": len(ev.labels_N)}
    identity = model_identity(model)  # model identity fields: see identity.model_identity
    gated = [label for label, row in rows.items() if row.settings.get("fvu_threshold") is not None]
    cfg = {
        "model": identity.pop("model_name"), **identity, "dataset": data.dataset_id,
        "split": data.split, "n_images": len(ev.labels_N), "n_skipped": ev.cached.n_skipped,
        "hook_name": ev.cached.hook_name, "lam": lam, "gamma": gamma, "fvu_threshold": fvu_threshold,
        "gated_methods": gated,
        "templates": templates if isinstance(templates, (str, type(None))) else list(templates),
        "methods": [s.label for s in specs], **_sae_summary(sae), **(config or {}),
    }
    result = EvaluationResult(cfg, list(data.classnames), rows, timing, ev.labels_N.cpu().numpy())
    if out_dir is not None and distributed.is_main():  # under torchrun only rank 0 writes
        result.save(out_dir)
    return result


def _sae_summary(sae: SAE | None) -> dict[str, Any]:
    if sae is None:
        return {}
    meta = sae.cfg.metadata
    return {"sae": {"architecture": sae.cfg.architecture(), "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                    "k": getattr(sae.cfg, "k", None), "hook_name": meta.get("hook_name"),
                    "positions": meta.get("positions"), "dataset": meta.get("dataset"),
                    "heldout_fvu": meta.get("heldout_fvu")}}


def sweep_vs2(evaluator: Evaluator, lams: Sequence[float], gammas: Sequence[float], selected_on: str = "eval",
              fvu_threshold: float | None = None, show_progress: bool = True, method: str = "vs2") -> SweepResult:
    """VS2 (or another lam/gamma method, e.g. `vs2pp`) top-1 over a lam x gamma grid on the evaluator's
    cached tokens (no extra backbone pass)."""
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
        s = evaluator.score(MethodSpec(method, method, settings))
        top1[gi, li], cov[gi, li] = s.top1, s.coverage
    return SweepResult([float(v) for v in lams], [float(v) for v in gammas], top1, cov, evaluator.zeroshot.top1,
                       selected_on, len(evaluator.labels_N), time.perf_counter() - t0)


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


def _nan_to_none(a: np.ndarray) -> list[float | None]:  # kept for older imports
    return [None if v != v else v for v in np.asarray(a, dtype=float).tolist()]


__all__ = [
    "DEFAULT_METHODS", "EvaluationResult", "Evaluator", "HookTokens", "METHODS", "Method", "MethodContext",
    "MethodOutput", "MethodScores", "MethodSpec", "SweepResult", "cache_hook_tokens", "evaluate", "format_table",
    "get_method", "load_sae", "make_tower_tail", "plot_per_class_changes", "plot_sweep_heatmap", "register_method",
    "sweep_vs2",
]
