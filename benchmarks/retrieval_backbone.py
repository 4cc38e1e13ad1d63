"""DINOv2 retrieval for VS2++ (issue 12): feature time and search time, separately.

The paper's setting is 1,000 queries against a 20,000-image pool with DINOv2 features. Two costs:

  A  feature time: `retrieval_backbone.embed_images` with a DINOv2-base backbone (transformers
     `Dinov2Model`, the `facebook/dinov2-base` shape: 12 x 768, patch 14, 224 px; random weights, since
     the cost depends on the shape only), Tiny-ImageNet images read and preprocessed by the backbone's
     own transform, `--feature-images` images per round, reported as s per 1,000 images;
  B  search time: `retrieval.ExactCosineIndex` over a `--pool` x 768 pool (index build + search of
     `--queries` queries, top `--n`), reported as s per 1,000 queries;
  C  reuse: reading the cached pool embeddings (`--pool` x 768 float32, sha256-checked), what a second
     run pays instead of A for the pool.

Figures (ratios of variants measured side by side): B / A and C / A. The full-size feature time for
pool + queries is `(pool + queries) / 1000 * A` (printed, extrapolated: on a CPU the 21,000 images are
not embedded for real).

    python benchmarks/retrieval_backbone.py                      # search and reuse at full size
    python benchmarks/retrieval_backbone.py --feature-images 16 --reps 2   # smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import TINY_IMAGENET_DIR, Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()

from _setup import add_common_args  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", type=int, default=20000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--n", type=int, default=50, help="neighbours per query")
    p.add_argument("--feature-images", type=int, default=64, help="images embedded per timed feature round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    add_common_args(p, reps=3, warmup=1)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import transformers

    from sae_lens_vision_steer import HookedCLIP
    from sae_lens_vision_steer.data import load_image_dataset
    from sae_lens_vision_steer.retrieval.index import ExactCosineIndex
    from sae_lens_vision_steer.retrieval.backbone import RetrievalEmbeddingCache, embed_images

    set_threads(args.threads)
    print_header("retrieval_backbone", args)
    torch.manual_seed(args.seed)
    backbone = HookedCLIP(transformers.Dinov2Model(transformers.Dinov2Config()).eval()).to(args.device)
    backbone.requires_grad_(False)
    data = load_image_dataset("tiny-imagenet", "train", args.data_dir).subset(args.feature_images)
    g = torch.Generator().manual_seed(args.seed)
    pool = torch.randn(args.pool, backbone.cfg.embed_dim, generator=g)
    queries = torch.randn(args.queries, backbone.cfg.embed_dim, generator=g)
    folder = RetrievalEmbeddingCache(Path(tempfile.mkdtemp(dir=args.work_dir if args.work_dir.is_dir() else None)),
                                     {"model_name": "bench", "model_fingerprint": "bench"})
    folder.get("pool", {"dataset": "bench", "n_rows": args.pool}, lambda: (pool.numpy(), np.arange(args.pool)))

    def features():
        with torch.inference_mode():
            embed_images(backbone, data, None, args.batch_size, num_workers=0)

    def search():
        ExactCosineIndex(pool).search(queries, args.n)

    def reuse():
        folder.get("pool", {"dataset": "bench", "n_rows": args.pool}, lambda: (_ for _ in ()).throw(RuntimeError))

    t = interleave({"features": features, "search": search, "reuse": reuse}, reps=args.reps, warmup=args.warmup)
    a = summarize([v * 1000 / args.feature_images for v in t.wall["features"]])
    b = summarize([v * 1000 / args.queries for v in t.wall["search"]])
    c = summarize(t.wall["reuse"])
    total = (args.pool + args.queries) / 1000 * a.median
    desc = (f"DINOv2-base shape, {args.device}, {args.feature_images} Tiny-ImageNet images per feature round; "
            f"features {a.median:.1f} s per 1,000 images (pool {args.pool} + {args.queries} queries: "
            f"~{total:.0f} s extrapolated); search {b.median:.3f} s per 1,000 queries over {args.pool} x 768, "
            f"top {args.n}; cached pool read {c.median:.3f} s")
    report(Figure("retrieval_backbone/search_per_1000_queries_vs_features_per_1000_images", a, b, "time",
                  "DINOv2-base features per 1,000 images", "ExactCosineIndex search per 1,000 queries", None, desc),
           args.json_out)
    report(Figure("retrieval_backbone/cached_pool_read_vs_features_per_1000_images", a, c, "time",
                  "DINOv2-base features per 1,000 images", f"cached {args.pool}-row pool read + sha256", None, desc),
           args.json_out)


if __name__ == "__main__":
    main()
