"""The runner: `Evaluator` holds one backbone pass of an evaluation set and scores any number of
methods on it; `evaluate` is the one-call form that also writes results; `sweep_vs2` scores a lam x gamma grid."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from ..core import distributed
from ..core.errors import UsageError
from ..core.identity import (
    dataset_fingerprint,
    model_fingerprint,
    model_identity,
    tensors_fingerprint,
)
from ..data import shard_loader
from ..data.base import ImageDataset, make_loader
from ..sae.metadata import check_sae_fits_hook, check_sae_positions, sae_hook_name
from ..sae.splice import HookedCLIP
from ..steering.hooks import TokenIntervention
from ..steering.vs2 import PAPER_GAMMA, PAPER_LAM
from ..zeroshot.classifier import ZeroShotClassifier, ZeroShotResult, accuracy_metrics
from .protocol import Protocol, Protocols, check_templates_name, resolve, run_classifier
from .registry import (
    DEFAULT_GATED_METHODS,
    DEFAULT_METHODS,
    Method,
    MethodContext,
    MethodOutput,
    get_method,
)
from .results import EvaluationResult, MethodScores, SweepResult
from .tokens import cache_hook_tokens, hook_cut, make_tower_tail


FVU_HARM_METHODS = ("vs2", "vs2_ens")  # rows whose per-image flips are set against FVU (results: fvu_harm)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the results: a registered method with its settings, under a row label."""

    label: str
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- the runner
def _scores(result: ZeroShotResult, base: ZeroShotResult | None, coverage: float, settings: Mapping[str, Any],
            seconds: float, info: dict[str, Any], protocol: Protocol | None = None,
            same: ZeroShotResult | None = None) -> MethodScores:
    """A row's scores. `base` is the run's zero-shot row (Δtop-1); `same` zero-shot under the row's own
    prompt protocol (Δtop-1 against the same prompts)."""
    return MethodScores(
        top1=result.top1, top5=result.top5, mean_per_class=result.mean_per_class,
        delta_top1=result.top1 - (base.top1 if base is not None else result.top1), coverage=coverage,
        per_class_acc=result.per_class_acc, settings=dict(settings), seconds=seconds,
        predictions=result.predictions, info=info,
        templates=None if protocol is None else protocol.record(),
        prompts="" if protocol is None else protocol.label,
        n_templates=None if protocol is None else len(protocol.templates),
        zeroshot_same_prompts=None if same is None else same.top1)


