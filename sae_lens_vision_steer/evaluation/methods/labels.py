"""The reviewers' baselines for VS2++: how far do the neighbours' labels alone go?

| method | prediction | labels read |
|---|---|---|
| `knn_vote` | the majority pseudo-label of the N neighbours VS2++ retrieves | none (CLIP's pseudo-labels) |
| `knn_vote_oracle` | the majority TRUE label of those neighbours | the training split's |
| `linear_probe` | logistic regression on the training split's image embeddings | the training split's |

The votes use the run's shared pool and neighbours (`pool.py`: the same index, the same N, the same
retrieval embedding as VS2++), so they add no retrieval. A tie in counts goes to the label whose first
occurrence is the most similar neighbour (as VS2++'s majority rule). The scores are the vote counts plus
that tie-break (below one vote), so top-5 ranks classes by votes.

`linear_probe` reads the pool cache's rows as its training data (their CLIP embeddings and labels); it is
fitted once and cached next to the pool cache (`options["probe_cache"]` to put it elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...core.errors import InputError, UsageError
from ..registry import MethodContext, MethodOutput, register_method
from .pool import check_pool_cache, check_pool_options, retrieval_settings, shared_neighbours, shared_pool


def vote_logits(labels_QN: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`[Q, C]`: each class's votes among the N neighbours, plus `(N - first position) / (N + 1)` for the
    classes that occur, so that argmax is the majority label with ties to the most similar neighbour."""
    Q, N = labels_QN.shape
    votes = torch.zeros(Q, n_classes)
    votes.scatter_add_(1, labels_QN.long(), torch.ones(Q, N))
    first = torch.full((Q, n_classes), N, dtype=torch.long)
    pos = torch.arange(N).expand(Q, N)
    first.scatter_reduce_(1, labels_QN.long(), pos, reduce="amin")
    return votes + (N - first).float() / (N + 1)


def _vote(tokens_ND: torch.Tensor, ctx: MethodContext, oracle: bool, method: str) -> MethodOutput:
    pool = shared_pool(ctx, method, with_sae=False)
    n, _, _ = retrieval_settings(ctx)
    nb, nb_info = shared_neighbours(ctx, pool, n, len(tokens_ND))
    idx = nb.indices_QN.cpu()
    if oracle:
        if pool.labels_P is None or bool((pool.labels_P < 0).any()):
            raise InputError(f"{method} votes with the pool's true labels, but the pool cache "
                             f"{ctx.options.get('pool_cache')} has rows without a label")
        labels = pool.labels_P[idx]
    else:
        labels = pool.pseudo_labels_P[idx]
    logits = vote_logits(labels, len(ctx.classifier.classnames))
    top = logits.max(1).values.floor()
    info = {**nb_info, "vote": "true training labels" if oracle else "CLIP pseudo-labels",
            "mean_majority_share": float((top / n).mean())}
    return MethodOutput(logits=logits, coverage=1.0, info=info)


@register_method("knn_vote", prepare=check_pool_options, reads_pool=True, needs_sae=False,
                 description="the majority pseudo-label of VS2++'s N neighbours (no steering)")
def _knn_vote(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _vote(tokens_ND, ctx, False, "knn_vote")


@register_method("knn_vote_oracle", prepare=check_pool_options, reads_pool=True, needs_sae=False,
                 templates="none", uses_labels="training labels",
                 description="the majority TRUE training label of VS2++'s N neighbours (uses training labels)")
def _knn_vote_oracle(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    return _vote(tokens_ND, ctx, True, "knn_vote_oracle")


def _check_probe(ctx: MethodContext) -> None:
    """Before the backbone pass: a pool cache of the training split, with a label on every row."""
    pool_dir = ctx.options.get("pool_cache")
    if not pool_dir:
        raise UsageError("linear_probe trains on the training split's image embeddings and labels: give that "
                         "split's activation cache (--pool-cache DIR); a data set without a training split has "
                         "no linear probe")
    cache = check_pool_cache(pool_dir, ctx.model, ctx.hook_name or ctx.model.steer_hook, None, ctx.data)
    labels = cache.labels
    if labels is None or bool((torch.as_tensor(labels) < 0).any()):
        raise InputError(f"linear_probe needs a label on every training row; the pool cache {pool_dir} has "
                         "rows without one")


@register_method("linear_probe", prepare=_check_probe, reads_pool=True, needs_sae=False, templates="none",
                 uses_labels="training labels",
                 description="logistic regression on the training split's image embeddings (uses training labels)")
def _linear_probe(tokens_ND: torch.Tensor, ctx: MethodContext, **_: Any) -> MethodOutput:
    from ...baselines.linear_probe import cached_linear_probe

    _check_probe(ctx)
    pool = shared_pool(ctx, "linear_probe", with_sae=False)
    pool_dir = Path(ctx.options["pool_cache"])
    meta = check_pool_cache(pool_dir, ctx.model, ctx.hook_name or ctx.model.steer_hook).metadata
    req = meta.get("request", {})
    fitted_on = {"model_fingerprint": req.get("model_fingerprint"), "dataset": req.get("dataset"),
                 "split": req.get("split"), "dataset_fingerprint": req.get("dataset_fingerprint"),
                 "n_rows": pool.n_items, "embedding": "CLIP image embedding (model.head of the final CLS)"}
    folder = ctx.options.get("probe_cache") or pool_dir.with_name(pool_dir.name + ".linear_probe")
    probe, status = cached_linear_probe(pool.clip_embeds_PE, pool.labels_P, len(ctx.classifier.classnames),
                                        folder, fitted_on)
    logits = probe.logits(ctx.zeroshot_embeds_NE)
    return MethodOutput(logits=logits, coverage=1.0, info={"probe": probe.info, "probe_cache": status,
                                                           "probe_folder": str(folder)})


__all__ = ["vote_logits"]
