"""`vision-steer cache`: store image-tower activations at one or more hooks on disk (resumable)."""

from __future__ import annotations

import argparse
import time

from ..core.errors import UsageError
from .common import (
    add_data_args,
    add_model_args,
    add_progress_arg,
    load_data,
    load_model,
    peak_rss_mib,
    positive_int,
    resolve_model_args,
)

HELP = "cache CLIP image-tower activations to disk for SAE training"
DESCRIPTION = (HELP + ". Running the same command again resumes an interrupted run at the first "
               "unwritten shard, or reuses a complete cache after checking every file's sha256 (--repair "
               "recomputes only damaged shards); a folder holding a different cache is refused.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p, split="train")
    g = p.add_argument_group("cache")
    g.add_argument("--hook", action="append", default=None, metavar="NAME",
                   help="hook point to cache (repeatable); default: the final block's hook_resid_post")
    g.add_argument("--positions", choices=["cls", "patches", "all"], default="cls", help="token positions to keep")
    g.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16", help="storage dtype")
    g.add_argument("--shard-size", type=positive_int, default=8192, help="rows per shard file")
    g.add_argument("--out", required=True, help="cache folder")
    g.add_argument("--overwrite", action="store_true", help="replace a cache already in --out")
    g.add_argument("--repair", action="store_true",
                   help="recompute only the damaged shards of a complete cache (checked by sha256)")
    g.add_argument("--stream", action="store_true",
                   help="read the data as a stream, nothing downloaded first: WebDataset tar shards (--dataset "
                        "webdataset --data-dir DIR, or an OOD data set's Hub shards) or a `datasets` stream (Hub "
                        "data sets); --limit = the first N samples; one reader thread (--num-workers is ignored)")
    add_progress_arg(g)


def interrupted(args: argparse.Namespace) -> str:
    import json
    from pathlib import Path

    try:
        meta = json.loads((Path(args.out) / "metadata.json").read_text())
        shards = meta.get("shards", [])
        rows = sum(r["n_rows"] for r in shards)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return f"nothing of the cache was saved in {args.out}"
    return (f"{len(shards)} complete shard(s) ({rows} rows) are saved in {args.out}; run the same command again "
            "to resume")


def run(args: argparse.Namespace) -> int:
    from ..activation_cache import cache_activations
    from ..core.identity import model_label

    if args.overwrite and args.repair:
        raise UsageError("give --repair or --overwrite, not both")
    t0 = time.perf_counter()
    resolve_model_args(args)
    model = load_model(args)
    if args.stream:  # one stream, read ahead by one thread (workers would each read the whole stream)
        args.num_workers = 0
    data = load_data(args, model)
    hooks = args.hook or [model.steer_hook]
    t1 = time.perf_counter()
    cache = cache_activations(model, data, hooks, args.out, positions=args.positions, dtype=args.dtype,
                              batch_size=args.batch_size, num_workers=args.num_workers, shard_size=args.shard_size,
                              show_progress=not args.no_progress, overwrite=args.overwrite, repair=args.repair)
    t2 = time.perf_counter()
    m = cache.metadata
    print(f"cache {cache.root}: {model_label(m['model_name'], m['pretrained'])} on {m['dataset']}/{m['split']}, "
          f"{m['n_images_cached']} images ({m['n_images_skipped']} skipped), {cache.n_rows} rows "
          f"({m['positions']}, stored as {m['dtype']}, computed in {m['request'].get('precision', 'fp32')}) in "
          f"{cache.n_shards} shards")
    for mem in m["request"].get("members") or []:  # a union (union.py)
        print(f"  member {mem['dataset']}/{mem['split']}: {mem['n_images']} images from image {mem['first_image']}")
    for h in cache.hook_names:
        s = cache.stats(h)
        print(f"  {h}: d_in {cache.d_in(h)}, mean norm {s['mean_norm']:.3f}, "
              f"E||x - mean||^2 {s['mean_sq_dist_to_mean']:.3f}, max |x| {s['max_abs']:.3f}")
    per_image = m["request"]["rows_per_image"]
    images_now = (cache.rows_written or 0) / per_image
    images_before = (cache.n_rows - (cache.rows_written or 0)) / per_image  # a resumed or reused cache
    earlier = f", {images_before:.0f} by an earlier run" if images_before else ""
    print(f"time {t2 - t1:.1f} s ({images_now:.0f} images cached by this run{earlier}, "
          f"{images_now / max(t2 - t1, 1e-9):.1f} images/s; setup {t1 - t0:.1f} s), peak RSS {peak_rss_mib():.0f} MiB")
    return 0
