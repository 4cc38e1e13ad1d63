"""`vision-steer features`: wall time and peak RSS against one pass over the cache (issue 13).

Each variant runs in a fresh process (its `ru_maxrss` is its own):

  pass      one pass over the cache: read every shard at the SAE's hook (`ActivationStore.iter_shards`,
            sha256 checked) and encode every row with the SAE, the least any per-latent statistic
            needs (the bare read is timed too and printed)
  features  `build_feature_browser(cache, sae, model, out)`: the statistics pass, promoted classes,
            thumbnails and heatmaps of the top images, and every page

Figures: features wall time / pass wall time (median of `--reps` passes); the statistics pass alone
(`timing.stats_pass_s`, inside the features run) / pass; peak RSS of each. With several `--sae`, one
features run per SAE (e.g. the 4x SAE of the small CLIP and a 3,072-latent one).

    python benchmarks/features_browser.py --cache runs/tiny-clip/cache_train \\
        --sae runs/tiny-clip/sae --sae runs/tiny-clip/sae_3072 --model local-dir:assets/tiny-clip-tinyimagenet
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_line, quiet_progress, run_measured_child, set_threads, write_child_result  # noqa: E402

quiet_progress()


def child_pass(args) -> dict:
    import torch

    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.sae.loading import load_sae

    cache = ActivationStore.open(args.cache)
    sae = load_sae(args.sae[0])
    t0 = time.perf_counter()
    rows = sum(len(a) for a in cache.iter_shards(args.hook))
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        for acts in cache.iter_shards(args.hook):
            for x in acts.split(4096):
                sae.encode(x)
    return {"seconds": time.perf_counter() - t0, "read_seconds": read_s, "rows": rows}


def child_features(args) -> dict:
    from sae_lens_vision_steer import HookedCLIP
    from sae_lens_vision_steer.sae.loading import load_sae
    from sae_lens_vision_steer.explore import build_feature_browser

    t0 = time.perf_counter()
    sae = load_sae(args.sae[0])
    model = HookedCLIP.from_pretrained(args.model)
    out = Path(args.work_dir) / f"features_{Path(args.sae[0]).name}"
    shutil.rmtree(out, ignore_errors=True)
    fb = build_feature_browser(args.cache, sae, model, out, top_k=args.top_k, show_progress=False)
    return {"seconds": time.perf_counter() - t0, "timing": fb.timing, "d_sae": sae.cfg.d_sae,
            "alive": len(fb.stats.alive), "dead": len(fb.stats.dead), "images": fb.stats.n_images,
            "images_written": fb.n_images_written}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--sae", action="append", required=True, help="SAE folder (repeat for several)")
    p.add_argument("--model", required=True, help="the cache's model, e.g. local-dir:assets/tiny-clip-tinyimagenet")
    p.add_argument("--hook", default=None, help="default: the SAE's hook")
    p.add_argument("--top-k", type=int, default=12)
    p.add_argument("--reps", type=int, default=3, help="passes over the cache (the median is the reference)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="/work/runs/bench")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--child", choices=["pass", "features"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    set_threads(args.threads)
    if args.hook is None:
        args.hook = json.loads((Path(args.sae[0]) / "cfg.json").read_text())["metadata"]["hook_name"]
    if args.child:
        write_child_result(args.result_file, {"pass": child_pass, "features": child_features}[args.child](args))
        return

    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    print(f"# {' '.join(sys.argv)}\n# {machine_line()}")
    base = [__file__, "--cache", args.cache, "--model", args.model, "--hook", args.hook, "--threads",
            str(args.threads), "--work-dir", args.work_dir, "--top-k", str(args.top_k)]
    for sae in args.sae:
        passes = [run_measured_child(base + ["--sae", sae, "--child", "pass"]) for _ in range(args.reps)]
        pass_s = statistics.median(r["seconds"] for r in passes)
        pass_rss = max(r["self_peak_mib"] for r in passes)
        print(f"one pass over the cache (read + SAE encode, {sae}): {pass_s:.2f} s median of {args.reps} "
              f"({min(r['seconds'] for r in passes):.2f}-{max(r['seconds'] for r in passes):.2f}; bare read "
              f"{statistics.median(r['read_seconds'] for r in passes):.3f} s), {passes[0]['rows']} rows, "
              f"peak RSS {pass_rss:.0f} MiB")
        r = run_measured_child(base + ["--sae", sae, "--child", "features"])
        t = r["timing"]
        line = (f"features d_sae={r['d_sae']} ({r['alive']} alive, {r['dead']} dead) over {r['images']} images: "
                f"{r['seconds']:.1f} s wall = {r['seconds'] / pass_s:.1f}x one pass; statistics pass "
                f"{t['stats_pass_s']:.2f} s = {t['stats_pass_s'] / pass_s:.2f}x; images+heatmaps "
                f"{t['images_heatmaps_s']:.1f} s ({r['images_written']} images), pages {t['pages_s']:.1f} s, "
                f"classes {t['classes_s']:.1f} s; peak RSS {r['self_peak_mib']:.0f} MiB "
                f"(pass {pass_rss:.0f} MiB)")
        print(line)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps({"figure": "features", "sae": sae, "pass_s": pass_s, "pass_rss_mib": pass_rss,
                                    **r}) + "\n")


if __name__ == "__main__":
    main()
