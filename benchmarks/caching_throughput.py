"""Activation-caching throughput (issue 7, figure 2).

ViT-B-32 (random weights) on the shared Tiny-ImageNet training images (20,000 by default).

1. `cache_final`: images/s of `cache_activations` for the final block's CLS (decode, preprocess,
   forward, shard writes, checksums, statistics) over images/s of a plain loop of
   `model.encode_image` over the same DataLoader (same batch size and workers). Target >= 0.95.
2. `cache_block5_early_stop`: images/s of caching `blocks.5.hook_resid_post` (the forward stops after
   block 5) over images/s of caching the final block (a full forward). Should be clearly > 1.

So that the two variants of a figure see the same machine conditions, the images are split into
`--chunks` contiguous chunks and the variants alternate chunk by chunk (A B, B A, ...); every variant
processes every image once. Each caching call writes a fresh cache folder (per-call fixed costs such
as the weight fingerprint are paid once per chunk, a slight disadvantage to caching).

    python benchmarks/caching_throughput.py                                # full: 20,000 images
    python benchmarks/caching_throughput.py --n-images 64 --chunks 2 --batch-size 16   # smoke
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    TINY_IMAGENET_DIR, Figure, interleave, print_header, quiet_progress, report, set_threads, summarize,
)

quiet_progress()

from _setup import TOWERS, add_common_args, build_model, final_hook, head, split_dataset, tiny_imagenet  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=20000, help="training images (evenly spaced over the classes)")
    p.add_argument("--n-images-early-stop", type=int, default=None,
                   help="images for the block-5 figure (default: --n-images)")
    p.add_argument("--chunks", type=int, default=10, help="interleaving chunks per figure")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--dtype", default="float16", help="cache dtype")
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    p.add_argument("--tower", choices=sorted(TOWERS), default="vit-b-32",
                   help="narrow: a one-block 768-wide tower on 32 px images, isolating the writer's own cost "
                        "(a diagnostic; the figure of record is vit-b-32)")
    p.add_argument("--skip", choices=["final", "early-stop"], action="append", default=[],
                   help="leave out a figure")
    add_common_args(p, reps=1, warmup=0)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer import make_loader
    from sae_lens_vision_steer.activation_cache import cache_activations

    threads = set_threads(args.threads)
    print_header("caching_throughput", args)
    model = build_model(args.tower, args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="caching_throughput_", dir=_mkdir(args.work_dir)))

    def plain_pass(ds) -> None:
        with torch.inference_mode():
            for batch in make_loader(ds, args.batch_size, args.num_workers):
                model.encode_image(batch.images)

    def cache_pass(ds, hook: str) -> None:
        out = scratch / f"cache_{time.monotonic_ns()}"
        cache_activations(model, ds, hook, out, dtype=args.dtype, batch_size=args.batch_size,
                          num_workers=args.num_workers, show_progress=False)
        torch.set_num_threads(threads)  # (a guard: nothing above should change it)
        shutil.rmtree(out)

    def run_figure(n_images: int, variants) -> tuple[dict[str, list[float]], int]:
        ds = tiny_imagenet("train", n_images, model.preprocess, args.data_dir)
        chunks = split_dataset(ds, args.chunks)
        if args.warmup:  # warm the model and the page cache on a few images (untimed)
            warm = head(chunks[0], args.batch_size)
            for fn in variants.values():
                fn(warm)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for i, chunk in enumerate(chunks):  # interleaved chunk by chunk; order alternates
            t = interleave({k: (lambda fn=fn: fn(chunk)) for k, fn in variants.items()}, reps=1, warmup=0)
            for k in variants:
                times[k].append(t.wall[k][0])
            # reverse the order for the next chunk
            variants = dict(reversed(list(variants.items())))
            print(f"#   chunk {i + 1}/{len(chunks)} ({len(chunk)} images): "
                  + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        return times, len(ds)

    try:
        if "final" not in args.skip:
            hook = final_hook(model)
            times, n = run_figure(args.n_images, {"plain": plain_pass,
                                                  "cache": lambda ds: cache_pass(ds, hook)})
            a, b = summarize(times["plain"]), summarize(times["cache"])
            ips_a, ips_b = n / sum(a.values), n / sum(b.values)
            report(Figure("caching_throughput/cache_final", a, b, "speed", "plain encode_image over the loader",
                          f"cache_activations({hook}, cls, {args.dtype})", ">= 0.95",
                          f"{args.tower}, {n} images in {len(a.values)} chunks, batch {args.batch_size}, {args.num_workers} workers; "
                          f"{ips_a:.2f} vs {ips_b:.2f} images/s (totals: ratio {ips_b / ips_a:.4f})",
                          {"images_per_s_a": ips_a, "images_per_s_b": ips_b, "n_images": n}), args.json_out)
        if "early-stop" not in args.skip:
            n_early = args.n_images_early_stop or args.n_images
            early, full = f"blocks.{min(5, model.cfg.n_layers - 2)}.hook_resid_post", final_hook(model)
            if model.cfg.n_layers < 2:
                raise SystemExit("the early-stop figure needs a tower with at least 2 blocks (use --skip early-stop)")
            times, n = run_figure(n_early, {"full": lambda ds: cache_pass(ds, full),
                                            "early": lambda ds: cache_pass(ds, early)})
            a, b = summarize(times["full"]), summarize(times["early"])
            ips_a, ips_b = n / sum(a.values), n / sum(b.values)
            report(Figure("caching_throughput/cache_block5_early_stop", a, b, "speed",
                          f"cache_activations({full}) (full forward)", f"cache_activations({early}) (stops after block 5)",
                          "> 1.2", f"{args.tower}, {n} images in {len(a.values)} chunks; {ips_a:.2f} vs {ips_b:.2f} images/s",
                          {"images_per_s_a": ips_a, "images_per_s_b": ips_b, "n_images": n}), args.json_out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


if __name__ == "__main__":
    main()