def _as_specs(methods: Iterable[str | MethodSpec]) -> list[MethodSpec]:
    specs = [m if isinstance(m, MethodSpec) else MethodSpec(m, m) for m in methods]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UsageError(f"duplicate method labels: {labels}")
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
        hook_cut(model, hook_name)  # a hook the runner cannot cache fails before the backbone pass
        self.model, self.data, self.sae, self.classifier = model, data, sae, classifier
        self.protocols = Protocols(model, data, classifier, show_progress)
        self.default_settings: dict[str, Any] = {"fvu_threshold": fvu_threshold}
        self.gate_methods = tuple(gate_methods)
        self.ctx = MethodContext(model, classifier, sae, hook_name, data, lambda t: t, batch_size, num_workers,
                                 show_progress, dict(options or {}), run_classifier=classifier)
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
        self._zeroshot_by_templates = {self.protocols.run.templates: self.zeroshot}

    def zeroshot_under(self, protocol: Protocol) -> ZeroShotResult:
        """Zero-shot of the shared pass under `protocol`'s prompts (the run's zero-shot for no prompts)."""
        if not protocol.uses_prompts:
            return self.zeroshot
        if protocol.templates not in self._zeroshot_by_templates:
            clf = self.protocols.classifier(protocol)
            self._zeroshot_by_templates[protocol.templates] = self._classify_embeds(self.ctx.zeroshot_embeds_NE, clf)
        return self._zeroshot_by_templates[protocol.templates]

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

    def _classify_tokens(self, tokens_ND: torch.Tensor, classifier: ZeroShotClassifier | None = None) -> ZeroShotResult:
        return self._classify_embeds(self.ctx.tokens_to_embeds(tokens_ND), classifier)

    def _classify_embeds(self, embeds_NE: torch.Tensor, classifier: ZeroShotClassifier | None = None) -> ZeroShotResult:
        clf = classifier or self.classifier
        return accuracy_metrics(clf.logits(embeds_NE).cpu(), self.labels_N.cpu(), self.cached.n_skipped)

    def protocol_for(self, spec: MethodSpec) -> Protocol:
        """The row's prompt protocol: `settings["templates"]`, else the method's own, else the run's."""
        return self.protocols.resolve(spec.settings.get("templates") or get_method(spec.method).templates)

    @torch.no_grad()
    def score(self, spec: MethodSpec | str) -> MethodScores:
        spec = _as_specs([spec])[0]
        method = get_method(spec.method)
        protocol = self.protocol_for(spec)
        settings = {**self.default_settings, **spec.settings}
        settings.pop("templates", None)  # the protocol, resolved above: recorded apart from the settings
        gated = spec.method in self.gate_methods or (method.gate_as is not None and method.gate_as in self.gate_methods)
        if not gated and "fvu_threshold" not in spec.settings:
            settings["fvu_threshold"] = None  # the gate is per method (the paper gates VS2 only)
        if method.needs_sae:
            self.ctx.require_sae(spec.method)
        clf = self.protocols.classifier(protocol)
        t0 = time.perf_counter()
        self.ctx.oracle_labels_N = self.labels_N if method.uses_eval_labels else None
        self.ctx.classifier = clf  # the method sees its own protocol's head (pseudo-labels, TPT's class names)
        try:
            if method.kind == "pass":
                result, coverage, info = self._score_pass(method, settings, clf)
            else:
                out = method.fn(self.cached.cls_ND, self.ctx, **settings)
                if not isinstance(out, MethodOutput) or sum(o is not None for o in (out.tokens, out.embeds, out.logits)) != 1:
                    raise TypeError(f"method {spec.method!r} must return a MethodOutput with tokens, embeds or logits")
                if out.logits is not None:
                    result = accuracy_metrics(out.logits.cpu(), self.labels_N.cpu(), self.cached.n_skipped)
                elif out.embeds is None:
                    result = self._classify_tokens(out.tokens, clf)
                else:
                    result = self._classify_embeds(out.embeds, clf)
                coverage, info = out.coverage, out.info
                if out.image_forwards:  # a method's own forwards (TPT's views), per image in results.json
                    self.n_image_forwards += out.image_forwards
                    info = {**info, "image_forwards_per_image": out.image_forwards / len(self.labels_N)}
        finally:
            self.ctx.oracle_labels_N = None
            self.ctx.classifier = self.classifier
        if method.uses_labels:
            info = {**info, "uses_labels": method.uses_labels}
        if spec.method in FVU_HARM_METHODS and self.sae is not None:  # does FVU predict when steering hurts?
            info = {**info, "fvu_harm": self._fvu_harm(result, protocol, settings)}
        return _scores(result, self.zeroshot, coverage, _json_settings(settings, method), time.perf_counter() - t0, info,
                       protocol, self.zeroshot_under(protocol))

    def _fvu_harm(self, result: ZeroShotResult, protocol: Protocol, settings: dict[str, Any]) -> dict[str, Any]:
        """Per-image FVU against VS2's flips (vs zero-shot with the same prompts): `fvu_harm.py`."""
        from ..sae.metadata import activation_mean
        from ..training.fvu import fvu_of_reconstruction, per_sample_fvu_on_cache
        from .fvu_harm import fvu_harm
        from .methods.builtin import sae_reconstruction

        sae, scratch = self.sae, self.ctx.scratch
        if "eval_fvu" not in scratch:  # from the reconstruction VS2 already made (no second SAE pass)
            x = self.cached.cls_ND.to(sae.device, sae.dtype)
            rec = sae_reconstruction(self.cached.cls_ND, self.ctx, sae)
            scratch["eval_fvu"] = fvu_of_reconstruction(x, rec.to(x.dtype), activation_mean(sae).to(x)).double().cpu().numpy()
        if "reference_fvu" not in scratch:  # the unlabeled training rows the gate is calibrated on, if given
            ref = self.ctx.options.get("fvu_reference") or self.ctx.options.get("pool_cache")
            try:
                scratch["reference_fvu"] = None if ref is None else per_sample_fvu_on_cache(sae, ref, self.cached.hook_name)
            except (KeyError, ValueError, OSError):  # another hook or no such store: no reference quantile
                scratch["reference_fvu"] = None
        return fvu_harm(scratch["eval_fvu"], self.zeroshot_under(protocol).predictions, result.predictions,
                        self.labels_N.cpu().numpy(), settings.get("fvu_threshold"), scratch["reference_fvu"],
                        used_quantile=self.ctx.options.get("fvu_quantile"))

    def _score_pass(self, method: Method, settings: dict[str, Any], clf: ZeroShotClassifier,
                    ) -> tuple[ZeroShotResult, float, dict[str, Any]]:
        made = method.fn(self.ctx, **settings)
        if isinstance(made, TokenIntervention):
            hooks, coverage_fn = made.fwd_hooks(self.model), lambda: made.total_coverage
            made.reset_coverage()
        else:
            hooks, coverage_fn = list(made), lambda: float("nan")
        if distributed.active():
            result, coverage_fn = self._distributed_pass(hooks, coverage_fn, clf)
        else:
            loader = make_loader(self.data, self.ctx.batch_size, self.ctx.num_workers, self.model.device.type == "cuda")
            result = clf.evaluate(self.model, loader, fwd_hooks=hooks, show_progress=self.ctx.show_progress)
        self.n_backbone_passes += 1
        self.n_image_forwards += len(self.labels_N)
        return result, coverage_fn(), {"hooks": [h for h, _ in hooks]}


    def _distributed_pass(self, hooks: list, coverage_fn: Callable[[], float], clf: ZeroShotClassifier,
                          ) -> tuple[ZeroShotResult, Callable[[], float]]:
        """A hooked pass under torchrun: each rank classifies its block of the batch grid, the logits are
        gathered in order and scored once. Coverage is the image-weighted mean of the ranks' coverages
        (equal to one process's up to float rounding)."""
        loader = shard_loader(self.data, self.ctx.batch_size, self.ctx.num_workers, self.model.device.type == "cuda")
        logits, labels, n_skipped = [], [], 0
        with torch.no_grad(), self.model.hooks(fwd_hooks=list(hooks)):
            for batch in tqdm(loader, desc="zero-shot", disable=not self.ctx.show_progress, unit="batch"):
                n_skipped += batch.n_skipped
                if len(batch.labels):
                    logits.append(clf.logits(self.model.encode_image(batch.images.to(self.model.device, non_blocking=True))).cpu())
                    labels.append(batch.labels)
        n_mine = sum(len(t) for t in labels)
        cov = coverage_fn() if n_mine else 0.0
        logits_, labels_ = distributed.gather_cat([torch.cat(logits) if logits else None,
                                                   torch.cat(labels) if labels else None])
        weighted = distributed.all_gather_object((n_mine, cov))
        if logits_ is None:
            raise UsageError("no images were evaluated (the data set is empty or every image was unreadable)")
        total = sum(n for n, _ in weighted)
        coverage = sum(n * c for n, c in weighted if n) / total
        return accuracy_metrics(logits_, labels_, distributed.sum_int(n_skipped)), lambda: coverage


