"""The training loader against a plain numpy memmap with a global shuffle (issue 21, item 1).

Two stores in the real format (written by `cache_activations` from the shared Tiny-ImageNet training
images):

  patch  the small CLIP (`assets/tiny-clip-tinyimagenet`), every token of its final block: 20,000 images
         x 17 tokens = 340,000 rows x 128 (float16)
  wide   a one-block 768-wide tower (random weights) on 64 px images with 32 px patches, every token
         (CLS + 4 patches): 20,000 images x 5 = 100,000 rows x 768 (float16)

Variants, interleaved, over the same rows (the training rows of `train_sae`'s default 10% hold-out), batch
256, float32 batches on the CPU:

  A  plain numpy: every row of the store in one `.npy` file opened once with `np.load(mmap_mode="r")`, a
     global permutation per epoch, each batch `torch.from_numpy(mm[np.sort(perm[i:i + 256])]).float()`
  B  `activation_batches` as `train_sae` uses it: one stream over the store's `ShardMaps` (block shuffle,
     default buffer), opened once; the one-time costs (open with its sha256 and finiteness checks; the first
     batch, which allocates and fills the buffers) are timed apart and printed
  P  the same with SAELens' `PrefetchingIterator` (prefetch 4): the CUDA default

Steady state, as in a training run: each timed run takes the next batches from the same memmap / stream.

Figures: rows/s of B over A and of P over A (target >= 0.7), per store; and batch diversity: distinct
images per batch of B's stream over a uniform permutation's (target >= 0.9), on the patch store.

    python benchmarks/loader_shuffle.py                       # both stores, 5 rounds of 2 epochs each
    python benchmarks/loader_shuffle.py --n-images 2000 --wide-images 2000 --reps 2   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import TINY_IMAGENET_DIR, Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()

from _setup import add_common_args, tiny_imagenet  # noqa: E402

SMALL_CLIP = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip-tinyimagenet"
WIDE_TOWER = dict(embed_dim=512, vision_cfg=dict(image_size=64, patch_size=32, width=768, layers=1, head_width=64),
                  text_cfg=dict(context_length=77, width=64, heads=2, layers=1))


def build_store(args, name: str):
    import torch

    from sae_lens_vision_steer import HookedCLIP
    from sae_lens_vision_steer.activation_cache import cache_activations

    if name == "patch":
        model = HookedCLIP.from_pretrained(f"local-dir:{SMALL_CLIP}").eval().requires_grad_(False)
        n, out = args.n_images, args.work_dir / f"loader_patch_{args.n_images}"
        if args.shard_size != 8192:
            out = out.with_name(out.name + f"_shard{args.shard_size}")
    else:
        torch.manual_seed(args.seed)
        model = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, **WIDE_TOWER).eval().requires_grad_(False)
        n, out = args.wide_images, args.work_dir / f"loader_wide5_{args.wide_images}"
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    ds = tiny_imagenet("train", n, model.preprocess, args.data_dir)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = cache_activations(model, ds, hook, out, positions="all", batch_size=256,
                                  shard_size=args.shard_size if name == "patch" else 8192,
                                  num_workers=args.num_workers, show_progress=False)
    print(f"# store {name}: {cache.n_rows} rows x {cache.d_in(hook)} ({cache.metadata['dtype']}, {cache.n_shards} "
          f"shards) ready in {time.perf_counter() - t0:.1f} s", flush=True)
    npy = out.with_name(out.name + "_rows.npy")
    if not npy.is_file():
        mm = np.lib.format.open_memmap(npy.with_suffix(".tmp.npy"), mode="w+", dtype=np.float16,
                                       shape=(cache.n_rows, cache.d_in(hook)))
        for s, (first, count) in enumerate(cache.shard_offsets):
            mm[first:first + count] = cache.read_shard(s, hook, torch.float16)["acts"].numpy()
        mm.flush()
        del mm
        npy.with_suffix(".tmp.npy").rename(npy)
    return cache, hook, npy


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=20000, help="images of the patch store (17 rows each)")
    p.add_argument("--wide-images", type=int, default=20000, help="images of the wide store (5 rows each)")
    p.add_argument("--stores", default="patch,wide")
    p.add_argument("--shard-size", type=int, default=8192, help="rows per shard of the patch store (the default's)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the training rows per timed run")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers when building the stores")
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    add_common_args(p, reps=5)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer.activation_cache import ShardMaps
    from sae_lens_vision_steer.training.batches import (
        LoaderStats, ShufflePlan, activation_batches, default_buffer_rows, holdout_split, rows_mask, shuffled_rows,
    )

    set_threads(args.threads)
    print_header("loader_shuffle", args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    b = args.batch_size
    for name in args.stores.split(","):
        cache, hook, npy = build_store(args, name)
        train_rows, _ = holdout_split(cache, 0.1, 0)
        n_batches = args.epochs * len(train_rows) // b
        rows_per_run = n_batches * b
        opens: list[float] = []

        # Steady state, as in a training run: one memmap / one stream, opened and started once (untimed); each
        # timed run takes the next `n_batches` batches from it.
        mm = np.load(npy, mmap_mode="r")
        rng = np.random.default_rng(args.seed)
        t0 = time.perf_counter()
        maps = ShardMaps(cache, hook)
        opens.append(time.perf_counter() - t0)
        streams = {}
        for prefetch in (0, 4):
            stats = LoaderStats()
            t0 = time.perf_counter()
            streams[prefetch] = activation_batches(maps, hook, b, rows=train_rows, seed=args.seed, prefetch=prefetch,
                                                   stats=stats)
            next(streams[prefetch])  # the first buffer is read and its memory touched: one-time costs
            opens.append(time.perf_counter() - t0)

        def plain() -> None:
            left, x = n_batches, None
            while left:
                perm = train_rows[rng.permutation(len(train_rows))]
                for i in range(0, min(left, len(perm) // b) * b, b):
                    x = torch.from_numpy(mm[np.sort(perm[i:i + b])]).float()
                    left -= 1
            del x

        def ours(prefetch: int) -> None:
            it = streams[prefetch]
            for _ in range(n_batches):
                x = next(it)
            del x

        t = interleave({"plain": plain, "ours": lambda: ours(0), "prefetch": lambda: ours(4)},
                       reps=args.reps, warmup=args.warmup)
        a = summarize(t.wall["plain"])
        desc = (f"{name} store {cache.n_rows} x {cache.d_in(hook)} {cache.metadata['dtype']} ({cache.n_shards} shards), "
                f"{rows_per_run} rows per run (batch {b}); one-time costs: open with sha256 + finite checks "
                f"{opens[0]:.3g} s, first batch (buffers allocated and filled) {opens[1]:.3g} s")
        for it in streams.values():
            if hasattr(it, "close"):
                it.close()
        for key, label in (("ours", "activation_batches (in-process, as train_sae on the CPU)"),
                           ("prefetch", "activation_batches with PrefetchingIterator(4)")):
            bb = summarize(t.wall[key])
            report(Figure(f"loader_shuffle/{name}/{key}", a, bb, "speed", "numpy memmap, global shuffle", label,
                          ">= 0.7", desc + f"; {rows_per_run / a.median:,.0f} vs {rows_per_run / bb.median:,.0f} rows/s",
                          {"rows_per_s_a": rows_per_run / a.median, "rows_per_s_b": rows_per_run / bb.median}),
                   args.json_out)
        if name == "patch":
            img = cache.image_index
            plan = ShufflePlan.build(rows_mask(cache, train_rows), [f for f, _ in cache.shard_offsets], args.seed,
                                     buffer_rows=default_buffer_rows(b, len(train_rows)))
            ours_d = [len(np.unique(img[r])) for _, r in zip(range(len(train_rows) // b), shuffled_rows(plan, b))]
            perm = np.random.default_rng(args.seed).permutation(train_rows)
            uni_d = [len(np.unique(img[perm[i:i + b]])) for i in range(0, len(perm) - b + 1, b)]
            ratio = float(np.mean(ours_d) / np.mean(uni_d))
            print(f"loader_shuffle/{name}/diversity: {ratio:.4f} distinct images per batch, block shuffle "
                  f"{np.mean(ours_d):.1f} / uniform permutation {np.mean(uni_d):.1f} (batch {b}, "
                  f"{len(ours_d)} batches; min {min(ours_d)} / {min(uni_d)}) target >= 0.9: "
                  f"{'met' if ratio >= 0.9 else 'MISSED'}", flush=True)


if __name__ == "__main__":
    main()
