"""VS2++ exact retrieval time per 1,000 queries (issue 7, figure 6).

A pool of `--pool` (20,000) unit vectors of width `--dim` (512, the ViT-B-32 CLIP embedding) and
`--queries` (1,000) queries, top `--n` (50, the paper's N) by cosine similarity. Variants, interleaved:

  A  the textbook exact search: `(q @ pool.T).topk(n)` on pre-normalised tensors, whole score matrix
  B  `retrieval.ExactCosineIndex(pool).search(q, n)`: normalises the queries, pool in chunks, running
     top-n with deterministic tie-breaking (what VS2++ uses by default)
  F  `retrieval.FaissCosineIndex(pool, kind="flat")` (exact inner product), when faiss is installed

Figures: seconds per 1,000 queries for B (and F), each as a ratio to A. The results of B (and F) are
checked against A (same neighbours) so a fast but wrong search cannot pass.

    python benchmarks/retrieval.py                      # full: 20,000 x 512 pool, 1,000 queries
    python benchmarks/retrieval.py --pool 2000 --reps 3  # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()

from _setup import add_common_args  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=20000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n", type=int, default=50, help="neighbours per query")
    p.add_argument("--no-faiss", action="store_true")
    add_common_args(p, reps=15, warmup=2)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from sae_lens_vision_steer.retrieval.index import ExactCosineIndex

    set_threads(args.threads)
    print_header("retrieval", args)
    g = torch.Generator().manual_seed(args.seed)
    pool = torch.randn(args.pool, args.dim, generator=g)
    queries = torch.randn(args.queries, args.dim, generator=g)
    pool_unit, q_unit = F.normalize(pool, dim=-1), F.normalize(queries, dim=-1)
    index = ExactCosineIndex(pool)
    variants = {
        "textbook": lambda: (q_unit @ pool_unit.T).topk(args.n, dim=1),
        "exact_index": lambda: index.search(queries, args.n),
    }
    faiss_index = None
    if not args.no_faiss:
        try:
            from sae_lens_vision_steer.retrieval.index import FaissCosineIndex

            faiss_index = FaissCosineIndex(pool, kind="flat")
            variants["faiss_flat"] = lambda: faiss_index.search(queries, args.n)
        except ImportError:
            print("# faiss not installed: skipping the FAISS variant", flush=True)

    with torch.inference_mode():
        ref = variants["textbook"]()
        for name in variants:
            if name == "textbook":
                continue
            got = variants[name]()
            # Same neighbours up to float rounding: every returned item is at least as similar as the
            # textbook n-th neighbour (minus 1e-5), and the scores agree.
            true_QN = (q_unit[:, None, :] * pool_unit[got.indices_QN]).sum(-1)
            ok = bool((true_QN >= ref.values[:, -1:] - 1e-5).all()) and torch.allclose(
                got.scores_QN.float(), ref.values, atol=1e-5)
            if not ok:
                raise RuntimeError(f"{name} did not return the exact top-{args.n} neighbours")
        t = interleave(variants, reps=args.reps, warmup=args.warmup)

    per_k = 1000 / args.queries
    a = summarize([v * per_k for v in t.wall["textbook"]])
    desc = f"pool {args.pool} x {args.dim}, {args.queries} queries, top {args.n}; times are s per 1,000 queries"
    for name, label in (("exact_index", "ExactCosineIndex.search"), ("faiss_flat", "FaissCosineIndex(flat).search")):
        if name in t.wall:
            b = summarize([v * per_k for v in t.wall[name]])
            report(Figure(f"retrieval/{name}_per_1000_queries", a, b, "time", "(q @ pool.T).topk", label, None,
                          desc + f"; {name}: {b.median * 1e3:.1f} ms per 1,000 queries"), args.json_out)


if __name__ == "__main__":
    main()
