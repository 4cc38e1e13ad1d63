"""VS2++ and the retrieval baselines as methods of the evaluation runner (`vision-steer eval`).

Registered methods (all need `options["pool_cache"]`, an activation cache of the unlabeled training
split at the SAE's hook, made with the same model):

| method | S+ rule | labels at test time |
|---|---|---|
| `vs2pp` | `query` (pseudo-label of the query) | none |
| `vs2pp_majority` | `majority` (most frequent pseudo-label) | none |
| `vs2pp_oracle` | `oracle` (true label of the query) | yes: oracle upper bound |
| `clip_steer` | `query` | none |
| `clip_steer_oracle` | `oracle` | yes: oracle upper bound |
| `weighted_rag` | all N neighbours | none |
| `weighted_rag_oracle` | `oracle` S+ only | yes: oracle upper bound |

The pool (its activations, CLIP embeddings `model.head(cls)`, pseudo-labels, SAE code directions)
and the neighbours of the evaluation set are computed once per run and shared by every method and
setting (`ctx.scratch`). Options (`ctx.options`, CLI flags of `vision-steer eval`): `pool_cache`,
`n_neighbours` (50), `retrieval_backend` (`exact`), `pool_retrieval_embeds` and
`query_retrieval_embeds` (`.npy` files of another embedding, e.g. DINOv2, aligned with the pool
cache's rows and with the evaluation set), or `retrieval_backbone` (a `HookedCLIP` or any name
`load_retrieval_backbone` takes, e.g. `dinov2-base`; with `retrieval_pretrained`,
`retrieval_random_weights`, `retrieval_model_kwargs`, `retrieval_cache`: the pool and the queries are
embedded once and cached, see `retrieval_backbone.py`), `rag_alpha` (0.5), `vs2pp_fallback` (`vs2`).

Kept apart from `vs2pp.py` so that the steering code does not import the evaluation runner (the
runner imports the steering package, and this module imports both).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.errors import MissingInputError, UsageError
from ...retrieval.index import DEFAULT_N_NEIGHBOURS, Neighbours
from ...sae.metadata import activation_mean
from ...steering.vs2 import PAPER_GAMMA, PAPER_LAM
from ...steering.vs2pp import (
    DEFAULT_RAG_ALPHA,
    ORACLE_RULES,
    VS2PP,
    NeighbourSplit,
    RetrievalPool,
    SplitCounter,
    VS2PPConfig,
    build_retrieval_pool,
    clip_steer_embeds,
    rule_label,
    split_neighbours,
    weighted_rag_embeds,
)
from ...training.fvu import per_sample_fvu
from ..registry import MethodContext, MethodOutput, register_method
from .pool import check_pool_cache


# ---------------------------------------------------------------------------------- the pool
@torch.no_grad()
def load_pool_from_cache(cache_dir: str | Path, model, classifier, hook_name: str, sae=None,
                         retrieval_embeds: np.ndarray | None = None, backend: str = "exact",
                         batch_size: int = 1024, eval_data=None, other_dataset: bool = False,
                         **index_kwargs: Any) -> RetrievalPool:
    """A `RetrievalPool` from an activation cache of the pool images (CLS rows at the SAE's hook).

    CLIP embeddings come from the cache's `hook_image_embed` when it holds one, else from
    `model.head` on the final block's CLS. The model must be the one that made the cache (checked by
    weight fingerprint): pseudo-labels and retrieval embeddings are computed with it.
    """
    cache = check_pool_cache(cache_dir, model, hook_name, sae, eval_data, other_dataset)
    acts = cache.load(hook_name)
    final = model.steer_hook
    if "hook_image_embed" in cache.hook_names:
        clip = cache.load("hook_image_embed")
    elif final in cache.hook_names:
        cls = acts if hook_name == final else cache.load(final)
        clip = torch.cat([model.head(cls[i:i + batch_size].to(model.device)).float().cpu()
                          for i in range(0, len(cls), batch_size)])
    else:
        raise UsageError(f"the pool cache {cache_dir} has neither hook_image_embed nor {final}: cannot compute the "
                         "pool's CLIP embeddings for pseudo-labels")
    if retrieval_embeds is not None and len(retrieval_embeds) != len(acts):
        raise UsageError(f"pool retrieval embeddings have {len(retrieval_embeds)} rows, the pool cache {len(acts)}")
    return build_retrieval_pool(classifier, clip, sae=sae, acts_PD=acts if sae is not None else None,
                                labels_P=cache.labels, retrieval_embeds_PE=retrieval_embeds, backend=backend,
                                batch_size=batch_size, **index_kwargs)


def _check_pool_options(ctx: MethodContext) -> None:
    """Before the backbone pass: the pool cache exists and fits, and the retrieval embeddings are paired."""
    pool_dir = ctx.options.get("pool_cache")
    if not pool_dir:
        raise UsageError("VS2++ and the retrieval baselines retrieve neighbours from a pool: give the training "
                         "split's activation cache (--pool-cache DIR)")
    if (ctx.options.get("query_retrieval_embeds") is None) != (ctx.options.get("pool_retrieval_embeds") is None):
        raise UsageError("a custom retrieval embedding needs both the pool's and the queries' arrays "
                         "(--pool-retrieval-embeds and --query-retrieval-embeds)")
    if ctx.options.get("retrieval_backbone") is not None and ctx.options.get("pool_retrieval_embeds") is not None:
        raise UsageError("give --retrieval-backbone or precomputed embeddings (--pool-retrieval-embeds and "
                         "--query-retrieval-embeds), not both")
    for key, what in (("pool_retrieval_embeds", "pool retrieval embeddings"),
                      ("query_retrieval_embeds", "query retrieval embeddings")):
        if ctx.options.get(key) is not None:
            _load_npy(ctx.options[key], what)
    n = ctx.options.get("n_neighbours")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageError(f"n_neighbours must be a positive whole number, got {n!r}", arguments=("n_neighbours",))
    hook = ctx.hook_name or ctx.model.steer_hook
    check_pool_cache(pool_dir, ctx.model, hook, ctx.sae, ctx.data, bool(ctx.options.get("pool_other_dataset")))
    if ctx.options.get("retrieval_backbone") is not None:
        _retrieval_backbone(ctx)  # loads the backbone and checks its cache folder, before the backbone pass


def _retrieval_backbone(ctx: MethodContext):
    """`(backbone, cache folder)` for `options["retrieval_backbone"]`, loaded once per run."""
    from ...retrieval.backbone import load_retrieval_backbone, open_retrieval_cache

    if "retrieval_backbone" not in ctx.scratch:
        o, model = ctx.options, ctx.options["retrieval_backbone"]
        if isinstance(model, str):
            model = load_retrieval_backbone(model, o.get("retrieval_pretrained"), ctx.model.device,
                                            bool(o.get("retrieval_random_weights")), int(o.get("seed") or 0),
                                            o.get("retrieval_model_kwargs"))
        folder = open_retrieval_cache(model, o["pool_cache"], o.get("retrieval_cache"))
        ctx.scratch["retrieval_backbone"] = (model, folder)
        ctx.scratch["retrieval_features"] = {"retrieval_backbone": model.cfg.model_name,
                                             "retrieval_backbone_fingerprint": folder.backbone["model_fingerprint"],
                                             "retrieval_cache": str(folder.root)}
    return ctx.scratch["retrieval_backbone"]


def _backbone_embeds(ctx: MethodContext, role: str, n_rows: int) -> np.ndarray:
    """The pool's (`role="pool"`) or the evaluation set's retrieval embeddings from the backbone (cached)."""
    from ...retrieval.backbone import (
        pool_retrieval_embeddings,
        query_retrieval_embeddings,
    )

    backbone, folder = _retrieval_backbone(ctx)
    kw = dict(batch_size=ctx.batch_size, num_workers=ctx.num_workers, show_progress=ctx.show_progress)
    r = (pool_retrieval_embeddings(backbone, ctx.options["pool_cache"], folder=folder, **kw) if role == "pool"
         else query_retrieval_embeddings(backbone, ctx.data, folder, **kw))
    if len(r.embeds) != n_rows:
        raise UsageError(f"the retrieval backbone embedded {len(r.embeds)} {role} images, expected {n_rows}")
    ctx.scratch["retrieval_features"].update({f"{role}_feature_s": r.seconds, f"{role}_features_cached": r.cached})
    return r.embeds


def _load_npy(path: str | Path, what: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"{what} file {p} does not exist")
    arr = np.load(p, allow_pickle=False)
    if arr.ndim != 2:
        raise UsageError(f"{what} must be a 2-D [rows, dim] array, {p} has shape {arr.shape}")
    return arr


def _pool(ctx: MethodContext, method: str, with_sae: bool) -> RetrievalPool:
    """The run's pool, built once and shared by all methods (with the SAE's code directions when the
    run has an SAE, so that VS2++ and the baselines use the same index and neighbours)."""
    if "vs2pp_pool" not in ctx.scratch:
        pool_dir = ctx.options.get("pool_cache")
        if not pool_dir:
            raise UsageError(f"method {method!r} retrieves neighbours from a pool: give the training split's "
                             "activation cache (--pool-cache DIR)")
        embeds = ctx.options.get("pool_retrieval_embeds")
        t0 = time.perf_counter()
        embeds = None if embeds is None else _load_npy(embeds, "pool retrieval embeddings")
        if ctx.options.get("retrieval_backbone") is not None:
            from ...activation_cache import ActivationStore

            embeds = _backbone_embeds(ctx, "pool", ActivationStore.open(pool_dir).n_rows)
        ctx.scratch["vs2pp_pool"] = load_pool_from_cache(
            pool_dir, ctx.model, ctx.classifier,
            ctx.hook_name or ctx.model.steer_hook, sae=ctx.sae,
            retrieval_embeds=embeds,
            backend=ctx.options.get("retrieval_backend") or "exact", eval_data=ctx.data,
            other_dataset=bool(ctx.options.get("pool_other_dataset")))
        if ctx.options.get("retrieval_backbone") is not None:  # name the embedding in every output
            ctx.scratch["vs2pp_pool"] = dataclasses.replace(
                ctx.scratch["vs2pp_pool"], retrieval_embedding=ctx.scratch["retrieval_features"]["retrieval_backbone"])
        ctx.scratch["vs2pp_pool_build_s"] = time.perf_counter() - t0
    pool = ctx.scratch["vs2pp_pool"]
    if with_sae:
        ctx.require_sae(method)
    return pool


def _query_embeds(ctx: MethodContext, n_queries: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(clip_QE, retrieval_QE or None)` for the evaluation set."""
    clip = ctx.zeroshot_embeds_NE
    if clip is None:
        raise RuntimeError("the evaluation runner did not provide the evaluation set's CLIP embeddings")
    path = ctx.options.get("query_retrieval_embeds")
    if (path is None) != (ctx.options.get("pool_retrieval_embeds") is None):
        raise UsageError("a custom retrieval embedding needs both the pool's and the queries' arrays "
                         "(--pool-retrieval-embeds and --query-retrieval-embeds)")
    if ctx.options.get("retrieval_backbone") is not None:
        if "vs2pp_query_retrieval" not in ctx.scratch:
            ctx.scratch["vs2pp_query_retrieval"] = torch.as_tensor(_backbone_embeds(ctx, "query", n_queries)).float()
        return clip, ctx.scratch["vs2pp_query_retrieval"]
    if path is None:
        return clip, None
    if "vs2pp_query_retrieval" not in ctx.scratch:
        arr = _load_npy(path, "query retrieval embeddings")
        if len(arr) != n_queries:
            raise UsageError(f"query retrieval embeddings have {len(arr)} rows but {n_queries} images were evaluated "
                             "(rows must align with the evaluation set, no image skipped)")
        ctx.scratch["vs2pp_query_retrieval"] = torch.as_tensor(arr).float()
    return clip, ctx.scratch["vs2pp_query_retrieval"]


