"""Caching throughput vs plain `encode_image` over the same DataLoader, in one process.

    python scripts/bench_cache_throughput.py --model ViT-B-32 --limit 512 --batch-size 64 --num-workers 1

Random weights (no download). Reports images/s of both, their ratio, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.activation_cache import cache_activations
from sae_lens_vision_steer.cli.common import peak_rss_mib
from sae_lens_vision_steer.data import load_image_dataset, make_loader


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--data-dir", default="/work/shared/datasets/tiny-imagenet-200")
    p.add_argument("--limit", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--hook", default=None)
    p.add_argument("--rounds", type=int, default=1, help="alternate encode/cache this many times")
    args = p.parse_args()

    torch.manual_seed(0)
    model = HookedCLIP.from_pretrained(args.model, pretrained=None)
    hook = args.hook or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    ds = load_image_dataset("tiny-imagenet", "train", args.data_dir, transform=model.preprocess, limit=args.limit)
    times = {"encode_image": 0.0, "cache": 0.0}
    for _ in range(args.rounds):
        t = time.perf_counter()
        with torch.inference_mode():
            for batch in make_loader(ds, args.batch_size, args.num_workers):
                model.encode_image(batch.images)
        times["encode_image"] += time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            cache_activations(model, ds, hook, d, batch_size=args.batch_size, num_workers=args.num_workers,
                              show_progress=False)
            times["cache"] += time.perf_counter() - t
    n = len(ds) * args.rounds
    ips = {k: n / v for k, v in times.items()}
    print(json.dumps({"model": args.model, "hook": hook, "images": n, "torch_threads": torch.get_num_threads(),
                      "images_per_second": ips, "cache_over_encode_ratio": ips["cache"] / ips["encode_image"],
                      "peak_rss_mib": peak_rss_mib()}, indent=1))


if __name__ == "__main__":
    main()
