"""Per-image costs for `vision-steer reproduce --dry-run --costs FILE`, measured on this machine's CPU.

Measures `HookedCLIP.encode_image` seconds per image for the small CLIP (assets/tiny-clip-tinyimagenet)
and for ViT-B-32 at full size (random weights: same architecture and FLOPs as the OpenAI weights),
counts their FLOPs (`reproduce.costs.architecture_profile`), and writes a costs file:

- `image_seconds_per_image`: ViT-B-32 as measured; ViT-B-16 and ViT-L-14 from their counted FLOPs at
  the effective FLOP rate measured on ViT-B-32 (stated in the file's label);
- `flops_per_second`: that rate (used for SAE training: 12 d_in d_sae FLOPs per sample).

It also prints the factor that turns these CPU seconds into the GPU-peak bound the dry run uses by
default: CPU effective FLOP rate / the H200's FP32 peak (resources/reproduce_facts.json, with source).

    python benchmarks/reproduce_costs.py --threads 2 --out benchmarks/results_reproduce_costs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sae_lens_vision_steer import HookedCLIP  # noqa: E402
from sae_lens_vision_steer.reproduce.costs import architecture_profile, facts, measure_image_seconds  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--images", type=int, default=16, help="images per timed round")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (best kept)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results_reproduce_costs_cpu.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    small = f"local-dir:{ROOT / 'assets' / 'tiny-clip-tinyimagenet'}"
    rows = {}
    for label, name, kwargs in (("small CLIP", small, {}), ("ViT-B-32", "ViT-B-32", {"pretrained": None})):
        torch.manual_seed(0)
        model = HookedCLIP.from_pretrained(name, device="cpu", **kwargs)
        s = measure_image_seconds(model, n_images=args.images, batch_size=min(args.images, 16), repeats=args.reps)
        prof = architecture_profile(name if label == "ViT-B-32" else small)
        rows[label] = {"seconds_per_image": s, "gflops_per_image": prof.image_flops / 1e9,
                       "effective_gflops_per_s": prof.image_flops / s / 1e9}
        print(f"{label:>10}: {s * 1e3:8.2f} ms/image, {prof.image_flops / 1e9:7.3f} GFLOP/image, "
              f"{prof.image_flops / s / 1e9:6.1f} GFLOP/s effective")
        del model
    rate = rows["ViT-B-32"]["effective_gflops_per_s"] * 1e9
    image = {"ViT-B-32": rows["ViT-B-32"]["seconds_per_image"]}
    for name in ("ViT-B-16", "ViT-L-14"):
        image[name] = architecture_profile(name).image_flops / rate
    gpu = facts()["gpu"]
    factor = rate / (gpu["fp32_tflops"] * 1e12)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    out = {"label": f"this CPU ({machine}): ViT-B-32 measured, ViT-B-16/L-14 and SAE training at ViT-B-32's "
                    f"effective rate {rate / 1e9:.1f} GFLOP/s",
           "image_seconds_per_image": image, "flops_per_second": rate, "measured": rows,
           "cpu_to_gpu_peak_factor": factor, "gpu": gpu}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"CPU -> GPU-peak factor (CPU effective FLOP/s / {gpu['name']} FP32 peak {gpu['fp32_tflops']} TFLOP/s): "
          f"{factor:.2e}  [source: {gpu['source'].split(';')[0]}]")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
