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
setting (`pool.py`, which lists the options).

Kept apart from `vs2pp.py` so that the steering code does not import the evaluation runner (the
runner imports the steering package, and this module imports both).
"""

from __future__ import annotations

from typing import Any

import torch

from ...retrieval.index import Neighbours
from ...sae.metadata import activation_mean
from ...steering.vs2 import PAPER_GAMMA, PAPER_LAM
from ...steering.vs2pp import (
    ORACLE_RULES,
    VS2PP,
    NeighbourSplit,
    SplitCounter,
    VS2PPConfig,
    clip_steer_embeds,
    rule_label,
    split_neighbours,
    weighted_rag_embeds,
)
from ...training.fvu import per_sample_fvu
from ..registry import MethodContext, MethodOutput, register_method
from .pool import (
    check_pool_cache,
    check_pool_options,
    load_pool_from_cache,
    query_embeds,
    retrieval_settings,
    shared_neighbours,
    shared_pool,
)


def _rule_info(rule: str, counter: SplitCounter | None) -> dict[str, Any]:
    info: dict[str, Any] = {"rule": rule_label(rule), "oracle_upper_bound": rule in ORACLE_RULES}
    if counter is not None:
        info["empty_set_fallback"] = counter.as_dict()
    return info


# ---------------------------------------------------------------------------------- VS2++
def oracle_labels(ctx: MethodContext, rule: str, method: str) -> torch.Tensor | None:
    """The evaluation labels for an oracle rule (None for the others); an oracle method registered without
    `uses_eval_labels=True` gets none, which is a bug in its registration."""
    if rule not in ORACLE_RULES:
        return None
    if ctx.oracle_labels_N is None:
        raise RuntimeError(f"method {method!r} needs the evaluation labels (register it with uses_eval_labels=True)")
    return ctx.oracle_labels_N


def _vs2pp(tokens_ND: torch.Tensor, ctx: MethodContext, rule: str, method: str, lam: float, gamma: float,
           fvu_threshold: float | None, preserve_norm: bool) -> MethodOutput:
    sae = ctx.require_sae(method)
    pool = shared_pool(ctx, method, with_sae=True)
    n, _, fallback = retrieval_settings(ctx)
    nb, nb_info = shared_neighbours(ctx, pool, n, len(tokens_ND))
    clip, retrieval = query_embeds(ctx, len(tokens_ND))
    labels = oracle_labels(ctx, rule, method)
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


@register_method("vs2pp", prepare=check_pool_options, reads_pool=True,
                 description="VS2++: retrieval-guided VS2, S+ = neighbours sharing the query's pseudo-label")
def _vs2pp_query(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
                 fvu_threshold: float | None = None, preserve_norm: bool = True, **_: Any) -> MethodOutput:
    return _vs2pp(tokens_ND, ctx, "query", "vs2pp", lam, gamma, fvu_threshold, preserve_norm)


@register_method("vs2pp_majority", prepare=check_pool_options, reads_pool=True,
                 description="VS2++ with S+ = neighbours carrying the majority pseudo-label")
def _vs2pp_majority(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM,
                    gamma: float = PAPER_GAMMA, fvu_threshold: float | None = None, preserve_norm: bool = True,
                    **_: Any) -> MethodOutput:
    return _vs2pp(tokens_ND, ctx, "majority", "vs2pp_majority", lam, gamma, fvu_threshold, preserve_norm)


@register_method("vs2pp_oracle", prepare=check_pool_options, reads_pool=True, uses_eval_labels=True,
                 description="VS2++ ORACLE upper bound: S+ = neighbours with the query's TRUE label (uses test labels)")
def _vs2pp_oracle(tokens_ND: torch.Tensor, ctx: MethodContext, *, lam: float = PAPER_LAM, gamma: float = PAPER_GAMMA,
                  fvu_threshold: float | None = None, preserve_norm: bool = True, **_: Any) -> MethodOutput:
    return _vs2pp(tokens_ND, ctx, "oracle", "vs2pp_oracle", lam, gamma, fvu_threshold, preserve_norm)


# ---------------------------------------------------------------------------------- baselines
def _clip_steer(tokens_ND: torch.Tensor, ctx: MethodContext, rule: str, method: str) -> MethodOutput:
    pool = shared_pool(ctx, method, with_sae=False)
    n, _, _ = retrieval_settings(ctx)
    nb, nb_info = shared_neighbours(ctx, pool, n, len(tokens_ND))
    clip, _ = query_embeds(ctx, len(tokens_ND))
    labels = oracle_labels(ctx, rule, method)
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


@register_method("clip_steer", prepare=check_pool_options, reads_pool=True, needs_sae=False,
                 description="CLIP-steer: q + mean CLIP embedding of S+ - mean of S- (S+ = query pseudo-label rule)")
def _clip_steer_query(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _clip_steer(tokens_ND, ctx, "query", "clip_steer")


@register_method("clip_steer_oracle", prepare=check_pool_options, reads_pool=True, needs_sae=False,
                 uses_eval_labels=True,
                 description="CLIP-steer ORACLE upper bound: S+ = neighbours with the query's TRUE label")
def _clip_steer_oracle(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _clip_steer(tokens_ND, ctx, "oracle", "clip_steer_oracle")


def _weighted_rag(tokens_ND: torch.Tensor, ctx: MethodContext, oracle: bool, method: str) -> MethodOutput:
    pool = shared_pool(ctx, method, with_sae=False)
    n, alpha, _ = retrieval_settings(ctx)
    nb, nb_info = shared_neighbours(ctx, pool, n, len(tokens_ND))
    clip, _ = query_embeds(ctx, len(tokens_ND))
    member = None
    counter = None
    if oracle:
        split = split_neighbours(pool, nb, "oracle", None, oracle_labels(ctx, "oracle", method).cpu())
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


@register_method("weighted_rag", prepare=check_pool_options, reads_pool=True, needs_sae=False,
                 description="weighted RAG: alpha q + (1 - alpha) sum_j (s_j / sum s) r_j over the N neighbours")
def _weighted_rag_all(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _weighted_rag(tokens_ND, ctx, False, "weighted_rag")


@register_method("weighted_rag_oracle", prepare=check_pool_options, reads_pool=True, needs_sae=False,
                 uses_eval_labels=True,
                 description="weighted RAG ORACLE upper bound: only neighbours with the query's TRUE label")
def _weighted_rag_oracle(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _weighted_rag(tokens_ND, ctx, True, "weighted_rag_oracle")


VS2PP_METHODS = ("vs2pp", "vs2pp_majority", "vs2pp_oracle", "clip_steer", "clip_steer_oracle", "weighted_rag",
                 "weighted_rag_oracle")

__all__ = ["VS2PP_METHODS", "check_pool_cache", "load_pool_from_cache"]
