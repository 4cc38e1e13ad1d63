"""Peak memory of caching and of training at two data sizes (issue 7, figure 5).

Each measurement runs in a fresh Python process, so that its `ru_maxrss` belongs to that variant alone:

  cache  `cache_activations` of the final block's CLS over N Tiny-ImageNet training images
  train  `train_sae` (top-k 768x3072, k=64, batch 256, one epoch, held-out evaluation, save) on that cache

at N = `--sizes` (5,000 and 20,000). Figures: peak RSS at the large size over the small one, for the
main process (`ru_maxrss` of RUSAGE_SELF in the child); target < 1.10 (memory does not grow with the
data). Also printed: the same for the largest of the process and its DataLoader workers (the kernel's
`wait4` figure), and the growth above the RSS reached once the model and data set were set up.

`--tower vit-b-32` (default) caches with ViT-B-32; `--tower narrow` with a one-block 768-wide tower on
32 px images (same activation width and cache format, a forward pass that costs next to nothing), so
the full sizes can be measured on a small CPU. The model's own memory is the same at both sizes.

    python benchmarks/memory_scaling.py                               # full: 5,000 vs 20,000, ViT-B-32
    python benchmarks/memory_scaling.py --tower narrow                # full sizes, cheap forward
    python benchmarks/memory_scaling.py --tower narrow --sizes 500,2000   # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    TINY_IMAGENET_DIR, Figure, child_rss, print_header, quiet_progress, report, run_measured_child, set_threads,
    summarize, write_child_result,
)

quiet_progress()

from _setup import TOWERS, add_common_args, build_model, final_hook, tiny_imagenet  # noqa: E402


# ---------------------------------------------------------------------------------- children
def child_cache(args) -> dict:
    from sae_lens_vision_steer.activation_cache import cache_activations

    model = build_model(args.tower, args.seed)
    ds = tiny_imagenet("train", args.n_images, model.preprocess, args.data_dir)
    setup = child_rss()
    t0 = time.perf_counter()
    cache = cache_activations(model, ds, final_hook(model), args.cache_dir, batch_size=args.batch_size,
                              num_workers=args.num_workers, show_progress=False, overwrite=True)
    return {"n_rows": cache.n_rows, "n_shards": cache.n_shards, "seconds": time.perf_counter() - t0,
            "setup_peak_mib": setup["self_peak_mib"]}


def child_train(args) -> dict:
    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.training.trainer import train_sae

    cache = ActivationStore.open(args.cache_dir)
    setup = child_rss()
    out = Path(str(args.cache_dir) + "_sae")
    t0 = time.perf_counter()
    res = train_sae(cache, k=64, expansion_factor=4, batch_size=256, epochs=1, out_dir=out, n_checkpoints=0,
                    overwrite=True, show_progress=False)
    shutil.rmtree(out, ignore_errors=True)
    return {"n_rows": cache.n_rows, "n_training_samples": res.metrics["n_training_samples"],
            "seconds": time.perf_counter() - t0, "setup_peak_mib": setup["self_peak_mib"]}


# ---------------------------------------------------------------------------------- parent
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5000,20000", help="two comma-separated image counts: small,large")
    p.add_argument("--tower", choices=sorted(TOWERS), default="vit-b-32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    p.add_argument("--skip-train", action="store_true", help="measure caching only")
    add_common_args(p, reps=1, warmup=0)
    # internal: the measured child
    p.add_argument("--child", choices=["cache", "train"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        set_threads(args.threads)
        result = {"cache": child_cache, "train": child_train}[args.child](args)
        write_child_result(args.result_file, result)
        return

    small, large = (int(v) for v in args.sizes.split(","))
    set_threads(args.threads)
    print_header("memory_scaling", args)
    root = args.work_dir / "memory_scaling"
    root.mkdir(parents=True, exist_ok=True)
    common = ["--tower", args.tower, "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
              "--data-dir", str(args.data_dir), "--seed", str(args.seed)]
    if args.threads is not None:
        common += ["--threads", str(args.threads)]
    results: dict[str, dict[int, list[dict]]] = {"cache": {small: [], large: []}, "train": {small: [], large: []}}
    for r in range(args.reps):  # interleaved: small, large, then large, small, ...
        for n in ((small, large) if r % 2 == 0 else (large, small)):
            cache_dir = root / f"cache_{args.tower}_{n}"
            kinds = ("cache",) if args.skip_train else ("cache", "train")
            for kind in kinds:
                argv_child = [__file__, "--child", kind, "--cache-dir", str(cache_dir), *common]
                if kind == "cache":
                    argv_child += ["--n-images", str(n)]
                res = run_measured_child(argv_child)
                results[kind][n].append(res)
                print(f"#   {kind} n={n}: " + json.dumps({k: round(v, 1) if isinstance(v, float) else v
                                                          for k, v in res.items()}), flush=True)
    for kind in ("cache",) if args.skip_train else ("cache", "train"):
        what = {"cache": f"cache_activations ({args.tower}, final block CLS)",
                "train": "train_sae (1 epoch, top-k 768x3072 k=64, batch 256)"}[kind]
        for key, label in (("self_peak_mib", "main process"), ("wait4_peak_mib", "max incl. DataLoader workers")):
            a = summarize([r[key] for r in results[kind][small]])
            b = summarize([r[key] for r in results[kind][large]])
            grow_a = summarize([r["self_peak_mib"] - r["setup_peak_mib"] for r in results[kind][small]]).median
            grow_b = summarize([r["self_peak_mib"] - r["setup_peak_mib"] for r in results[kind][large]]).median
            note = f"{what}; peak RSS, {label}"
            if key == "self_peak_mib":
                note += f"; growth above set-up: {grow_a:.0f} MiB at {small}, {grow_b:.0f} MiB at {large}"
            report(Figure(f"memory_scaling/{kind}_peak_rss" + ("" if key == "self_peak_mib" else "_with_workers"),
                          a, b, "time", f"{small} images", f"{large} images", "< 1.1", note, unit="MiB"),
                   args.json_out)


if __name__ == "__main__":
    main()