def _request_fingerprint(model: HookedCLIP, data: ImageDataset, sae: SAE | None, hook_name: str,
                         batch_size: int) -> dict[str, Any]:
    """What the ranks of a distributed evaluation must agree on (compared by `distributed.check_same`)."""
    sae_hash = None if sae is None else tensors_fingerprint(sae.state_dict())
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
    specs = _as_specs(methods)
    check_templates_name(templates)
    for spec in specs:  # fail before the backbone runs
        if sae is None and get_method(spec.method).needs_sae:
            raise UsageError(f"method {spec.method!r} needs an SAE; give one as sae", arguments=("sae",))
        resolve(spec.settings.get("templates") or get_method(spec.method).templates, data, Protocol(()))
    if "zeroshot" not in [s.label for s in specs]:
        specs.insert(0, MethodSpec("zeroshot", "zeroshot"))
    t_start = time.perf_counter()
    if classifier is None:
        classifier = run_classifier(model, data, templates, show_progress, text_cache)
    t_text = time.perf_counter() - t_start
    ev = Evaluator(model, data, sae, classifier, hook_name, batch_size, num_workers, show_progress, options,
                   fvu_threshold, gate_methods, prepare=[s.method for s in specs])
    ev.default_settings.update(lam=lam, gamma=gamma)
    rows = {}
    for spec in specs:
        rows[spec.label] = ev.score(spec)
    # Put zero-shot first whatever the order asked for.
    rows = {"zeroshot": rows["zeroshot"], **{k: v for k, v in rows.items() if k != "zeroshot"}}
    timing = {"text_s": t_text, "text_cache": getattr(classifier, "text_cache_status", "off"),
              **({"text_cache_protocols": ev.protocols.status} if ev.protocols.status else {}), "backbone_s": ev.cached.seconds, "n_backbone_passes": ev.n_backbone_passes,
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
        "templates": ev.protocols.run.record(), "n_templates": len(ev.protocols.run.templates),
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
        raise UsageError("the sweep needs at least one lam and one gamma")
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
