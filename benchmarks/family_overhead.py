"""Hooked forward / the library's own forward, per model family at its base size (issue 12).

Random weights (speed does not depend on the values), one batch of `--batch` images, inference mode.
For each family, interleaved: the library's own image embedding (open_clip `encode_image`, transformers
`get_image_features` / `pooler_output`, timm's forward) and `HookedCLIP.encode_image` with no hooks.
Target: <= 1.03 each.

    python benchmarks/family_overhead.py                 # batch 16, 5 rounds
    python benchmarks/family_overhead.py --batch 2 --reps 2 --families hf_clip   # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()


def builders():
    import open_clip
    import timm
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel

    return {
        "open_clip_vit (ViT-B-16)": lambda: open_clip.create_model("ViT-B-16", pretrained=None),
        "open_clip_timm_vit (ViT-B-16-SigLIP)": lambda: open_clip.create_model("ViT-B-16-SigLIP", pretrained=None),
        "hf_clip (CLIP ViT-B/32 config)": lambda: CLIPModel(CLIPConfig()),
        "hf_clip (SigLIP base config)": lambda: SiglipModel(SiglipConfig()),
        "hf_dinov2 (dinov2-base config, 224 px)": lambda: Dinov2Model(Dinov2Config(image_size=224)),
        "timm_vit (vit_base_patch14_dinov2, 224 px)": lambda: timm.create_model(
            "vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=224),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", default=None, help="comma-separated substrings of the family labels to run")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from sae_lens_vision_steer import HookedCLIP

    set_threads(args.threads)
    print_header("family_overhead", args)
    for label, build in builders().items():
        if args.families and not any(f in label for f in args.families.split(",")):
            continue
        torch.manual_seed(args.seed)
        model = HookedCLIP(build().eval().requires_grad_(False))
        size = model.cfg.image_size
        x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
        with torch.inference_mode():
            diff = (model.encode_image(x[:2]) - model.library_encode_image(x[:2])).abs().max().item()
            if diff > 1e-4:
                raise RuntimeError(f"{label}: hooked and library forwards differ by {diff}: nothing comparable")
            t = interleave({"library": lambda: model.library_encode_image(x), "hooked": lambda: model.encode_image(x)},
                           reps=args.reps, warmup=args.warmup)
        note = f"batch {args.batch}, {size} px, {model.cfg.n_tokens} tokens, max |diff| {diff:.1e}"
        for clock, times in (("", t.wall), ("_cpu", t.cpu)):
            report(Figure(f"family_overhead/{label}{clock}", summarize(times["library"]), summarize(times["hooked"]),
                          "time", "library forward", "HookedCLIP encode_image, no hooks", "<= 1.03",
                          note + ("; process CPU time" if clock else "")), args.json_out)
        del model


if __name__ == "__main__":
    main()
