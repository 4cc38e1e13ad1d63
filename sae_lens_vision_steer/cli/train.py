"""`vision-steer train`: train an SAE (any SAELens training architecture) or a transcoder on an activation
cache with SAELens (resumable)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..core.errors import UsageError
from .common import (
    add_device_arg,
    add_progress_arg,
    non_negative_int,
    peak_rss_mib,
    positive_float,
    positive_int,
)

HELP = "train an SAE (top-k by default, any SAELens architecture) or a transcoder on cached activations"
DESCRIPTION = (HELP + ". Paper settings (final block hook_resid_post, CLS): ViT-B-32 expansion 4, k 64; "
               "ViT-B-16 expansion 4, k 256; ViT-L-14 expansion 10, k 128, applied from the cache's model "
               "unless --k/--expansion/--preset say otherwise (as `vision-steer run` does). "
               "With --resume an interrupted run continues from its last checkpoint (Ctrl-C saves one).")


# The library arguments whose flags differ here (see common.ARGUMENT_FLAGS).
ARGUMENT_FLAGS = {"hook_name_out": "--hook-out", "sae_cfg_kwargs": "--sae-cfg", "decoder_init_norm": None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", required=True, help="activation cache folder (from `vision-steer cache`)")
    p.add_argument("--hook", "--hook-in", dest="hook", default=None,
                   help="hook to train on, a transcoder's input hook (default: the cache's first hook)")
    p.add_argument("--hook-out", default=None,
                   help="train a transcoder from --hook-in to this hook of the same cache (e.g. --hook-in "
                        "blocks.3.ln2.hook_normalized --hook-out blocks.3.hook_mlp_out)")
    p.add_argument("--architecture", default=None,
                   help="SAELens training architecture: topk (default), batchtopk, matryoshka_batchtopk, jumprelu, "
                        "standard, gated, ... (any name in SAELens' registry); transcoder (default with --hook-out)")
    p.add_argument("--sae-cfg", action="append", default=[], metavar="FIELD=VALUE",
                   help="a field of the architecture's SAELens training config (repeatable; VALUE is JSON or "
                        "a string), e.g. --sae-cfg l1_coefficient=5 --sae-cfg matryoshka_widths=[64,256]")
    p.add_argument("--preset", default=None, choices=["ViT-B-32", "ViT-B-16", "ViT-L-14"],
                   help="the paper's k and expansion for this backbone (default: the cache's model; "
                        "explicit --k/--expansion win)")
    p.add_argument("--k", type=positive_int, default=None,
                   help="active latents per sample, at most d_sae (default: the paper's for the model, else 64)")
    p.add_argument("--expansion", type=positive_int, default=None,
                   help="d_sae / d_in (default: the paper's for the model, else 4)")
    p.add_argument("--lr", type=positive_float, default=5e-4)
    p.add_argument("--warmup-steps", type=non_negative_int, default=None, help="LR warm-up steps (default 5%% of steps)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=positive_float, default=None, help="passes over the training rows (default 10)")
    g.add_argument("--samples", type=positive_int, default=None, help="total training samples")
    # PASS (prototype-aligned SAE, pass_sae.py): the same top-k training plus w_aux * ||z - class mean code||^2.
    p.add_argument("--objective", default="topk", choices=["topk", "pass"],
                   help="topk: plain top-k SAE; pass: PASS, needs a class label for every cached image")
    p.add_argument("--w-aux", type=float, default=0.8, help="PASS: weight of the prototype term (paper: 0.8)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="fraction of images held out for evaluation")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p)
    p.add_argument("--n-checkpoints", type=non_negative_int, default=10, help="checkpoints during training (for --resume)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    p.add_argument("--out", required=True, help="SAE folder (loadable with sae_lens.SAE.load_from_disk)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (or return it if finished)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    add_progress_arg(p)


def interrupted(args: argparse.Namespace) -> str:
    from pathlib import Path

    from ..training.checkpoints import CHECKPOINT_DIR, CHECKPOINT_DONE, latest_checkpoint

    ckpt = latest_checkpoint(Path(args.out) / CHECKPOINT_DIR) if Path(args.out).is_dir() else None
    if ckpt is None:
        return f"no checkpoint was saved in {args.out}; the run starts again from the beginning"
    import json

    n = json.loads((ckpt / CHECKPOINT_DONE).read_text()).get("n_training_samples")
    return f"a checkpoint after {n} training samples is saved in {ckpt}; run again with --resume to continue"


def run(args: argparse.Namespace) -> int:
    from ..activation_cache import ActivationStore
    from ..training.trainer import sae_size, train_sae

    train = train_sae
    if args.objective == "pass":  # same arguments; labels are checked before training starts
        import functools

        from ..training.pass_sae import train_pass_sae

        train = functools.partial(train_pass_sae, w_aux=args.w_aux)

    cache = ActivationStore.open(args.cache)
    if args.objective == "pass" and cache.metadata.get("request", {}).get("members"):
        raise UsageError(f"--objective pass needs one class space, but {args.cache} is a union of data sets "
                         f"({cache.metadata['dataset']}) whose labels are per data set; train topk on the union, "
                         "or PASS on one data set's cache")
    architecture = args.architecture or ("transcoder" if args.hook_out else "topk")
    if args.objective == "pass" and args.architecture not in (None, "topk"):
        raise UsageError(f"--objective pass trains a top-k SAE; it cannot be combined with --architecture {args.architecture}")
    extra = {} if args.objective == "pass" else {"architecture": architecture}
    sae_cfg = parse_sae_cfg(args.sae_cfg)
    if sae_cfg:
        extra["sae_cfg_kwargs"] = sae_cfg
    k, expansion, source = sae_size(cache.metadata.get("model_name"), args.k, args.expansion, args.preset)
    if args.k is None or args.expansion is None:
        print(f"k={k}, expansion {expansion} ({source})")
    t0 = time.perf_counter()
    res = train(args.cache, args.hook, k=k, expansion_factor=expansion, lr=args.lr,
                lr_warm_up_steps=args.warmup_steps, batch_size=args.batch_size,
                total_training_samples=args.samples, epochs=args.epochs, seed=args.seed, device=args.device,
                log_to_wandb=args.wandb, out_dir=args.out, holdout_fraction=args.holdout_fraction,
                n_checkpoints=args.n_checkpoints, resume=args.resume, overwrite=args.overwrite,
                show_progress=not args.no_progress, hook_name_out=args.hook_out, **extra)
    m, meta = res.metrics, res.sae.cfg.metadata
    print(f"SAE {res.out_dir}: {meta.get('hook_name')}"
          + (f" -> {meta.get('hook_name_out')}" if meta.get("hook_name_out") else "")
          + f" of {meta.get('model_name')}{'/' + str(meta.get('pretrained')) if meta.get('pretrained') else ''}"
          + f", {res.sae.cfg.architecture()} (trained as {meta.get('objective')}), "
          f"d_in {res.sae.cfg.d_in}, d_sae {res.sae.cfg.d_sae}"
          + (f", k {k}" if getattr(res.sae.cfg, "k", None) is not None else "")
          + f", {m['n_training_samples']} samples"
          + (f", objective pass (w_aux {meta.get('w_aux')})" if meta.get("objective") == "pass" else ""))
    fvu = m.get("heldout_fvu")
    print(f"held-out FVU {fvu:.4f}" if fvu is not None else "held-out FVU n/a (no held-out images)",
          f" train FVU {_fmt(m.get('train_fvu'))}  mean L0 {meta.get('mean_l0'):.1f}  dead fraction {m['dead_fraction']:.4f}")
    ev = m.get("evaluation")
    if ev:  # a run from before the bounded evaluation has none
        print(f"  (on {ev['train_rows']} of {ev['train_rows_total']} training rows and {ev['heldout_rows']} of "
              f"{ev['heldout_rows_total']} held-out rows, in {m.get('eval_seconds', 0):.1f} s)")
    sps = m.get("train_samples_per_second")
    print(f"time {time.perf_counter() - t0:.1f} s (fit {m['fit_seconds']:.1f} s"
          + (f", {sps:.0f} samples/s" if sps else "") + f"), peak RSS {peak_rss_mib():.0f} MiB")
    lps = m.get("loader_samples_per_second")
    if lps:  # the data loader's own rate, and how long the trainer waited for it
        print(f"loader {lps:.0f} samples/s" + (f" ({lps / sps:.1f}x the trainer)" if sps else "")
              + f", trainer waited {m.get('loader_wait_seconds', 0):.1f} s for data")
    return 0


def parse_sae_cfg(items: list[str]) -> dict[str, Any]:
    """`["l1_coefficient=5", "matryoshka_widths=[64,256]"]` -> `{"l1_coefficient": 5, ...}` (JSON, else a string)."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--sae-cfg takes FIELD=VALUE, got {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