def _neighbours(ctx: MethodContext, pool: RetrievalPool, n: int, n_queries: int) -> tuple[Neighbours, dict[str, Any]]:
    """The evaluation set's neighbours, searched once per (pool, n) and shared by all methods."""
    key = ("vs2pp_neighbours", id(pool.index), n)
    if key not in ctx.scratch:
        clip, retrieval = _query_embeds(ctx, n_queries)
        queries = (clip if retrieval is None else retrieval).float().cpu()
        t0 = time.perf_counter()
        nb = pool.index.search(queries, n)
        dt = time.perf_counter() - t0
        ctx.scratch[key] = (nb, {
            "n_neighbours": n, "pool_size": pool.n_items, "retrieval_embedding": pool.retrieval_embedding,
            "retrieval_backend": type(pool.index).__name__, "retrieval_s": dt,
            "retrieval_s_per_1000_queries": 1000 * dt / max(len(queries), 1),
            **ctx.scratch.get("retrieval_features", {}),
        })
    return ctx.scratch[key]


def _settings(ctx: MethodContext) -> tuple[int, float, str]:
    n = ctx.options.get("n_neighbours")
    n = DEFAULT_N_NEIGHBOURS if n is None else int(n)  # 0 is refused by _check_pool_options, not replaced
    alpha = ctx.options.get("rag_alpha")
    return n, DEFAULT_RAG_ALPHA if alpha is None else float(alpha), ctx.options.get("vs2pp_fallback") or "vs2"


