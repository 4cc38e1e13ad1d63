"""VS2++: retrieval-augmented sparse steering (arXiv 2506.01247, VS2++), and the retrieval baselines.

For each query image:

1. retrieve its `n_neighbours` (default 50) nearest pool images by cosine similarity of a retrieval
   embedding (default: the CLIP image embedding; any embedding aligned with the pool can be given,
   the paper uses DINOv2);
2. pseudo-label the neighbours with CLIP zero-shot (argmax of `ZeroShotClassifier.logits`);
3. split them into S+ and S- (S- = the rest) by one of three rules:
   - `query`: neighbours whose pseudo-label equals the query's own pseudo-label (paper, Sec. 3.3);
   - `majority`: neighbours carrying the most frequent pseudo-label among the N (paper, Sec. 4.2);
     a tie in counts goes to the label whose first occurrence is the most similar neighbour;
   - `oracle`: neighbours whose TRUE label equals the query's TRUE label. This uses labels at test
     time: it is an upper bound, never a label-free result;
4. `vbar = (gamma - 1) * (mean_{S+} c - mean_{S-} c) @ W_dec` with `c` the neighbours' SAE codes,
   then the VS2 step `x_hat = (x + lam vbar) * ||x|| / ||x + lam vbar||`.

The code's decoder contribution is taken as `decode(c) - b_dec` (as in `vs2.py`), which is
`c @ W_dec` for a plain top-k SAE; the pool's per-image contributions are computed once
(`RetrievalPool.code_dirs_PD`), so the per-query cost is a masked mean over N rows.

Empty S+ or S- (e.g. no neighbour shares the query's pseudo-label, or all N agree): `fallback="vs2"`
(default) steers that query with plain VS2, `(gamma - 1) * c(x) @ W_dec`; `fallback="none"` leaves it
unsteered. Every such query is counted (`VS2PP.stats`, and in every evaluation output).

Baselines that use the same retrieval (embeddings are unit-normalised first):
- CLIP-steer: `e = q + mean_{S+} r - mean_{S-} r`, classified as usual (`r` = neighbours' CLIP
  embeddings; S+/S- from the same rules; empty set -> plain CLIP, counted);
- weighted RAG: `e = alpha q + (1 - alpha) sum_j w_j r_j`, `w_j = s_j / sum_k s_k`, `s` = retrieval
  cosine similarities, over all N neighbours (label-free), or over S+ only for the oracle variant.
  The paper gives no alpha; we default to `DEFAULT_RAG_ALPHA = 0.5`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sae_lens import SAE

from ..core.errors import UsageError
from ..retrieval.index import DEFAULT_N_NEIGHBOURS, CosineIndex, Neighbours, build_index
from .hooks import Site, TokenIntervention, check_affine_decoder, check_finite
from .vs2 import PAPER_GAMMA, PAPER_LAM

Rule = Literal["query", "majority", "oracle"]
RULES: tuple[str, ...] = ("query", "majority", "oracle")
ORACLE_RULES = frozenset({"oracle"})  # rules that read true labels at test time
Fallback = Literal["vs2", "none"]
DEFAULT_RAG_ALPHA = 0.5


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise UsageError(f"unknown S+ rule {rule!r}; use one of {RULES}")
    return rule


def rule_label(rule: str) -> str:
    """How a rule is named in tables: the oracle is marked as an upper bound."""
    return f"{rule} (oracle upper bound, uses true labels)" if rule in ORACLE_RULES else rule


# ------------------------------------------------------------------------------------------ pure math
def code_direction(sae: SAE, x_BD: torch.Tensor) -> torch.Tensor:
    """The SAE code's decoder contribution `decode(encode(x)) - b_dec` (`c @ W_dec` for plain top-k)."""
    return sae.decode(sae.encode(x_BD.to(sae.dtype))) - sae.b_dec


@torch.no_grad()
def vs2pp_steering_vector(sae: SAE, positive_acts: torch.Tensor, negative_acts: torch.Tensor,
                          gamma: float = PAPER_GAMMA) -> torch.Tensor:
    """`vbar = (gamma - 1) * (mean_{S+} c - mean_{S-} c) @ W_dec` for activations `[n+, D]`, `[n-, D]`."""
    check_finite(gamma=gamma)
    check_affine_decoder(sae)
    if len(positive_acts) == 0 or len(negative_acts) == 0:
        raise UsageError("vs2pp_steering_vector needs at least one positive and one negative activation")
    pos = sae.encode(positive_acts.to(sae.dtype)).mean(0)
    neg = sae.encode(negative_acts.to(sae.dtype)).mean(0)
    return (gamma - 1.0) * (sae.decode((pos - neg)[None]) - sae.b_dec)[0]


