"""`vision-steer train`: train a top-k SAE on an activation cache with SAELens (resumable)."""

from __future__ import annotations

import argparse
import time

from .common import peak_rss_mib, resolve_device

HELP = "train a top-k SAE on cached activations"
DESCRIPTION = (HELP + ". Paper settings (final block hook_resid_post, CLS): ViT-B-32 expansion 4, k 64; "
               "ViT-B-16 expansion 4, k 256; ViT-L-14 expansion 10, k 128 (see --preset). "
               "With --resume an interrupted run continues from its last checkpoint (Ctrl-C saves one).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, help="activation cache folder (from `vision-steer cache`)")
    p.add_argument("--hook", default=None, help="hook to train on (default: the cache's first hook)")
    p.add_argument("--preset", default=None, choices=["ViT-B-32", "ViT-B-16", "ViT-L-14"],
                   help="the paper's k and expansion for this backbone (explicit --k/--expansion win)")
    p.add_argument("--k", type=int, default=None, help="active latents per sample (default 64)")
    p.add_argument("--expansion", type=int, default=None, help="d_sae / d_in (default 4)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up steps (default 5%% of steps)")
    p.add_argument("--batch-size", type=int, default=256)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, default=None, help="passes over the training rows (default 10)")
    g.add_argument("--samples", type=int, default=None, help="total training samples")
    # PASS (prototype-aligned SAE, pass_sae.py): the same top-k training plus w_aux * ||z - class mean code||^2.
    p.add_argument("--objective", default="topk", choices=["topk", "pass"],
                   help="topk: plain top-k SAE; pass: PASS, needs a class label for every cached image")
    p.add_argument("--w-aux", type=float, default=0.8, help="PASS: weight of the prototype term (paper: 0.8)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="fraction of images held out for evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=resolve_device, default="auto", help="torch device; auto = cuda when available")
    p.add_argument("--n-checkpoints", type=int, default=10, help="checkpoints during training (for --resume)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    p.add_argument("--out", required=True, help="SAE folder (loadable with sae_lens.SAE.load_from_disk)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or return it if finished)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from ..training import PAPER_PRESETS, train_sae

    train = train_sae
    if args.objective == "pass":  # same arguments; labels are checked before training starts
        import functools

        from ..pass_sae import train_pass_sae

        train = functools.partial(train_pass_sae, w_aux=args.w_aux)

    preset = PAPER_PRESETS.get(args.preset) if args.preset else None
    k = args.k or (preset.k if preset else 64)
    expansion = args.expansion or (preset.expansion_factor if preset else 4)
    t0 = time.perf_counter()
    res = train(args.cache, args.hook, k=k, expansion_factor=expansion, lr=args.lr,
                lr_warm_up_steps=args.warmup_steps, batch_size=args.batch_size,
                total_training_samples=args.samples, epochs=args.epochs, seed=args.seed, device=args.device,
                log_to_wandb=args.wandb, out_dir=args.out, holdout_fraction=args.holdout_fraction,
                n_checkpoints=args.n_checkpoints, resume=args.resume, overwrite=args.overwrite,
                show_progress=not args.no_progress)
    m, meta = res.metrics, res.sae.cfg.metadata
    print(f"SAE {res.out_dir}: {meta.get('hook_name')} of {meta.get('model_name')}/{meta.get('pretrained')}, "
          f"d_in {res.sae.cfg.d_in}, d_sae {res.sae.cfg.d_sae}, k {k}, {m['n_training_samples']} samples"
          + (f", objective pass (w_aux {meta.get('w_aux')})" if meta.get("objective") == "pass" else ""))
    fvu = m.get("heldout_fvu")
    print(f"held-out FVU {fvu:.4f}" if fvu is not None else "held-out FVU n/a (no held-out images)",
          f" train FVU {m['train_fvu']:.4f}  mean L0 {meta.get('mean_l0'):.1f}  dead fraction {m['dead_fraction']:.4f}")
    sps = m.get("train_samples_per_second")
    print(f"time {time.perf_counter() - t0:.1f} s (fit {m['fit_seconds']:.1f} s"
          + (f", {sps:.0f} samples/s" if sps else "") + f"), peak RSS {peak_rss_mib():.0f} MiB")
    return 0