def _rule_info(rule: str, counter: SplitCounter | None) -> dict[str, Any]:
    info: dict[str, Any] = {"rule": rule_label(rule), "oracle_upper_bound": rule in ORACLE_RULES}
    if counter is not None:
        info["empty_set_fallback"] = counter.as_dict()
    return info


# ---------------------------------------------------------------------------------- VS2++
def _vs2pp(tokens_ND: torch.Tensor, ctx: MethodContext, rule: str, method: str, lam: float, gamma: float,
           fvu_threshold: float | None, preserve_norm: bool) -> MethodOutput:
    sae = ctx.require_sae(method)
    pool = _pool(ctx, method, with_sae=True)
    n, _, fallback = _settings(ctx)
    nb, nb_info = _neighbours(ctx, pool, n, len(tokens_ND))
    clip, retrieval = _query_embeds(ctx, len(tokens_ND))
    labels = ctx.oracle_labels_N if rule in ORACLE_RULES else None
    if rule in ORACLE_RULES and labels is None:
        raise RuntimeError(f"method {method!r} needs the evaluation labels (register it with uses_eval_labels=True)")
    engine = VS2PP(sae, pool, ctx.classifier, VS2PPConfig(n, rule, lam, gamma, fallback, preserve_norm))  # type: ignore[arg-type]
    mean_D = activation_mean(sae) if fvu_threshold is not None else None
    steered, changed = [], []
    for i in range(0, len(tokens_ND), ctx.batch_size):
        sl = slice(i, i + ctx.batch_size)
        x = tokens_ND[sl].to(sae.device)
        out = engine.steer(x, clip[sl], None if retrieval is None else retrieval[sl],
                           None if labels is None else labels[sl].cpu(),
                           Neighbours(nb.scores_QN[sl], nb.indices_QN[sl]))
        mask = torch.ones(len(x), dtype=torch.bool, device=x.device)
        if fallback == "none":
            mask &= ~out.split.fallback_Q.to(x.device)
        if fvu_threshold is not None:  # the VS2 gate: leave badly reconstructed images unsteered
            mask &= per_sample_fvu(x, sae, mean_D) <= fvu_threshold
        steered.append(torch.where(mask[:, None], out.steered, x))
        changed.append(mask)
    mask = torch.cat(changed)
    info = {**_rule_info(rule, engine.counter), **nb_info, "fallback_rule": fallback,
            "pool_build_s": ctx.scratch.get("vs2pp_pool_build_s")}
    return MethodOutput(tokens=torch.cat(steered), coverage=mask.float().mean().item(), info=info)