def steer_with_vectors(x_BD: torch.Tensor, v_BD: torch.Tensor, lam: float, preserve_norm: bool = True) -> torch.Tensor:
    """The VS2 step with a given vector: `(x + lam v) * ||x|| / ||x + lam v||`."""
    steered = x_BD + lam * v_BD.to(x_BD.dtype)
    if preserve_norm:
        tiny = torch.finfo(x_BD.dtype).tiny
        steered = steered * (x_BD.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(tiny))
    return steered


def majority_labels(labels_QN: torch.Tensor) -> torch.Tensor:
    """Most frequent label in each row; ties go to the label seen first (the most similar neighbour)."""
    n = labels_QN.shape[1]
    same_QNN = labels_QN[:, :, None] == labels_QN[:, None, :]
    count_QN = same_QNN.sum(dim=2)
    # Prefer a higher count, then an earlier position: key = count * (n + 1) - position.
    key_QN = count_QN * (n + 1) - torch.arange(n, device=labels_QN.device)
    return labels_QN.gather(1, key_QN.argmax(dim=1, keepdim=True))[:, 0]


def positive_mask(rule: str, neighbour_pseudo_QN: torch.Tensor, query_pseudo_Q: torch.Tensor | None = None,
                  neighbour_labels_QN: torch.Tensor | None = None,
                  query_labels_Q: torch.Tensor | None = None) -> torch.Tensor:
    """S+ membership `[Q, N]` under `rule` (S- is the complement)."""
    check_rule(rule)
    if rule == "query":
        if query_pseudo_Q is None:
            raise UsageError("rule 'query' needs the queries' pseudo-labels")
        return neighbour_pseudo_QN == query_pseudo_Q.to(neighbour_pseudo_QN.device)[:, None]
    if rule == "majority":
        return neighbour_pseudo_QN == majority_labels(neighbour_pseudo_QN)[:, None]
    if neighbour_labels_QN is None or query_labels_Q is None:
        raise UsageError("rule 'oracle' needs true labels for the pool and the queries")
    if bool((query_labels_Q < 0).any()):
        raise UsageError("rule 'oracle' needs a true label for every query; some are -1 (unknown)")
    return neighbour_labels_QN == query_labels_Q.to(neighbour_labels_QN.device)[:, None]


def masked_mean(values_QND: torch.Tensor, mask_QN: torch.Tensor) -> torch.Tensor:
    """Mean over the masked neighbours of each query (zeros where the mask is empty)."""
    w_QN = mask_QN.to(values_QND.dtype)
    return torch.einsum("qn,qnd->qd", w_QN, values_QND) / w_QN.sum(1, keepdim=True).clamp_min(1.0)


# ------------------------------------------------------------------------------------------ the pool
@dataclass(frozen=True)
class RetrievalPool:
    """An unlabeled image pool (e.g. the cached training split), ready for VS2++ and the baselines."""

    index: CosineIndex  # over the retrieval embedding
    clip_embeds_PE: torch.Tensor  # unit-normalised CLIP image embeddings
    pseudo_labels_P: torch.Tensor  # CLIP zero-shot argmax
    code_dirs_PD: torch.Tensor | None = None  # `decode(encode(x)) - b_dec` per pool image (VS2++ only)
    labels_P: torch.Tensor | None = None  # true labels (oracle rules only), -1 where unknown
    retrieval_embedding: str = "clip"

    @property
    def n_items(self) -> int:
        return len(self.pseudo_labels_P)


