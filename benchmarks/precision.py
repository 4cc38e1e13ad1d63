"""Caching in bf16 against fp32 on the CPU, and how far bf16 moves the results (issue 21, item 3).

ViT-B-32 (random weights, `--precision` as the CLI sets it: `HookedCLIP.set_precision`), the shared
Tiny-ImageNet validation images at 224 px. Variants, interleaved:

  A  `cache_activations` of the final block's CLS, fp32
  B  the same under bf16 autocast (`set_precision("bf16")`)

Figures: images/s of B over A; and the agreement of the two: relative L2 error of the cached activations
(B vs A), and the fraction of images whose zero-shot top-1 class (the 200 Tiny-ImageNet classes, one prompt)
is the same with the bf16 tower as with the fp32 one.

    python benchmarks/precision.py                       # 512 images, 3 rounds
    python benchmarks/precision.py --n-images 32 --reps 1   # smoke
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import TINY_IMAGENET_DIR, Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()

from _setup import add_common_args, build_model, final_hook, tiny_imagenet  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    add_common_args(p, reps=3)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer.activation_cache import ActivationStore, cache_activations
    from sae_lens_vision_steer.data.base import make_loader
    from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier

    set_threads(args.threads)
    print_header("precision", args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model = build_model("vit-b-32", args.seed)
    hook = final_hook(model)
    ds = tiny_imagenet("val", args.n_images, model.preprocess, args.data_dir)
    scratch = Path(tempfile.mkdtemp(prefix="precision_", dir=args.work_dir))

    def cache(precision: str) -> None:
        model.set_precision(precision)
        out = scratch / precision
        shutil.rmtree(out, ignore_errors=True)
        cache_activations(model, ds, hook, out, batch_size=args.batch_size, num_workers=args.num_workers,
                          dtype="float32", show_progress=False)

    try:
        t = interleave({"fp32": lambda: cache("fp32"), "bf16": lambda: cache("bf16")}, reps=args.reps,
                       warmup=args.warmup)
        a32, a16 = (ActivationStore.open(scratch / p).load(hook).double() for p in ("fp32", "bf16"))
        rel = float((a16 - a32).norm() / a32.norm())
        classifier = ZeroShotClassifier(model.set_precision("fp32"), ds.classnames, "single", show_progress=False)
        preds = {}
        for precision in ("fp32", "bf16"):
            model.set_precision(precision)
            preds[precision] = torch.cat([classifier.logits(model.encode_image(b.images)).argmax(1)
                                          for b in make_loader(ds, args.batch_size, args.num_workers)])
        model.set_precision("fp32")
        agree = float((preds["fp32"] == preds["bf16"]).float().mean())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    a, b = summarize(t.wall["fp32"]), summarize(t.wall["bf16"])
    n = len(ds)
    report(Figure("precision/cache_bf16_over_fp32", a, b, "speed", "cache_activations, fp32",
                  "cache_activations, bf16 autocast", None,
                  f"ViT-B-32 final CLS, {n} images at 224 px, batch {args.batch_size}; {n / a.median:.1f} vs "
                  f"{n / b.median:.1f} images/s; agreement: activations relative L2 error {rel:.4f}, zero-shot "
                  f"top-1 the same for {agree:.4f} of the images",
                  {"images_per_s_a": n / a.median, "images_per_s_b": n / b.median, "activation_rel_error": rel,
                   "top1_agreement": agree}), args.json_out)


if __name__ == "__main__":
    main()
