"""Retrieval: chunked exact top-N equals a brute-force full-matrix search, ties included."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from sae_lens_vision_steer.retrieval.index import (
    ExactCosineIndex,
    FaissCosineIndex,
    build_index,
)


def brute_force_topn(queries: torch.Tensor, pool: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full query x pool cosine matrix; rows sorted by (similarity desc, pool index asc) in Python."""
    q = queries / queries.norm(dim=1, keepdim=True)
    p = pool / pool.norm(dim=1, keepdim=True)
    sims = (q @ p.T).tolist()
    ids, scores = [], []
    for row in sims:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:n]
        ids.append(order)
        scores.append([row[j] for j in order])
    return torch.tensor(scores, dtype=queries.dtype), torch.tensor(ids)


@pytest.mark.parametrize("chunk,qbatch", [(1, 1), (7, 3), (64, 5), (100, 100), (1000, 64)])
def test_exact_index_matches_brute_force(chunk: int, qbatch: int) -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(203, 16, generator=g, dtype=torch.float64)
    queries = torch.randn(11, 16, generator=g, dtype=torch.float64)
    ref_s, ref_i = brute_force_topn(queries, pool, 10)
    got = ExactCosineIndex(pool, pool_chunk_size=chunk, query_batch_size=qbatch).search(queries, 10)
    assert torch.equal(got.indices_QN, ref_i)
    torch.testing.assert_close(got.scores_QN, ref_s)


def _tied_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """Rows with four entries of +-0.5 (unit norm, exact dot products): many exactly equal scores."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim))
    for r in range(n):
        cols = rng.choice(dim, size=4, replace=False)
        x[r, cols] = rng.choice([-0.5, 0.5], size=4)
    return torch.tensor(x, dtype=torch.float32)


@pytest.mark.parametrize("chunk", [1, 5, 8, 13, 50, 500])
def test_ties_are_broken_by_pool_index_across_chunk_boundaries(chunk: int) -> None:
    pool = _tied_embeddings(120, 6, seed=1)  # only C(6,4)*16 = 240 distinct rows: many duplicates
    queries = _tied_embeddings(9, 6, seed=2)
    ref_s, ref_i = brute_force_topn(queries, pool, 17)
    # The fixture really does put ties at the cut-off (otherwise this test would test nothing).
    q = queries / queries.norm(dim=1, keepdim=True)
    sims = q @ pool.T
    assert any(int((sims[r] == ref_s[r, -1]).sum()) > int((ref_s[r] == ref_s[r, -1]).sum()) for r in range(9))
    got = ExactCosineIndex(pool, pool_chunk_size=chunk, query_batch_size=4).search(queries, 17)
    assert torch.equal(got.indices_QN, ref_i)
    assert torch.equal(got.scores_QN, ref_s)


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_rows_with_and_without_ties_in_one_batch(chunk: int) -> None:
    """Duplicate images in a real pool: only some queries see a tie at the cut-off."""
    g = torch.Generator().manual_seed(4)
    pool = torch.randn(200, 16, generator=g, dtype=torch.float64)
    pool[150:160] = pool[3]  # eleven identical rows: 3 and 150..159
    queries = torch.cat([pool[3:4], torch.randn(5, 16, generator=g, dtype=torch.float64), pool[3:4] * 2])
    ref_s, ref_i = brute_force_topn(queries, pool, 5)
    assert ref_i[0].tolist() == [3, 150, 151, 152, 153] and ref_i[-1].tolist() == [3, 150, 151, 152, 153]
    got = ExactCosineIndex(pool, pool_chunk_size=chunk, query_batch_size=4).search(queries, 5)
    assert torch.equal(got.indices_QN, ref_i)
    torch.testing.assert_close(got.scores_QN, ref_s)


def test_duplicated_pool_rows_come_back_in_index_order() -> None:
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = base[[0, 1, 0, 1, 0, 1, 0]]  # rows 0, 2, 4, 6 are the same vector
    got = ExactCosineIndex(pool, pool_chunk_size=3).search(torch.tensor([[2.0, 0.0]]), 3)
    assert got.indices_QN.tolist() == [[0, 2, 4]]


def test_n_larger_than_pool_returns_whole_pool_sorted() -> None:
    pool = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    got = ExactCosineIndex(pool, pool_chunk_size=2).search(torch.tensor([[0.0, 1.0]]), 10)
    assert got.indices_QN.tolist() == [[2, 1, 0]]
    torch.testing.assert_close(got.scores_QN, torch.tensor([[1.0, 0.8, 0.0]]))


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        ExactCosineIndex(torch.empty(0, 4))
    idx = ExactCosineIndex(torch.randn(10, 4))
    with pytest.raises(ValueError, match="dim"):
        idx.search(torch.randn(2, 5))
    with pytest.raises(ValueError, match="2-D"):
        idx.search(torch.randn(4))
    with pytest.raises(ValueError, match="backend"):
        build_index(torch.randn(10, 4), backend="annoy")


def test_faiss_flat_matches_exact_and_hnsw_recalls_clustered_data() -> None:
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(20, 32, generator=g)
    pool = centres[torch.arange(2000) % 20] + 0.3 * torch.randn(2000, 32, generator=g)
    queries = centres[torch.arange(50) % 20] + 0.3 * torch.randn(50, 32, generator=g)
    exact = ExactCosineIndex(pool).search(queries, 25)
    flat = build_index(pool, backend="faiss-flat").search(queries, 25)
    # FAISS computes in float32 with its own kernels: compare neighbour sets and scores, not tie order.
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(flat.indices_QN, exact.indices_QN))
    torch.testing.assert_close(flat.scores_QN, exact.scores_QN, atol=1e-5, rtol=0)
    hnsw = FaissCosineIndex(pool, kind="hnsw").search(queries, 25)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 25 for a, b in zip(hnsw.indices_QN, exact.indices_QN)])
    assert recall > 0.8


def test_missing_faiss_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        FaissCosineIndex(torch.randn(10, 4))
