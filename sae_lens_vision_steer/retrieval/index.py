"""Nearest-neighbour retrieval by cosine similarity, for VS2++ and the retrieval baselines.

`ExactCosineIndex` finds the exact top-N pool items for each query with batched matrix products:
queries go in batches of at most `query_batch_size`, the pool in chunks of at most `pool_chunk_size`,
and a running top-N is merged chunk by chunk, so the full query x pool similarity matrix is never
built (peak extra memory is `query_batch_size x pool_chunk_size` scores).

Ties are broken deterministically: equal similarities are ordered by ascending pool index, both
inside a chunk and across chunk boundaries, so the result does not depend on the chunk size.

`FaissCosineIndex` wraps a FAISS index (`pip install faiss-cpu`, imported lazily) for pools in the
millions: `kind="flat"` is exact inner-product search, `"hnsw"` and `"ivf"` are approximate.
Both indexes normalise embeddings themselves (cosine similarity = inner product of unit vectors)
and return `Neighbours(scores_QN, indices_QN)`, best first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.errors import UsageError

DEFAULT_N_NEIGHBOURS = 50  # the paper's N; it reports diminishing returns beyond 50


@dataclass(frozen=True)
class Neighbours:
    scores_QN: torch.Tensor  # cosine similarities, descending along N
    indices_QN: torch.Tensor  # int64 pool positions

    def __len__(self) -> int:
        return self.indices_QN.shape[0]


class CosineIndex(Protocol):
    n_items: int

    def search(self, queries_QE: torch.Tensor | np.ndarray, n: int = DEFAULT_N_NEIGHBOURS) -> Neighbours: ...


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise UsageError(f"expected a 2-D [items, dim] embedding array, got shape {tuple(t.shape)}")
    return t if t.is_floating_point() else t.float()


def _select_topn_stable(scores_QM: torch.Tensor, ids_QM: torch.Tensor, n: int,
                        ids_ascending: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The `n` best columns of each row, ordered by (score desc, id asc).

    `torch.topk` picks arbitrarily among equal scores at the cut-off. Rows without such a tie keep
    topk's answer (it is the unique one); rows with one (e.g. duplicate images in the pool) keep
    everything above the n-th best score and fill the remaining places with the smallest ids among
    the scores equal to it.
    """
    m = scores_QM.shape[1]
    if n >= m:
        return _sort_score_desc_id_asc(scores_QM, ids_QM)
    top = scores_QM.topk(n, dim=1)
    thresh_Q1 = top.values[:, -1:]
    out_s, out_i = _sort_score_desc_id_asc(top.values, ids_QM.gather(1, top.indices))
    tied_rows = ((scores_QM >= thresh_Q1).sum(dim=1) != n).nonzero()[:, 0]
    if len(tied_rows):
        out_s[tied_rows], out_i[tied_rows] = _select_topn_with_ties(
            scores_QM[tied_rows], ids_QM[tied_rows], thresh_Q1[tied_rows], n, ids_ascending)
    return out_s, out_i


def _select_topn_with_ties(scores_QM: torch.Tensor, ids_QM: torch.Tensor, thresh_Q1: torch.Tensor, n: int,
                           ids_ascending: bool) -> tuple[torch.Tensor, torch.Tensor]:
    above_QM = scores_QM > thresh_Q1
    tied_QM = scores_QM == thresh_Q1
    n_needed_Q1 = n - above_QM.sum(dim=1, keepdim=True)
    # Rank each tied entry among the tied entries of its row, in id order.
    if ids_ascending:  # a pool chunk: columns are already in id order
        take_QM = tied_QM & (tied_QM.long().cumsum(dim=1) <= n_needed_Q1)
    else:
        order_QM = ids_QM.argsort(dim=1)
        tied_sorted_QM = tied_QM.gather(1, order_QM)
        take_sorted_QM = tied_sorted_QM & (tied_sorted_QM.long().cumsum(dim=1) <= n_needed_Q1)
        take_QM = torch.zeros_like(tied_QM).scatter_(1, order_QM, take_sorted_QM)
    keep_QM = above_QM | take_QM
    # Exactly n True per row, so the masked selection reshapes to [Q, n].
    return _sort_score_desc_id_asc(scores_QM[keep_QM].reshape(-1, n), ids_QM[keep_QM].reshape(-1, n))


