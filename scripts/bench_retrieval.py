"""Time cosine top-N retrieval per 1,000 queries (VS2++'s neighbour search).

    python scripts/bench_retrieval.py                      # 20,000 x 512 random pool, N = 50
    python scripts/bench_retrieval.py --pool-cache runs/x/cache_train --model ViT-B-32 --random-weights

With `--pool-cache`, real CLIP embeddings (`model.head` of the cached final CLS) are the pool and the
queries are pool rows plus noise; recall of the FAISS indexes is measured against the exact search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool-size", type=int, default=20000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="exact,faiss-flat,faiss-hnsw,faiss-ivf")
    p.add_argument("--pool-cache", default=None)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from sae_lens_vision_steer.retrieval import build_index

    g = torch.Generator().manual_seed(0)
    if args.pool_cache:
        from sae_lens_vision_steer.activation_cache import ActivationCache
        from sae_lens_vision_steer.hooked_clip import HookedCLIP

        torch.manual_seed(args.seed)
        model = HookedCLIP.from_pretrained(args.model, pretrained=None if args.random_weights else "openai")
        cache = ActivationCache.open(args.pool_cache)
        cls = cache.load(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
        with torch.no_grad():
            pool = torch.cat([model.head(c) for c in cls.split(2048)])
        pick = torch.randint(0, len(pool), (args.queries,), generator=g)
        queries = pool[pick] + 0.1 * pool.std() * torch.randn(args.queries, pool.shape[1], generator=g)
        source = f"CLIP embeddings from {args.pool_cache}"
    else:
        pool = torch.randn(args.pool_size, args.dim, generator=g)
        queries = torch.randn(args.queries, args.dim, generator=g)
        source = "random Gaussian"
    print(f"pool {tuple(pool.shape)} ({source}), {len(queries)} queries, N = {args.n}, "
          f"torch threads {torch.get_num_threads()}")
    exact = None
    report = {}
    for backend in args.backends.split(","):
        try:
            t0 = time.perf_counter()
            index = build_index(pool, backend=backend)
            build_s = time.perf_counter() - t0
        except ImportError as e:
            print(f"{backend}: skipped ({e})")
            continue
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            nb = index.search(queries, args.n)
            times.append(time.perf_counter() - t0)
        per_1000 = 1000 * statistics.median(times) / len(queries)
        if backend == "exact":
            exact = nb
        recall = None
        if exact is not None:
            hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nb.indices_QN, exact.indices_QN))
            recall = hits / exact.indices_QN.numel()
        report[backend] = {"build_s": build_s, "s_per_1000_queries": per_1000, "recall_vs_exact": recall}
        print(f"{backend:11s} build {build_s:6.2f} s   search {per_1000:7.3f} s / 1000 queries"
              + (f"   recall@{args.n} {recall:.3f}" if recall is not None else ""))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
