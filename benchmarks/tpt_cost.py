"""TPT and C-TPT cost (issue 14, item 4): their cost per image / zero-shot's, side by side in one run.

Three variants on the same real Tiny-ImageNet val images, interleaved round by round:

  A  zero-shot: the images through the image tower once (`ZeroShotClassifier.evaluate`: decode,
     preprocess, encode, classify; the class text weights are built once, before timing);
  B  TPT (`steering.tta.run_tpt`): per image the original + 63 random-resized-crop views through the
     image tower, two text-tower passes over the C class prompts (one with a backward), one AdamW step;
  C  C-TPT: B plus the ATFD term (lambda 50).

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
    p.add_argument("--accuracy-images", type=int, default=0, help="also score the four baselines on this many images")
    add_common_args(p, reps=3, warmup=1)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer import HookedCLIP, ZeroShotClassifier
    from sae_lens_vision_steer.data.base import TinyImageNetFolder
    from sae_lens_vision_steer.baselines.tta import CTPT_LAMBDA, TPTConfig, run_tpt

    set_threads(args.threads)
    print_header("tpt_cost", args)
    model = HookedCLIP.from_pretrained(args.model, pretrained=None).eval().requires_grad_(False)
    data = TinyImageNetFolder(args.data_dir, "val", transform=model.preprocess).subset(args.images)
    n = len(data)
    with torch.inference_mode():
        clf = ZeroShotClassifier(model, data.classnames, "imagenet", show_progress=False)
    runs: dict[str, list] = {"tpt": [], "ctpt": []}

    def zeroshot():
        clf.evaluate(model, data, batch_size=256, num_workers=args.num_workers, show_progress=False)

    def tpt(lam: float, key: str):
        def go():
            runs[key].append(run_tpt(model, data, data.classnames, TPTConfig(lam=lam), num_workers=args.num_workers,
                                     show_progress=False))
        return go

    t = interleave({"zeroshot": zeroshot, "tpt": tpt(0.0, "tpt"), "ctpt": tpt(CTPT_LAMBDA, "ctpt")},
                   args.reps, args.warmup)
    cost = runs["tpt"][-1].cost
    note = (f"({n} Tiny-ImageNet val images per round, {len(data.classnames)} classes, {cost['augment']} views, "
            f"{cost['image_forwards_per_image']} image forwards + {cost['text_passes_per_image']} text passes of "
            f"{cost['prompts_per_text_pass']} prompts per image; per image: zero-shot "
            f"{summarize(t.wall['zeroshot']).median / n * 1e3:.2f} ms, TPT {summarize(t.wall['tpt']).median / n * 1e3:.1f} ms)")
    for key, label in (("tpt", "TPT"), ("ctpt", "C-TPT")):
        report(Figure(f"{label} cost per image / zero-shot, wall", summarize(t.wall["zeroshot"]), summarize(t.wall[key]),
                      a_label="zero-shot (1 forward per image)", b_label=f"{label} (64 views, 1 step)", note=note),
               args.json_out)
        report(Figure(f"{label} cost per image / zero-shot, process CPU", summarize(t.cpu["zeroshot"]),
                      summarize(t.cpu[key]), a_label="zero-shot", b_label=label, note="(process CPU time)"),
               args.json_out)
    parts = runs["tpt"][-1].cost
    print(f"TPT split (last round): image forwards {parts['image_s']:.2f} s, text passes + step {parts['text_s']:.2f} s, "
          f"total {parts['total_s']:.2f} s (the rest: decoding and {parts['augment']} augmentation)")

    if args.accuracy_images:
        from sae_lens_vision_steer.evaluation import evaluate

        acc_data = TinyImageNetFolder(args.data_dir, "val", transform=model.preprocess).subset(args.accuracy_images)
        res = evaluate(model, acc_data, None, methods=["zeroshot_single", "prompt_ensemble", "tpt", "ctpt"],
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
