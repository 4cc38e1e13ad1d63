"""TransformerLens adapter overhead (issue 10): the hooked tower against open_clip, caching, and a spliced SAE.

ViT-B-32 (random weights; speed does not depend on the values), one batch of `--batch` images at
224 px, inference mode. Variants, interleaved:

  O  open_clip's own `model.clip.encode_image(x)`
  H  `HookedCLIP.encode_image(x)`, no hooks attached (fused LayerNorm and attention paths)
  C  `run_with_cache(x)` of every hook, LN scales and attention patterns included
  S  `encode_image(x)` with a CLS TopK SAE (768x3072, k=64) spliced at the final block, `use_error_term=True`

Figures: H/O (target <= 1.03), C/H (target <= 1.6), S/H (target <= 1.02); wall and process-CPU time.

    python benchmarks/tl_overhead.py                      # full: batch 64, 7 rounds
    python benchmarks/tl_overhead.py --batch 8 --reps 3   # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Figure, interleave, print_header, quiet_progress, report, set_threads, summarize  # noqa: E402

quiet_progress()

from _setup import add_common_args, build_model, build_topk_sae, final_hook  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cpu")
    add_common_args(p, reps=7)
    args = p.parse_args(argv)

    import torch

    set_threads(args.threads)
    print_header("tl_overhead", args)
    model = build_model("vit-b-32", args.seed, device=args.device)
    sae = build_topk_sae(model.cfg.d_model, 3072, 64, final_hook(model), args.seed, device=args.device)
    sae.cfg.metadata.positions = "cls"
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, model.cfg.image_size, model.cfg.image_size, generator=g).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def run(fn):
        def timed():
            fn()
            sync()
        return timed

    with torch.inference_mode():
        ref = model.clip.encode_image(x[:4])
        if (model.encode_image(x[:4]) - ref).abs().max() > 1e-4:
            raise RuntimeError("the hooked tower does not match open_clip: nothing comparable is measured")
        _, cache = model.run_with_cache(x[:2])
        n_hooks = len(cache)
        if "blocks.0.attn.hook_pattern" not in cache.keys():
            raise RuntimeError("run_with_cache did not record attention patterns")
        del cache
        model.add_sae(sae, use_error_term=True)
        spliced = model.encode_image(x[:4])
        model.reset_saes()
        if (spliced - ref).abs().max() > 1e-4:
            raise RuntimeError("the spliced SAE with the error term changed the output")

        def with_sae() -> float:  # attaching and detaching are not part of the forward: timed apart
            model.add_sae(sae, use_error_term=True)
            try:
                t0 = time.perf_counter()
                model.encode_image(x)
                sync()
                return time.perf_counter() - t0
            finally:
                model.reset_saes()

        t = interleave({"open_clip": run(lambda: model.clip.encode_image(x)),
                        "hooked": run(lambda: model.encode_image(x)),
                        "cache_all": run(lambda: model.run_with_cache(x)),
                        "sae_spliced": with_sae}, reps=args.reps, warmup=args.warmup)

    desc = f"ViT-B-32 batch {args.batch} on {args.device}"
    for clock, times in (("", t.wall), ("_cpu", t.cpu)):
        note = desc + ("; process CPU time, not wall" if clock else "")
        hooked = summarize(times["hooked"])
        report(Figure(f"tl_overhead/hooked_vs_open_clip{clock}", summarize(times["open_clip"]), hooked, "time",
                      "open_clip encode_image", "HookedCLIP encode_image, no hooks", "<= 1.03", note), args.json_out)
        report(Figure(f"tl_overhead/cache_all{clock}", hooked, summarize(times["cache_all"]), "time",
                      "HookedCLIP encode_image", f"run_with_cache of all {n_hooks} hooks (patterns included)",
                      "<= 1.6", note), args.json_out)
        report(Figure(f"tl_overhead/sae_spliced{clock}", hooked, summarize(times["sae_spliced"]), "time",
                      "HookedCLIP encode_image", "encode_image with a CLS TopK SAE spliced (use_error_term=True)",
                      "<= 1.02", note), args.json_out)


if __name__ == "__main__":
    main()
