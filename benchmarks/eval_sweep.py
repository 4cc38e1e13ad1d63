"""Cost of a full VS2 evaluation and sweep next to one plain zero-shot pass (issue 7, figure 4).

ViT-B-32 (random weights), a random SAELens `TopKSAE` (768x3072, k=64) on the final block, the shared
Tiny-ImageNet validation images (10,000 by default). Variants, interleaved:

  A  one plain zero-shot pass: `ZeroShotClassifier.evaluate(model, loader)`
  B  what `vision-steer sweep` + `vision-steer eval` run: `Evaluator` (one backbone pass, CLS tokens kept),
     a 5x5 lambda x gamma VS2 sweep (`sweep_vs2`), then the baselines (`zeroshot`, `vs2` at the paper's
     setting, `rec_final`, `rec_final_gamma`) scored on the same cached tokens

Figure: B/A wall time, target <= 1.2. The class weights (text tower) are built once, outside both.
With `--fvu-threshold` the sweep and VS2 rows also run the FVU gate.

    python benchmarks/eval_sweep.py                          # full: 10,000 images, 3 rounds
    python benchmarks/eval_sweep.py --n-images 64 --reps 1 --batch-size 32   # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    TINY_IMAGENET_DIR, Figure, interleave, print_header, quiet_progress, report, set_threads, summarize,
)

quiet_progress()

from _setup import add_common_args, build_model, build_topk_sae, final_hook, tiny_imagenet  # noqa: E402

LAMS = (1.0, 1.5, 2.0, 2.5, 3.0)  # the CLI's default grid (vision-steer sweep)
GAMMAS = (1.25, 1.5, 1.75, 2.0, 2.5)
BASELINES = ("zeroshot", "vs2", "rec_final", "rec_final_gamma")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=10000, help="validation images (evenly spaced over the classes)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--templates", default="single", help="prompt templates for the class weights (built once, untimed)")
    p.add_argument("--fvu-threshold", type=float, default=None, help="turn the FVU gate on in B")
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    add_common_args(p, reps=3, warmup=0)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer import ZeroShotClassifier, make_loader
    from sae_lens_vision_steer.evaluation import Evaluator, MethodSpec, sweep_vs2

    set_threads(args.threads)
    print_header("eval_sweep", args)
    torch.set_grad_enabled(False)
    model = build_model("vit-b-32", args.seed)
    hook = final_hook(model)
    sae = build_topk_sae(model.cfg.d_model, 4 * model.cfg.d_model, 64, hook, args.seed)
    ds = tiny_imagenet("val", args.n_images, model.preprocess, args.data_dir)
    classifier = ZeroShotClassifier(model, ds.classnames, args.templates, show_progress=False)
    results = {}

    def plain_zeroshot() -> None:
        loader = make_loader(ds, args.batch_size, args.num_workers)
        results["plain_top1"] = classifier.evaluate(model, loader, show_progress=False).top1

    def evaluate_and_sweep() -> None:
        ev = Evaluator(model, ds, sae, classifier, hook, args.batch_size, args.num_workers, show_progress=False,
                       fvu_threshold=args.fvu_threshold)
        sweep = sweep_vs2(ev, LAMS, GAMMAS, fvu_threshold=args.fvu_threshold, show_progress=False)
        rows = {m: ev.score(MethodSpec(m, m)) for m in BASELINES}
        results["sweep_s"], results["backbone_s"] = sweep.seconds, ev.cached.seconds
        results["rows_s"] = sum(r.seconds for r in rows.values())
        results["eval_zeroshot_top1"] = rows["zeroshot"].top1
        results["n_backbone_passes"] = ev.n_backbone_passes

    t = interleave({"plain": plain_zeroshot, "sweep": evaluate_and_sweep}, reps=args.reps, warmup=args.warmup)
    # The runner's zero-shot row must agree with the plain pass: both classify the same images.
    if abs(results["plain_top1"] - results["eval_zeroshot_top1"]) > 1e-6:
        raise RuntimeError(f"zero-shot top-1 differs: plain {results['plain_top1']} vs runner "
                           f"{results['eval_zeroshot_top1']}")
    if results["n_backbone_passes"] != 1:  # the point of the runner: every token method shares one pass
        raise RuntimeError(f"the runner made {results['n_backbone_passes']} backbone passes, expected 1")
    a, b = summarize(t.wall["plain"]), summarize(t.wall["sweep"])
    gate = f", FVU gate tau={args.fvu_threshold:g}" if args.fvu_threshold is not None else ""
    report(Figure("eval_sweep/sweep_5x5_plus_baselines", a, b, "time", "one plain zero-shot pass",
                  f"Evaluator + 5x5 sweep + {len(BASELINES)} baseline rows{gate}", "<= 1.2",
                  f"{len(ds)} val images, batch {args.batch_size}; last B: backbone {results['backbone_s']:.1f} s, "
                  f"sweep {results['sweep_s']:.1f} s, baseline rows {results['rows_s']:.1f} s, "
                  f"{results['n_backbone_passes']} backbone pass(es)", dict(results)), args.json_out)


if __name__ == "__main__":
    main()
