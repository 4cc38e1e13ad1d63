"""TPT, C-TPT and ZERO cost (issues 14 and 20): their cost per image / zero-shot's, side by side in one run.

Up to four variants on the same real Tiny-ImageNet val images, interleaved round by round (`--variants`):

  A  zero-shot: the images through the image tower once (`ZeroShotClassifier.evaluate`: decode,
     preprocess, encode, classify; the class text weights are built once, before timing);
  B  TPT (`steering.tta.run_tpt`): per image the original + 63 random-resized-crop views through the
     image tower, two text-tower passes over the C class prompts (one with a backward), one AdamW step;
  C  C-TPT: B plus the ATFD term (lambda 50);
  D  ZERO (`baselines.zero.run_zero`): per image the original + 63 crop-and-flip views through the image
     tower in one batch, the 10% most confident vote at zero temperature; no text pass, no backward.

Everything runs in this process (`--num-workers 0` by default), so the process CPU time is the whole
cost and is reported next to the wall time. Model: the small CLIP trained here
(`assets/tiny-clip-tinyimagenet`, 32 px, 4 blocks of width 128; 200 classes) loaded with `local-dir:`.

`--accuracy-images N` also scores zeroshot_single, prompt_ensemble, TPT and C-TPT on N evenly spaced
val images through the evaluation runner (`vision-steer eval --methods ...`) and prints its table.

    python benchmarks/tpt_cost.py --threads 1 --images 16 --reps 3 --accuracy-images 400
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import TINY_IMAGENET_DIR, Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()

from _setup import add_common_args  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=f"local-dir:{REPO / 'assets' / 'tiny-clip-tinyimagenet'}")
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    p.add_argument("--images", type=int, default=16, help="val images per timed round (evenly spaced)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader workers (0: all cost in this process)")
    p.add_argument("--accuracy-images", type=int, default=0, help="also score the baselines on this many images")
    p.add_argument("--variants", default="tpt,ctpt,zero", help="which of tpt, ctpt, zero to time against zero-shot")
    add_common_args(p, reps=3, warmup=1)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer import HookedCLIP, ZeroShotClassifier
    from sae_lens_vision_steer.data.base import TinyImageNetFolder
    from sae_lens_vision_steer.baselines.tta import CTPT_LAMBDA, TPTConfig, run_tpt
    from sae_lens_vision_steer.baselines.zero import ZeroConfig, run_zero

    set_threads(args.threads)
    print_header("tpt_cost", args)
    model = HookedCLIP.from_pretrained(args.model, pretrained=None).eval().requires_grad_(False)
    data = TinyImageNetFolder(args.data_dir, "val", transform=model.preprocess).subset(args.images)
    n = len(data)
    with torch.inference_mode():
        clf = ZeroShotClassifier(model, data.classnames, "imagenet", show_progress=False)
        single = ZeroShotClassifier(model, data.classnames, "single", show_progress=False)  # ZERO's prompt
    runs: dict[str, list] = {"tpt": [], "ctpt": [], "zero": []}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]

    def zeroshot():
        clf.evaluate(model, data, batch_size=256, num_workers=args.num_workers, show_progress=False)

    def tpt(lam: float, key: str):
        def go():
            runs[key].append(run_tpt(model, data, data.classnames, TPTConfig(lam=lam), num_workers=args.num_workers,
                                     show_progress=False))
        return go

    def zero():
        runs["zero"].append(run_zero(model, data, single, ZeroConfig(), num_workers=args.num_workers,
                                     show_progress=False))

    fns = {"tpt": tpt(0.0, "tpt"), "ctpt": tpt(CTPT_LAMBDA, "ctpt"), "zero": zero}
    t = interleave({"zeroshot": zeroshot, **{v: fns[v] for v in variants}}, args.reps, args.warmup)
    per_image = ", ".join(f"{v} {summarize(t.wall[v]).median / n * 1e3:.1f} ms" for v in variants)
    note = (f"({n} Tiny-ImageNet val images per round, {len(data.classnames)} classes, crop views, 64 image forwards "
            f"per image (TPT / C-TPT also 2 text passes of {len(data.classnames)} prompts, one with a backward; ZERO "
            f"none); per image: zero-shot {summarize(t.wall['zeroshot']).median / n * 1e3:.2f} ms, {per_image})")
    if "zero" in variants and "tpt" in variants:
        report(Figure("ZERO cost per image / TPT's, wall", summarize(t.wall["tpt"]), summarize(t.wall["zero"]),
                      a_label="TPT", b_label="ZERO", note="(the same images and views count)"), args.json_out)
    for key, label in (("tpt", "TPT"), ("ctpt", "C-TPT"), ("zero", "ZERO")):
        if key not in variants:
            continue
        report(Figure(f"{label} cost per image / zero-shot, wall", summarize(t.wall["zeroshot"]), summarize(t.wall[key]),
                      a_label="zero-shot (1 forward per image)", b_label=f"{label} (64 views)", note=note),
               args.json_out)
        report(Figure(f"{label} cost per image / zero-shot, process CPU", summarize(t.cpu["zeroshot"]),
                      summarize(t.cpu[key]), a_label="zero-shot", b_label=label, note="(process CPU time)"),
               args.json_out)
    if "tpt" in variants:
        parts = runs["tpt"][-1].cost
        print(f"TPT split (last round): image forwards {parts['image_s']:.2f} s, text passes + step "
              f"{parts['text_s']:.2f} s, total {parts['total_s']:.2f} s (the rest: decoding and {parts['augment']} "
              "augmentation)")

    if args.accuracy_images:
        from sae_lens_vision_steer.evaluation import evaluate

        acc_data = TinyImageNetFolder(args.data_dir, "val", transform=model.preprocess).subset(args.accuracy_images)
        res = evaluate(model, acc_data, None, methods=["zeroshot_single", "prompt_ensemble", "tpt", "ctpt", "zero"],
                       num_workers=args.num_workers, show_progress=True)
        print(f"accuracy on {len(acc_data)} Tiny-ImageNet val images (evenly spaced), {args.model}:")
        print(res.table("markdown"))
        for key in ("tpt", "ctpt"):
            c = res.methods[key].info["cost"]
            print(f"{key}: {c['seconds_per_image']:.3f} s per image, mean ATFD at the initial prompt "
                  f"{c['mean_atfd_before']:.4f}")
        print("timing:", {k: v for k, v in res.timing.items() if k != "methods_s"}, res.timing["methods_s"])


if __name__ == "__main__":
    main()
