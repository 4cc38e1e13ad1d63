"""Overhead of the VS2 hook on `encode_image` (ViT-B-32, random weights, batch 64, CPU by default).

Interleaves plain and steered passes and reports medians of wall time and of process CPU time, plus
the hook's own time measured directly on a `[B, T, D]` activation (less noisy on a shared machine).

    python scripts/bench_vs2_overhead.py --reps 7 [--gate] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sae_lens import TopKSAE, TopKSAEConfig

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.steering import VS2Steering


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--gate", action="store_true", help="also evaluate the FVU gate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = HookedCLIP.from_pretrained(args.model, pretrained=None, device=args.device)
    d = model.cfg.d_model
    cfg = TopKSAEConfig(d_in=d, d_sae=args.expansion * d, k=args.k, device=args.device)
    cfg.metadata.hook_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    cfg.metadata.activation_mean = [0.0] * d
    sae = TopKSAE(cfg).requires_grad_(False)
    steer = VS2Steering(sae, fvu_threshold=10.0 if args.gate else None)
    hooks = steer.fwd_hooks(model)
    x = torch.randn(args.batch, 3, model.cfg.image_size, model.cfg.image_size, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn) -> tuple[float, float]:
        sync()
        w, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        return time.perf_counter() - w, time.process_time() - c

    def plain() -> None:
        model.encode_image(x)

    def steered() -> None:
        with model.hooks(fwd_hooks=hooks):
            model.encode_image(x)

    act = torch.randn(args.batch, model.cfg.n_tokens, d, device=args.device)
    site = steer.sites[0]

    with torch.inference_mode():
        plain(), steered()  # warm-up
        runs = {"plain": [], "steered": [], "hook": []}
        for _ in range(args.reps):
            runs["plain"].append(timed(plain))
            runs["steered"].append(timed(steered))
            runs["hook"].append(timed(lambda: [steer.apply_at_site(act, site) for _ in range(10)]))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    hook_w, hook_c = med["hook"][0] / 10, med["hook"][1] / 10
    print(f"{args.model} batch {args.batch}, SAE {d}x{args.expansion * d} k={args.k}, gate={args.gate}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}, {args.reps} reps (medians)")
    print(f"encode_image plain   : wall {med['plain'][0]:.3f} s, cpu {med['plain'][1]:.3f} s")
    print(f"encode_image + VS2   : wall {med['steered'][0]:.3f} s, cpu {med['steered'][1]:.3f} s "
          f"(wall ratio {med['steered'][0] / med['plain'][0]:.4f})")
    print(f"hook alone           : wall {hook_w * 1e3:.2f} ms, cpu {hook_c * 1e3:.2f} ms "
          f"= {100 * hook_w / med['plain'][0]:.3f}% of a plain pass (wall), {100 * hook_c / med['plain'][1]:.3f}% (cpu)")


if __name__ == "__main__":
    main()
