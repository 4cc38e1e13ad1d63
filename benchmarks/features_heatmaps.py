"""Feature-browser heatmaps for a CLS-only SAE (issue 22): cost per image and agreement with occlusion.

Side by side in one process, per top image with `--latents` latents each (interleaved rounds):

  attention  CLS attention in the SAE's block (one forward to the block; the same map for every latent)
  gradient   gradient x input at the patch embeddings (one forward + one backward per image and latent)
  occlusion  activation drop when each patch is blanked (1 + n_patches forwards per image)

Figures: gradient / occlusion time and gradient / attention time (B/A, lower is cheaper), and the
median Pearson correlation over (image, latent) of each map with the occlusion map (gradient x input
is occlusion's first-order estimate; attention is not latent-specific). The SAE is a random top-k SAE
on the final block's CLS token (its latents are random directions, each a valid target).

    python benchmarks/features_heatmaps.py --model ViT-B-32 --images 8            # random weights
    python benchmarks/features_heatmaps.py --model local-dir:assets/tiny-clip-tinyimagenet --images 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", default=None, help="open_clip tag (default: none, random weights)")
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"
                                             / "tiny-imagenet-200"))
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--latents", type=int, default=2, help="latents per image (its most active ones)")
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    set_threads(args.threads)
    print_header("benchmarks/features_heatmaps.py", args)

    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_lens_vision_steer import HookedCLIP, load_image_dataset
    from sae_lens_vision_steer.explore import attention_maps, gradient_maps, occlusion_maps

    torch.manual_seed(0)
    model = HookedCLIP.from_pretrained(args.model, pretrained=args.pretrained)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    d = model.cfg.d_model
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=args.expansion * d, k=args.k)).requires_grad_(False)
    ds = load_image_dataset("tiny-imagenet", "val", args.data_dir, transform=model.preprocess, limit=args.images)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        _, c = model.run_with_cache(x, names_filter=[hook])
        codes = sae.encode(c[hook][:, 0])
    latents = [codes[b].topk(args.latents).indices.tolist() for b in range(len(x))]
    n_pairs = sum(len(lats) for lats in latents)
    print(f"# {len(x)} images x {args.latents} latents, {model.cfg.model_name} at {tuple(x.shape[-2:])}, "
          f"{d}-wide, hook {hook}, SAE {args.expansion * d} latents k {args.k}", flush=True)

    maps = {}

    def run(name, fn):
        def call():
            maps[name] = fn()
        return call

    t = interleave({
        "attention": run("attention", lambda: attention_maps(model, x, hook)),
        "gradient": run("gradient", lambda: gradient_maps(model, sae, x, latents, hook)),
        "occlusion": run("occlusion", lambda: occlusion_maps(model, sae, x, latents, hook, show_progress=False)),
    }, reps=args.reps)
    per_image = {k: summarize([v / len(x) for v in vals]) for k, vals in t.wall.items()}
    note = f"{n_pairs} (image, latent) pairs over {len(x)} images; seconds per image"
    report(Figure("heatmaps/gradient_vs_occlusion_time", per_image["occlusion"], per_image["gradient"],
                  a_label="occlusion per image", b_label="gradient x input per image", note=note))
    report(Figure("heatmaps/gradient_vs_attention_time", per_image["attention"], per_image["gradient"],
                  a_label="attention per image", b_label="gradient x input per image", note=note))

    def corr(a, b):
        a, b = np.asarray(a, float), np.asarray(b, float)
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")

    occ = [row for m in maps["occlusion"] for row in m]
    grad = [row for m in maps["gradient"] for row in m]
    att = [maps["attention"][b] for b, lats in enumerate(latents) for _ in lats]
    r_grad = np.nanmedian([corr(g, o) for g, o in zip(grad, occ)])
    r_att = np.nanmedian([corr(a, o) for a, o in zip(att, occ)])
    print(f"heatmaps/agreement_with_occlusion: median Pearson r over {len(occ)} (image, latent) maps: "
          f"gradient x input {r_grad:.3f}, attention {r_att:.3f}", flush=True)


if __name__ == "__main__":
    main()