@register_method("vs2pp", prepare=_check_pool_options, description="VS2++: retrieval-guided VS2, S+ = neighbours sharing the query's pseudo-label")
def _vs2pp_query(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
                 fvu_threshold: float | None = None, preserve_norm: bool = True, **_: Any) -> MethodOutput:
    return _vs2pp(tokens_ND, ctx, "query", "vs2pp", lam, gamma, fvu_threshold, preserve_norm)


@register_method("vs2pp_majority", prepare=_check_pool_options, description="VS2++ with S+ = neighbours carrying the majority pseudo-label")
def _vs2pp_majority(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM,
                    gamma: float = PAPER_GAMMA, fvu_threshold: float | None = None, preserve_norm: bool = True,
                    **_: Any) -> MethodOutput:
    return _vs2pp(tokens_ND, ctx, "majority", "vs2pp_majority", lam, gamma, fvu_threshold, preserve_norm)


@register_method("vs2pp_oracle", prepare=_check_pool_options, uses_eval_labels=True,
                 description="VS2++ ORACLE upper bound: S+ = neighbours with the query's TRUE label (uses test labels)")
def _vs2pp_oracle(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
                  fvu_threshold: float | None = None, preserve_norm: bool = True, **_: Any) -> MethodOutput:
    return _vs2pp(tokens_ND, ctx, "oracle", "vs2pp_oracle", lam, gamma, fvu_threshold, preserve_norm)


