"""Cached text embeddings (issue 14, item 5): a second run's text set-up / the first run's.

The zero-shot head of a Tiny-ImageNet evaluation is 200 classes x CLIP's 80 ImageNet templates =
16,000 prompts through the text tower. Two variants, interleaved round by round:

  A  first run: `ZeroShotClassifier(..., text_cache=<empty folder>)`: weight fingerprints, every
     prompt through the text tower, the matrix written to the cache (atomic write);
  B  second run: `ZeroShotClassifier(..., text_cache=<the folder A just filled>)`: weight
     fingerprints (image tower and text tower, as a new process pays them), the file read and its
     sha256 and key checked. No prompt is encoded.

ViT-B-32 with random weights (the cost depends on the shape only). Figure: B / A (target <= 0.05).
Each A round writes into a fresh folder; B reads the folder of the latest A round (so B's first
round runs after A's, and no extra untimed encoding is needed).

    python benchmarks/text_cache.py --threads 1                  # full size: 200 classes x 80 templates
    python benchmarks/text_cache.py --classes 20 --reps 2        # smoke
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()

from _setup import add_common_args  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--classes", type=int, default=200, help="Tiny-ImageNet class names used (all 200 by default)")
    p.add_argument("--templates", default="imagenet", help="template set (imagenet: 80)")
    p.add_argument("--batch-size", type=int, default=256, help="prompts per text-tower batch")
    add_common_args(p, reps=3, warmup=0)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer import HookedCLIP, ZeroShotClassifier
    from sae_lens_vision_steer.data.resources import classnames_for, templates_for

    set_threads(args.threads)
    print_header("text_cache", args)
    torch.manual_seed(args.seed)
    model = HookedCLIP.from_pretrained(args.model, pretrained=None).eval()
    names = list(classnames_for("tiny-imagenet").values())[: args.classes]
    n_prompts = len(names) * len(templates_for(args.templates))
    work = args.work_dir if args.work_dir.is_dir() else None
    state: dict[str, Path] = {}
    status: dict[str, list[str]] = {"A": [], "B": []}

    def first_run():
        state["dir"] = Path(tempfile.mkdtemp(prefix="text_cache_", dir=work))
        with torch.inference_mode():
            clf = ZeroShotClassifier(model, names, args.templates, args.batch_size, False, text_cache=state["dir"])
        status["A"].append(clf.text_cache_status)

    def second_run():
        if "dir" not in state:  # only with --warmup 0 and B first: cannot happen with interleave's A B, B A order
            first_run()
        with torch.inference_mode():
            clf = ZeroShotClassifier(model, names, args.templates, args.batch_size, False, text_cache=state["dir"])
        status["B"].append(clf.text_cache_status)

    t = interleave({"first": first_run, "second": second_run}, args.reps, args.warmup)
    if set(status["A"]) != {"built"} or set(status["B"]) != {"hit"}:
        raise SystemExit(f"unexpected cache statuses: {status}")
    report(Figure("text set-up, second run / first run", summarize(t["first"]), summarize(t["second"]),
                  a_label=f"first run: encode {n_prompts} prompts + write", b_label="second run: fingerprints + read",
                  target="<= 0.05", note=f"({len(names)} classes x {n_prompts // len(names)} templates, {args.model})"),
           args.json_out)


if __name__ == "__main__":
    main()
