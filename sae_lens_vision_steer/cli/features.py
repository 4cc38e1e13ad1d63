"""`vision-steer features`: a static feature browser (HTML/JS/PNG) for an SAE over an activation cache."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .common import (
    add_model_args,
    add_progress_arg,
    load_model,
    peak_rss_mib,
    positive_int,
    resolve_model_args,
)

HELP = "write a static feature browser for an SAE (top images, heatmaps, promoted classes)"
DESCRIPTION = (HELP + ". Per-latent statistics come from one pass over --cache (usually the SAE's training "
               "cache); the images are re-read from the data set the cache records (--data-dir if it moved). "
               "The folder opens from disk without a server.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, help="activation cache folder at the SAE's hook")
    p.add_argument("--sae", required=True, help="SAE folder (from `vision-steer train`)")
    p.add_argument("--results", default=None,
                   help="results.json of `vision-steer eval` on the same data set: adds VS2 per-class changes")
    p.add_argument("--data-dir", default=None, help="the cache's image folder, if it moved since caching")
    p.add_argument("--top-k", type=positive_int, default=12, help="top images per latent")
    p.add_argument("--heatmap", default="auto", choices=["auto", "gradient", "attention", "occlusion", "sae", "none"],
                   help="patch heatmaps: auto = sae for patch/all-token caches, else gradient (gradient x input "
                        "of the latent at the patch tokens entering the SAE's block: latent-specific, one backward "
                        "pass per image and latent); attention = CLS attention in the SAE's block (the same for "
                        "every latent); occlusion = latent-specific, 1 + n_patches forwards per image")
    p.add_argument("--templates", default=None, help="prompt templates for the class embeddings (default: the data set's)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier feature browser)")
    add_model_args(p, from_sae=True)
    add_progress_arg(p)


def run(args: argparse.Namespace) -> int:
    from ..explore import build_feature_browser, check_destination, read_results
    from ..explore.html import display_text
    from ..sae.loading import load_sae

    t0 = time.perf_counter()
    check_destination(Path(args.out))  # before loading anything
    if args.results:
        read_results(args.results)  # a bad file is refused before the model loads (checked again by the build)
    sae = load_sae(args.sae, args.device)
    for note in resolve_model_args(args, sae, args.sae):
        print(f"using {note}")
    model = load_model(args)
    fb = build_feature_browser(args.cache, sae, model, args.out, top_k=args.top_k, heatmap=args.heatmap,
                               results=args.results, data_dir=args.data_dir, templates=args.templates,
                               sae_source=args.sae, show_progress=not args.no_progress)
    st = fb.stats
    print(f"feature browser {display_text(fb.path)}: {len(st.alive)} latent pages, {len(st.dead)} dead latents listed, "
          f"{fb.n_images_written} images, {st.n_images} cache images")
    for n in fb.notes:
        print(f"note: {n}")
    t = fb.timing
    print(f"time {time.perf_counter() - t0:.1f} s (statistics pass {t['stats_pass_s']:.1f} s, images and heatmaps "
          f"{t['images_heatmaps_s']:.1f} s, pages {t['pages_s']:.1f} s), peak RSS {peak_rss_mib():.0f} MiB")
    print(f"open {display_text(fb.path / 'index.html')}")
    return 0
