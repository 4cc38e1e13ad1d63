"""The retrieval pool shared by VS2++, its baselines and the reviewers' label baselines: the pool cache
(an activation cache of the unlabeled training split at the SAE's hook, made with the same model), its
CLIP embeddings and pseudo-labels, the retrieval embedding (CLIP, precomputed arrays or a second
backbone) and the evaluation set's neighbours, each computed once per run (`ctx.scratch`). The pool cache
is checked before use: one CLS row per image at the SAE's hook, made by the same model, not the evaluation
split itself, and with labels that mean the evaluation's classes (`check_pool_cache`).

Options (`ctx.options`, CLI flags of `vision-steer eval`): `pool_cache`, `n_neighbours` (50),
`retrieval_backend` (`exact`), `pool_retrieval_embeds` and `query_retrieval_embeds` (`.npy` files of
another embedding, e.g. DINOv2, aligned with the pool cache's rows and with the evaluation set), or
`retrieval_backbone` (a `HookedCLIP` or any name `load_retrieval_backbone` takes, e.g. `dinov2-base`;
with `retrieval_pretrained`, `retrieval_random_weights`, `retrieval_model_kwargs`, `retrieval_cache`:
the pool and the queries are embedded once and cached, see `retrieval/backbone.py`), `rag_alpha` (0.5),
`vs2pp_fallback` (`vs2`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.errors import InputError, MissingInputError, UnknownNameError, UsageError
from ...retrieval.index import DEFAULT_N_NEIGHBOURS, Neighbours
from ...steering.vs2pp import DEFAULT_RAG_ALPHA, RetrievalPool, build_retrieval_pool
from ..registry import MethodContext


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


def check_pool_cache(cache_dir: str | Path, model, hook_name: str, sae=None, eval_data=None,
                     other_dataset: bool = False):
    """Open the pool cache and refuse one that cannot serve as VS2++'s pool: not one CLS row per image,
    another hook or model (weight fingerprint), the evaluation split itself (each query would
    retrieve itself), or labels that mean other classes (`check_pool_labels`). Returns the opened
    `ActivationStore`."""
    from ...activation_cache import ActivationStore, model_fingerprint

    cache = ActivationStore.open(cache_dir)
    if cache.positions != "cls":
        raise UsageError(f"the pool cache {cache_dir} holds positions={cache.positions!r}; VS2++ needs one CLS row "
                         "per image (cache with positions='cls')")
    req = cache.metadata.get("request", {})
    wanted = req.get("model_fingerprint")
    if wanted and wanted != model_fingerprint(model):
        raise UsageError(f"the pool cache {cache_dir} was made with other model weights than the model loaded "
                         f"({cache.metadata.get('model_name')}/{cache.metadata.get('pretrained')}); pseudo-labels "
                         "and embeddings would not match")
    if hook_name not in cache.hook_names:
        raise UnknownNameError(f"the pool cache {cache_dir} holds {cache.hook_names}, not the SAE's hook {hook_name!r}")
    if sae is not None and cache.d_in(hook_name) != sae.cfg.d_in:
        raise UsageError(f"the pool cache {cache_dir} has width {cache.d_in(hook_name)} at {hook_name!r}, the SAE's "
                         f"d_in is {sae.cfg.d_in}")
    if eval_data is not None and (req.get("dataset"), req.get("split")) == (eval_data.dataset_id, eval_data.split):
        raise UsageError(f"the pool cache {cache_dir} was made from the evaluation split itself "
                         f"({eval_data.dataset_id}/{eval_data.split}): each image would retrieve itself. Cache the "
                         "training split for --pool-cache")
    if eval_data is not None:
        check_pool_labels(cache, req, eval_data, other_dataset)
    return cache


def check_pool_labels(cache, req: dict[str, Any], eval_data, other_dataset: bool = False) -> None:
    """The pool's label ids must mean the evaluation's classes (oracle and pseudo-label methods compare them):
    the same class names in the same order, and the same named data set (`cifar100`, a Hub id) unless
    `other_dataset` (the user named a pool of another data set on purpose, `--pool-other-dataset`). Image
    folders are identified by their class names only (their id is a folder name: train and test folders of one
    data set may be named anything)."""
    where = f"the pool cache {cache.root}"
    pool_id, eval_id = req.get("dataset"), eval_data.dataset_id
    named = not any(str(i).startswith("imagefolder:") for i in (pool_id, eval_id))
    if not other_dataset and named and pool_id and pool_id != eval_id:
        raise InputError(f"{where} holds data set {pool_id!r}, the evaluation {eval_id!r}; give the training split of "
                         "the evaluated data set, or --pool-other-dataset to use another data set's pool on purpose")
    names, wanted = req.get("classnames"), [str(c) for c in eval_data.classnames]
    if names is None:
        if other_dataset:
            raise InputError(f"{where} records no class names (made before caches recorded them): its labels cannot be "
                             "checked against another data set's classes; cache the pool again")
        return  # a cache made before class names were recorded: only its data-set id could be checked
    if list(names) != wanted:
        i = next((j for j, (a, b) in enumerate(zip(names, wanted)) if a != b), min(len(names), len(wanted)))

        def shown(xs: list[str]) -> str:
            return repr(xs[i]) if i < len(xs) else "nothing"

        raise InputError(f"{where} has other class ids than the evaluation ({len(names)} vs {len(wanted)} classes; "
                         f"class {i} is {shown(names)} in the pool, {shown(wanted)} here): oracle and pseudo-label "
                         "methods would compare unrelated labels. Cache a pool with the same class folders")


def check_pool_options(ctx: MethodContext) -> None:
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


def shared_pool(ctx: MethodContext, method: str, with_sae: bool) -> RetrievalPool:
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
    # The pool's pseudo-labels come from the head of the row being scored (its prompt protocol): a row with
    # other prompts than the first gets its own labels, on the same index and code directions.
    key = ("vs2pp_pseudo_labels", tuple(ctx.classifier.templates))
    if key not in ctx.scratch:
        if not ctx.scratch.get("vs2pp_pseudo_keys"):
            ctx.scratch["vs2pp_pseudo_keys"] = [key]
            ctx.scratch[key] = pool
        else:
            clip = pool.clip_embeds_PE
            pseudo = torch.cat([ctx.classifier.predict(clip[i:i + 4096]).cpu() for i in range(0, len(clip), 4096)])
            ctx.scratch[key] = dataclasses.replace(pool, pseudo_labels_P=pseudo)
    pool = ctx.scratch[key]
    if with_sae:
        ctx.require_sae(method)
    return pool


def query_embeds(ctx: MethodContext, n_queries: int) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def shared_neighbours(ctx: MethodContext, pool: RetrievalPool, n: int, n_queries: int,
                      ) -> tuple[Neighbours, dict[str, Any]]:
    """The evaluation set's neighbours, searched once per (pool, n) and shared by all methods."""
    key = ("vs2pp_neighbours", id(pool.index), n)
    if key not in ctx.scratch:
        clip, retrieval = query_embeds(ctx, n_queries)
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


def retrieval_settings(ctx: MethodContext) -> tuple[int, float, str]:
    n = ctx.options.get("n_neighbours")
    n = DEFAULT_N_NEIGHBOURS if n is None else int(n)  # 0 is refused by check_pool_options, not replaced
    alpha = ctx.options.get("rag_alpha")
    return n, DEFAULT_RAG_ALPHA if alpha is None else float(alpha), ctx.options.get("vs2pp_fallback") or "vs2"


__all__ = ["check_pool_cache", "check_pool_labels", "check_pool_options", "load_pool_from_cache", "query_embeds", "retrieval_settings",
           "shared_neighbours", "shared_pool"]