@torch.no_grad()
def pool_code_directions(sae: SAE, acts_PD: torch.Tensor | np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """`decode(encode(x)) - b_dec` for every pool activation, in batches (float32, on the CPU)."""
    check_affine_decoder(sae)
    acts = torch.as_tensor(acts_PD)
    if acts.ndim != 2 or acts.shape[1] != sae.cfg.d_in:
        raise UsageError(f"pool activations must be [P, {sae.cfg.d_in}], got {list(acts.shape)}")
    return torch.cat([code_direction(sae, acts[i:i + batch_size].to(sae.device)).float().cpu()
                      for i in range(0, len(acts), batch_size)])


def build_retrieval_pool(classifier, clip_embeds_PE: torch.Tensor | np.ndarray, sae: SAE | None = None,
                         acts_PD: torch.Tensor | np.ndarray | None = None, labels_P: torch.Tensor | np.ndarray | None = None,
                         retrieval_embeds_PE: torch.Tensor | np.ndarray | None = None, backend: str = "exact",
                         batch_size: int = 4096, **index_kwargs) -> RetrievalPool:
    """Pseudo-label the pool with `classifier` (a `ZeroShotClassifier`) and index it.

    `acts_PD` (the SAE's hook activations of the pool, CLS token) with `sae` are needed for VS2++;
    the baselines only need the CLIP embeddings. `retrieval_embeds_PE` replaces the CLIP embedding
    for retrieval (rows aligned with the pool).
    """
    clip = torch.as_tensor(clip_embeds_PE).float()
    if clip.ndim != 2 or len(clip) == 0:
        raise UsageError(f"pool CLIP embeddings must be a non-empty [P, E] array, got {list(clip.shape)}")
    n = len(clip)
    pseudo = torch.cat([classifier.predict(clip[i:i + batch_size]).cpu() for i in range(0, n, batch_size)])
    code_dirs = None
    if sae is not None or acts_PD is not None:
        if sae is None or acts_PD is None:
            raise UsageError("VS2++ needs both the SAE and the pool's activations")
        code_dirs = pool_code_directions(sae, acts_PD, batch_size)
        if len(code_dirs) != n:
            raise UsageError(f"pool activations have {len(code_dirs)} rows but the CLIP embeddings have {n}")
    labels = None if labels_P is None else torch.as_tensor(np.asarray(labels_P), dtype=torch.long)
    if labels is not None and len(labels) != n:
        raise UsageError(f"pool labels have {len(labels)} rows but the pool has {n}")
    retrieval = clip if retrieval_embeds_PE is None else torch.as_tensor(retrieval_embeds_PE)
    if len(retrieval) != n:
        raise UsageError(f"retrieval embeddings have {len(retrieval)} rows but the pool has {n}")
    return RetrievalPool(
        index=build_index(retrieval, backend=backend, **index_kwargs),
        clip_embeds_PE=F.normalize(clip, dim=-1), pseudo_labels_P=pseudo, code_dirs_PD=code_dirs,
        labels_P=labels, retrieval_embedding="clip" if retrieval_embeds_PE is None else "custom",
    )


# ------------------------------------------------------------------------------------------ S+ / S-
@dataclass
class NeighbourSplit:
    rule: str
    neighbours: Neighbours
    positive_QN: torch.Tensor  # bool: S+ membership; S- is the complement

    @property
    def negative_QN(self) -> torch.Tensor:
        return ~self.positive_QN

    @property
    def empty_positive_Q(self) -> torch.Tensor:
        return ~self.positive_QN.any(dim=1)

    @property
    def empty_negative_Q(self) -> torch.Tensor:
        return self.positive_QN.all(dim=1)

    @property
    def fallback_Q(self) -> torch.Tensor:
        return self.empty_positive_Q | self.empty_negative_Q


def split_neighbours(pool: RetrievalPool, neighbours: Neighbours, rule: str,
                     query_pseudo_Q: torch.Tensor | None = None,
                     query_labels_Q: torch.Tensor | None = None) -> NeighbourSplit:
    idx = neighbours.indices_QN
    if rule in ORACLE_RULES and pool.labels_P is None:
        raise UsageError(f"rule {rule!r} needs the pool's true labels")
    pos = positive_mask(
        rule, pool.pseudo_labels_P[idx], query_pseudo_Q,
        None if pool.labels_P is None else pool.labels_P[idx],
        None if query_labels_Q is None else torch.as_tensor(query_labels_Q, dtype=torch.long).cpu(),
    )
    return NeighbourSplit(rule, neighbours, pos)


@dataclass
class SplitCounter:
    """How often S+ or S- came out empty (the fallback was used)."""

    n_queries: int = 0
    n_empty_positive: int = 0
    n_empty_negative: int = 0
    n_fallback: int = 0

    def add(self, split: NeighbourSplit) -> None:
        self.n_queries += len(split.positive_QN)
        self.n_empty_positive += int(split.empty_positive_Q.sum())
        self.n_empty_negative += int(split.empty_negative_Q.sum())
        self.n_fallback += int(split.fallback_Q.sum())

    def as_dict(self) -> dict[str, float | int]:
        return {"n_queries": self.n_queries, "n_empty_positive": self.n_empty_positive,
                "n_empty_negative": self.n_empty_negative, "n_fallback": self.n_fallback,
                "fallback_fraction": self.n_fallback / self.n_queries if self.n_queries else float("nan")}


# ------------------------------------------------------------------------------------------ VS2++
@dataclass(frozen=True)
class VS2PPConfig:
    n_neighbours: int = DEFAULT_N_NEIGHBOURS
    rule: Rule = "query"
    lam: float = PAPER_LAM
    gamma: float = PAPER_GAMMA
    fallback: Fallback = "vs2"
    preserve_norm: bool = True

    def __post_init__(self) -> None:
        check_rule(self.rule)
        check_finite(lam=self.lam, gamma=self.gamma)
        if self.n_neighbours < 1:
            raise UsageError(f"n_neighbours must be >= 1, got {self.n_neighbours}")
        if self.fallback not in ("vs2", "none"):
            raise UsageError(f"fallback must be 'vs2' or 'none', got {self.fallback!r}")


@dataclass
class VS2PPOutput:
    steered: torch.Tensor  # [Q, D]
    vectors: torch.Tensor  # [Q, D] the vbar used (VS2's v on fallback rows, zero for fallback='none')
    split: NeighbourSplit


class VS2PP:
    """VS2++ for batches of queries: retrieval, pseudo-labels, S+/S- split, steering vectors.

    `steer(x_QD, query_clip_QE, ...)` takes the queries' activations at the SAE's hook (CLS) and
    their CLIP image embeddings (for the query's pseudo-label and, by default, for retrieval).
    `stats` counts the queries that fell back because S+ or S- was empty.
    """

    def __init__(self, sae: SAE, pool: RetrievalPool, classifier, cfg: VS2PPConfig = VS2PPConfig()):
        check_affine_decoder(sae)
        if pool.code_dirs_PD is None:
            raise UsageError("the pool has no SAE code directions; build it with sae= and acts_PD=")
        if pool.code_dirs_PD.shape[1] != sae.cfg.d_in:
            raise UsageError(f"pool code directions have width {pool.code_dirs_PD.shape[1]}, SAE d_in is {sae.cfg.d_in}")
        self.sae, self.pool, self.classifier, self.cfg = sae, pool, classifier, cfg
        self.counter = SplitCounter()

    @property
    def stats(self) -> dict[str, float | int]:
        return self.counter.as_dict()

    def split(self, query_clip_QE: torch.Tensor, query_retrieval_QE: torch.Tensor | None = None,
              query_labels_Q: torch.Tensor | None = None, neighbours: Neighbours | None = None) -> NeighbourSplit:
        """Retrieve (unless `neighbours` are given, e.g. shared by several rules) and split into S+/S-."""
        query_pseudo = self.classifier.predict(query_clip_QE).cpu()
        if neighbours is None:
            retrieval = query_clip_QE if query_retrieval_QE is None else query_retrieval_QE
            neighbours = self.pool.index.search(retrieval.detach().float().cpu(), self.cfg.n_neighbours)
        else:
            expected = (len(query_clip_QE), min(self.cfg.n_neighbours, self.pool.n_items))
            if tuple(neighbours.indices_QN.shape) != expected:
                raise UsageError(f"neighbours have shape {tuple(neighbours.indices_QN.shape)}, expected {expected}")
        return split_neighbours(self.pool, neighbours, self.cfg.rule, query_pseudo, query_labels_Q)

    @torch.no_grad()
    def steer(self, x_QD: torch.Tensor, query_clip_QE: torch.Tensor, query_retrieval_QE: torch.Tensor | None = None,
              query_labels_Q: torch.Tensor | None = None, neighbours: Neighbours | None = None) -> VS2PPOutput:
        if len(x_QD) != len(query_clip_QE):
            raise UsageError(f"{len(x_QD)} activations but {len(query_clip_QE)} query embeddings")
        split = self.split(query_clip_QE, query_retrieval_QE, query_labels_Q, neighbours)
        self.counter.add(split)
        dirs_QND = self.pool.code_dirs_PD[split.neighbours.indices_QN]
        diff_QD = masked_mean(dirs_QND, split.positive_QN) - masked_mean(dirs_QND, split.negative_QN)
        v_QD = ((self.cfg.gamma - 1.0) * diff_QD).to(x_QD.device, self.sae.dtype)
        fb_Q = split.fallback_Q.to(x_QD.device)
        if bool(fb_Q.any()):
            if self.cfg.fallback == "vs2":
                v_QD[fb_Q] = (self.cfg.gamma - 1.0) * code_direction(self.sae, x_QD[fb_Q])
            else:
                v_QD[fb_Q] = 0.0
        steered = steer_with_vectors(x_QD.to(self.sae.dtype), v_QD, self.cfg.lam, self.cfg.preserve_norm)
        if self.cfg.fallback == "none":
            steered = torch.where(fb_Q[:, None], x_QD.to(steered.dtype), steered)
        return VS2PPOutput(steered.to(x_QD.dtype), v_QD, split)


# ------------------------------------------------------------------------------------------ baselines
def clip_steer_embeds(query_clip_QE: torch.Tensor, pool: RetrievalPool, split: NeighbourSplit) -> torch.Tensor:
    """CLIP-steer: `q + mean_{S+} r - mean_{S-} r` (unit-normalised q, r); plain `q` where a set is empty."""
    q = F.normalize(query_clip_QE.float().cpu(), dim=-1)
    r_QNE = pool.clip_embeds_PE[split.neighbours.indices_QN]
    steered = q + masked_mean(r_QNE, split.positive_QN) - masked_mean(r_QNE, split.negative_QN)
    return torch.where(split.fallback_Q[:, None], q, steered)


def weighted_rag_embeds(query_clip_QE: torch.Tensor, pool: RetrievalPool, neighbours: Neighbours,
                        alpha: float = DEFAULT_RAG_ALPHA, member_QN: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted RAG: `alpha q + (1 - alpha) sum_j w_j r_j`, `w_j = s_j / sum s` over the member neighbours.

    Returns `(embeds_QE, fallback_Q)`; a query with no member neighbour (or a non-positive similarity
    sum) keeps its plain `q` and is flagged.
    """
    check_finite(alpha=alpha)
    q = F.normalize(query_clip_QE.float().cpu(), dim=-1)
    s_QN = neighbours.scores_QN.float()
    if member_QN is not None:
        s_QN = torch.where(member_QN, s_QN, torch.zeros_like(s_QN))
    total_Q1 = s_QN.sum(1, keepdim=True)
    fallback_Q = total_Q1[:, 0] <= 0
    w_QN = s_QN / torch.where(fallback_Q[:, None], torch.ones_like(total_Q1), total_Q1)
    r_QNE = pool.clip_embeds_PE[neighbours.indices_QN]
    mixed = alpha * q + (1 - alpha) * torch.einsum("qn,qne->qe", w_QN, r_QNE)
    return torch.where(fallback_Q[:, None], q, mixed), fallback_Q


# ------------------------------------------------------------------------------------------ hooks
class VS2PPSteering(TokenIntervention):
    """VS2++ as TransformerLens forward hooks (CLS token at the SAE's hook).

    VS2++ needs each query's own retrieval, which a hook cannot see, so the per-sample vectors come
    in one of two ways:

    - precomputed (any retrieval embedding, any rule): compute `vbar` per query (e.g. with
      `VS2PP.steer(...).vectors`), then
          with steer.using_vectors(vbar_BD), model.hooks(fwd_hooks=steer.fwd_hooks()):
              model.encode_image(images)
    - online (CLIP retrieval embedding, SAE on the final block): give `engine=VS2PP(...)` and
      `embed_fn=clip_head_fn(model)`; the hook maps the hooked CLS to the query's CLIP embedding,
      retrieves, pseudo-labels and steers. The oracle rule also needs
      `with steer.using_labels(labels_B): ...` around each batch.

    Precomputed vectors take precedence when both are set. In online mode `lam`, `gamma`, the rule
    and the fallback come from `engine.cfg`. Fallback counts: `engine.stats`.
    """

    def __init__(self, sae: SAE, lam: float = PAPER_LAM, hook_name: str | None = None, preserve_norm: bool = True,
                 engine: VS2PP | None = None, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        check_finite(lam=lam)
        super().__init__(sae, hook_name, "cls")
        if (engine is None) != (embed_fn is None):
            raise UsageError("online VS2++ needs both engine= and embed_fn= (or neither, for precomputed vectors)")
        if engine is not None and engine.sae is not sae:
            raise UsageError("engine was built for a different SAE")
        self.lam, self.preserve_norm = float(engine.cfg.lam if engine else lam), preserve_norm
        self.engine, self.embed_fn = engine, embed_fn
        self._vectors_BD: torch.Tensor | None = None
        self._labels_B: torch.Tensor | None = None

    def validate(self, model) -> None:
        super().validate(model)
        final = model.steer_hook
        if getattr(self.embed_fn, "expects_final_cls", False) and self.hook_names[0] != final:
            raise UsageError(f"clip_head_fn maps the final block's CLS to the CLIP embedding, but this SAE sits on "
                             f"{self.hook_names[0]!r}; give another embed_fn or precomputed vectors")

    @contextlib.contextmanager
    def using_vectors(self, vectors_BD: torch.Tensor) -> Iterator["VS2PPSteering"]:
        """Steer the next forward passes' batch with these per-sample vectors `[B, d_in]`."""
        if vectors_BD.ndim != 2 or vectors_BD.shape[1] != self.sites[0].sae.cfg.d_in:
            raise UsageError(f"vectors must be [B, {self.sites[0].sae.cfg.d_in}], got {list(vectors_BD.shape)}")
        self._vectors_BD = vectors_BD
        try:
            yield self
        finally:
            self._vectors_BD = None

    @contextlib.contextmanager
    def using_labels(self, labels_B: torch.Tensor) -> Iterator["VS2PPSteering"]:
        """True labels of the next batch (only the oracle rule reads them)."""
        self._labels_B = torch.as_tensor(labels_B)
        try:
            yield self
        finally:
            self._labels_B = None

    def transform(self, x_PD: torch.Tensor, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        if x_PD.ndim != 2:
            raise UsageError("VS2PPSteering steers one token per image (positions='cls')")
        changed = torch.ones(x_PD.shape[0], dtype=torch.bool, device=x_PD.device)
        if self._vectors_BD is not None:
            if len(self._vectors_BD) != len(x_PD):
                raise UsageError(f"batch of {len(x_PD)} images but {len(self._vectors_BD)} steering vectors")
            return steer_with_vectors(x_PD, self._vectors_BD.to(x_PD.device), self.lam, self.preserve_norm), changed
        if self.engine is None:
            raise RuntimeError("no steering vectors: wrap the forward pass in `with steer.using_vectors(vbar_BD):`")
        if self.engine.cfg.rule in ORACLE_RULES and self._labels_B is None:
            raise RuntimeError("the oracle rule needs the batch's labels: `with steer.using_labels(labels_B):`")
        with torch.no_grad():
            out = self.engine.steer(x_PD, self.embed_fn(x_PD), query_labels_Q=self._labels_B)
        if self.engine.cfg.fallback == "none":
            changed = ~out.split.fallback_Q.to(x_PD.device)
        return out.steered, changed

    def __repr__(self) -> str:
        mode = f"online rule={self.engine.cfg.rule!r}" if self.engine else "precomputed vectors"
        return f"VS2PPSteering(hook={self.hook_names[0]}, lam={self.lam}, {mode})"


def clip_head_fn(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final-block CLS `[B, d_model]` -> CLIP image embedding, without firing the model's hooks
    (the tower's `ln_post` and projection, as `HookedCLIP.head` does)."""
    def head(cls_BD: torch.Tensor) -> torch.Tensor:
        return model.head_unhooked(cls_BD.to(model.cfg.dtype))

    head.expects_final_cls = True  # type: ignore[attr-defined]  (checked by VS2PPSteering.validate)
    return head


__all__ = [
    "DEFAULT_RAG_ALPHA", "NeighbourSplit", "ORACLE_RULES", "RULES", "RetrievalPool", "SplitCounter", "VS2PP",
    "VS2PPConfig", "VS2PPOutput", "VS2PPSteering", "build_retrieval_pool", "clip_head_fn", "clip_steer_embeds",
    "code_direction", "majority_labels", "masked_mean", "pool_code_directions", "positive_mask", "rule_label",
    "split_neighbours", "steer_with_vectors", "vs2pp_steering_vector", "weighted_rag_embeds",
]