# ---------------------------------------------------------------------------------- baselines
def _clip_steer(tokens_ND: torch.Tensor, ctx: MethodContext, rule: str, method: str) -> MethodOutput:
    pool = _pool(ctx, method, with_sae=False)
    n, _, _ = _settings(ctx)
    nb, nb_info = _neighbours(ctx, pool, n, len(tokens_ND))
    clip, _ = _query_embeds(ctx, len(tokens_ND))
    labels = ctx.oracle_labels_N if rule in ORACLE_RULES else None
    if rule in ORACLE_RULES and labels is None:
        raise RuntimeError(f"method {method!r} needs the evaluation labels")
    query_pseudo = torch.cat([ctx.classifier.predict(c).cpu() for c in clip.split(ctx.batch_size)])
    split = split_neighbours(pool, nb, rule, query_pseudo, None if labels is None else labels.cpu())
    counter = SplitCounter()
    counter.add(split)
    embeds = torch.cat([clip_steer_embeds(clip[i:i + ctx.batch_size], pool,
                                          _slice_split(split, slice(i, i + ctx.batch_size)))
                        for i in range(0, len(clip), ctx.batch_size)])
    info = {**_rule_info(rule, counter), **nb_info, "fallback_rule": "plain CLIP embedding"}
    return MethodOutput(embeds=embeds, coverage=1.0 - counter.n_fallback / max(counter.n_queries, 1), info=info)


def _slice_split(split: NeighbourSplit, sl: slice) -> NeighbourSplit:
    nb = split.neighbours
    return NeighbourSplit(split.rule, Neighbours(nb.scores_QN[sl], nb.indices_QN[sl]), split.positive_QN[sl])


@register_method("clip_steer", prepare=_check_pool_options, needs_sae=False,
                 description="CLIP-steer: q + mean CLIP embedding of S+ - mean of S- (S+ = query pseudo-label rule)")
def _clip_steer_query(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _clip_steer(tokens_ND, ctx, "query", "clip_steer")


@register_method("clip_steer_oracle", prepare=_check_pool_options, needs_sae=False, uses_eval_labels=True,
                 description="CLIP-steer ORACLE upper bound: S+ = neighbours with the query's TRUE label")
def _clip_steer_oracle(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _clip_steer(tokens_ND, ctx, "oracle", "clip_steer_oracle")


def _weighted_rag(tokens_ND: torch.Tensor, ctx: MethodContext, oracle: bool, method: str) -> MethodOutput:
    pool = _pool(ctx, method, with_sae=False)
    n, alpha, _ = _settings(ctx)
    nb, nb_info = _neighbours(ctx, pool, n, len(tokens_ND))
    clip, _ = _query_embeds(ctx, len(tokens_ND))
    member = None
    counter = None
    if oracle:
        if ctx.oracle_labels_N is None:
            raise RuntimeError(f"method {method!r} needs the evaluation labels")
        split = split_neighbours(pool, nb, "oracle", None, ctx.oracle_labels_N.cpu())
        member = split.positive_QN
        counter = SplitCounter()
        counter.add(split)
    embeds, fallback = weighted_rag_embeds(clip, pool, nb, alpha, member)
    info = {"rule": rule_label("oracle") if oracle else "all neighbours (no S+/S- split)",
            "oracle_upper_bound": oracle, "alpha": alpha, **nb_info, "fallback_rule": "plain CLIP embedding",
            "n_fallback": int(fallback.sum())}
    if counter is not None:
        info["empty_set_fallback"] = counter.as_dict()
    return MethodOutput(embeds=embeds, coverage=1.0 - fallback.float().mean().item(), info=info)


@register_method("weighted_rag", prepare=_check_pool_options, needs_sae=False,
                 description="weighted RAG: alpha q + (1 - alpha) sum_j (s_j / sum s) r_j over the N neighbours")
def _weighted_rag_all(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _weighted_rag(tokens_ND, ctx, False, "weighted_rag")


@register_method("weighted_rag_oracle", prepare=_check_pool_options, needs_sae=False, uses_eval_labels=True,
                 description="weighted RAG ORACLE upper bound: only neighbours with the query's TRUE label")
def _weighted_rag_oracle(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _weighted_rag(tokens_ND, ctx, True, "weighted_rag_oracle")


VS2PP_METHODS = ("vs2pp", "vs2pp_majority", "vs2pp_oracle", "clip_steer", "clip_steer_oracle", "weighted_rag",
                 "weighted_rag_oracle")

__all__ = ["VS2PP_METHODS", "check_pool_cache", "load_pool_from_cache"]