def _sort_score_desc_id_asc(sel_scores: torch.Tensor, sel_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Stable two-key sort: by id first, then stably by score descending.
    by_id = sel_ids.argsort(dim=1, stable=True)
    sel_scores, sel_ids = sel_scores.gather(1, by_id), sel_ids.gather(1, by_id)
    by_score = sel_scores.argsort(dim=1, descending=True, stable=True)
    return sel_scores.gather(1, by_score), sel_ids.gather(1, by_score)


class ExactCosineIndex:
    """Exact cosine top-N over a pool, in bounded query batches x pool chunks."""

    def __init__(self, pool_PE: torch.Tensor | np.ndarray, pool_chunk_size: int = 16384,
                 query_batch_size: int = 1024, device: str | torch.device = "cpu", show_progress: bool = False):
        if pool_chunk_size < 1 or query_batch_size < 1:
            raise UsageError("pool_chunk_size and query_batch_size must be positive")
        pool = _as_tensor(pool_PE)
        if pool.shape[0] == 0:
            raise UsageError("the retrieval pool is empty")
        self.device = torch.device(device)
        # Normalised once, chunk by chunk, so the pool is not held twice at full precision.
        self.pool_PE = torch.cat([F.normalize(pool[i:i + pool_chunk_size].to(self.device), dim=-1)
                                  for i in range(0, pool.shape[0], pool_chunk_size)])
        self.n_items, self.dim = self.pool_PE.shape
        self.pool_chunk_size = pool_chunk_size
        self.query_batch_size = query_batch_size
        self.show_progress = show_progress

    @torch.no_grad()
    def search(self, queries_QE: torch.Tensor | np.ndarray, n: int = DEFAULT_N_NEIGHBOURS) -> Neighbours:
        queries = _as_tensor(queries_QE)
        if queries.shape[1] != self.dim:
            raise UsageError(f"query dim {queries.shape[1]} != pool dim {self.dim}")
        if n < 1:
            raise UsageError(f"n must be >= 1, got {n}")
        n = min(n, self.n_items)
        out_scores, out_ids = [], []
        starts = range(0, queries.shape[0], self.query_batch_size)
        for q0 in tqdm(starts, desc="retrieval", disable=not self.show_progress, unit="batch"):
            q_BE = F.normalize(queries[q0:q0 + self.query_batch_size].to(self.device, self.pool_PE.dtype), dim=-1)
            best_s = torch.empty(q_BE.shape[0], 0, dtype=q_BE.dtype, device=self.device)
            best_i = torch.empty(q_BE.shape[0], 0, dtype=torch.long, device=self.device)
            for p0 in range(0, self.n_items, self.pool_chunk_size):
                chunk_CE = self.pool_PE[p0:p0 + self.pool_chunk_size]
                s_BC = q_BE @ chunk_CE.T
                ids_BC = torch.arange(p0, p0 + chunk_CE.shape[0], device=self.device).expand_as(s_BC)
                cs, ci = _select_topn_stable(s_BC, ids_BC, n, ids_ascending=True)
                best_s, best_i = _select_topn_stable(torch.cat([best_s, cs], 1), torch.cat([best_i, ci], 1), n)
            out_scores.append(best_s.cpu())
            out_ids.append(best_i.cpu())
        if not out_scores:
            return Neighbours(torch.empty(0, n), torch.empty(0, n, dtype=torch.long))
        return Neighbours(torch.cat(out_scores), torch.cat(out_ids))


class FaissCosineIndex:
    """A FAISS inner-product index over unit-normalised embeddings.

    `kind`: `"flat"` (exact), `"hnsw"` (graph, approximate; `hnsw_m` links, `ef_search` breadth) or
    `"ivf"` (inverted lists, approximate; `n_lists` clusters trained on the pool, `n_probe` visited).
    """

    def __init__(self, pool_PE: torch.Tensor | np.ndarray, kind: Literal["flat", "hnsw", "ivf"] = "hnsw",
                 hnsw_m: int = 32, ef_search: int = 128, n_lists: int | None = None, n_probe: int = 16,
                 query_batch_size: int = 16384):
        try:
            import faiss
        except ImportError as e:
            raise ImportError("FaissCosineIndex needs FAISS: pip install faiss-cpu "
                              "(or `pip install sae-lens-vision-steer[faiss]`)") from e
        pool = _np_unit(pool_PE)
        if pool.shape[0] == 0:
            raise UsageError("the retrieval pool is empty")
        self.n_items, self.dim = pool.shape
        self.kind = kind
        self.query_batch_size = query_batch_size
        metric = faiss.METRIC_INNER_PRODUCT
        if kind == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, hnsw_m, metric)
            index.hnsw.efSearch = ef_search
        elif kind == "ivf":
            n_lists = n_lists or max(1, int(4 * np.sqrt(self.n_items)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, n_lists, metric)
            index.train(pool)
            index.nprobe = n_probe
        else:
            raise UsageError(f"unknown FAISS index kind {kind!r}; use 'flat', 'hnsw' or 'ivf'")
        index.add(pool)
        self.index = index

    def search(self, queries_QE: torch.Tensor | np.ndarray, n: int = DEFAULT_N_NEIGHBOURS) -> Neighbours:
        q = _np_unit(queries_QE)
        if q.shape[1] != self.dim:
            raise UsageError(f"query dim {q.shape[1]} != pool dim {self.dim}")
        n = min(n, self.n_items)
        scores, ids = [], []
        for q0 in range(0, q.shape[0], self.query_batch_size):
            s, i = self.index.search(q[q0:q0 + self.query_batch_size], n)
            scores.append(s)
            ids.append(i)
        s_QN = np.concatenate(scores) if scores else np.empty((0, n), np.float32)
        i_QN = np.concatenate(ids) if ids else np.empty((0, n), np.int64)
        if (i_QN < 0).any():  # FAISS pads with -1 when an approximate search finds fewer than n
            raise RuntimeError("the FAISS index returned fewer than n neighbours; raise ef_search/n_probe")
        return Neighbours(torch.from_numpy(s_QN), torch.from_numpy(i_QN.astype(np.int64)))


def _np_unit(x: torch.Tensor | np.ndarray) -> np.ndarray:
    t = _as_tensor(x).float()
    return np.ascontiguousarray(F.normalize(t, dim=-1).cpu().numpy(), dtype=np.float32)


def build_index(pool_PE: torch.Tensor | np.ndarray, backend: str = "exact", **kwargs) -> CosineIndex:
    """`backend`: `"exact"` (chunked torch), or `"faiss-flat"`, `"faiss-hnsw"`, `"faiss-ivf"`."""
    if backend == "exact":
        return ExactCosineIndex(pool_PE, **kwargs)
    if backend.startswith("faiss-"):
        return FaissCosineIndex(pool_PE, kind=backend.removeprefix("faiss-"), **kwargs)  # type: ignore[arg-type]
    raise UsageError(f"unknown retrieval backend {backend!r}; use exact, faiss-flat, faiss-hnsw or faiss-ivf")
