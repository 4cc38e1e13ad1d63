"""SAE training throughput from the on-disk cache (issue 7, figure 3; issue 21, item 2: no wrapper tax).

The same top-k SAE (SAELens `TopKTrainingSAE` configured as `train_sae` configures it) and the same
`SAETrainer` settings, batch size and number of samples, fed three ways:

  A  plain SAELens: `SAETrainer` fed from one in-memory tensor (the training rows loaded up front, a fresh
     random permutation per epoch): the reference, no I/O at all
  B  `SAETrainer` fed by our data provider `training.activation_batches` (memory-mapped shards, block shuffle)
  T  `train_sae` on the cache (`n_checkpoints=0`, as A and B); its own `fit_seconds` (the `SAETrainer.fit`
     call inside it), and its wall time

Figures: samples/s of B over A and of T's fit over A (target >= 0.95); T's wall time / its fit time (the
one-time shard checks, training-row mean, the closing evaluation on at most 50,000 + 50,000 rows, saving;
target <= 1.15 for a default-length run: `--epochs 10`).

The cache: `--cache-dir` if given, else one built (once, reused) with `cache_activations` from the
shared Tiny-ImageNet training images: `--tower narrow` (a 768-wide, one-block CLIP tower: 20,000 rows x 768,
the real format; the values do not affect speed; SAE 768 -> 3,072, k 64) or `--tower small-clip` (the
small CLIP in assets/, its final block's CLS: 20,000 rows x 128; SAE 128 -> 512, k 16, as the issue's
quality comparison).

    python benchmarks/training_throughput.py                        # full: 20,000-row cache, 768 wide
    python benchmarks/training_throughput.py --tower small-clip --k 16 --epochs 10   # the small CLIP's store
    python benchmarks/training_throughput.py --n-images 2048 --n-samples 2048 --reps 2   # smoke
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import (  # noqa: E402
    TINY_IMAGENET_DIR, Figure, interleave, print_header, quiet_progress, report, set_threads, summarize,
)

quiet_progress()

from _setup import add_common_args, build_model, ensure_cache, final_hook, tiny_imagenet  # noqa: E402


SMALL_CLIP = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip-tinyimagenet"


def training_cache(args) -> Path:
    if args.cache_dir is not None:
        return args.cache_dir
    out = args.work_dir / f"cache_{args.tower}_train_{args.n_images}"
    if args.tower == "small-clip":
        from sae_lens_vision_steer import HookedCLIP

        model = HookedCLIP.from_pretrained(f"local-dir:{SMALL_CLIP}").eval().requires_grad_(False)
    else:
        model = build_model("narrow", args.seed)
    ds = tiny_imagenet("train", args.n_images, model.preprocess, args.data_dir)
    t0 = time.perf_counter()
    ensure_cache(model, ds, final_hook(model), out, batch_size=256, num_workers=args.num_workers)
    print(f"# cache {out} ready ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def in_memory_batches(x_ND, batch_size: int, seed: int) -> Iterator:
    """Random full batches from one in-memory tensor, a new permutation every epoch."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x_ND), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield x_ND[perm[i:i + batch_size]]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=None, help="an existing activation cache to train from")
    p.add_argument("--n-images", type=int, default=20000, help="images in the cache built when --cache-dir is not given")
    p.add_argument("--tower", choices=["narrow", "small-clip"], default="narrow", help="the cache built without --cache-dir")
    p.add_argument("--n-samples", type=int, default=20480, help="training samples per run (rounded down to batches)")
    p.add_argument("--epochs", type=float, default=None, help="instead of --n-samples: epochs of the training rows")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--expansion-factor", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers when building the cache")
    p.add_argument("--data-dir", type=Path, default=TINY_IMAGENET_DIR)
    add_common_args(p, reps=3)
    args = p.parse_args(argv)

    import torch
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.registry import get_sae_training_class

    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.training.trainer import activation_batches, holdout_split, train_sae

    set_threads(args.threads)
    print_header("training_throughput", args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cache = ActivationStore.open(training_cache(args))
    hook = cache.hook_names[0]
    d_in = cache.d_in(hook)
    train_rows, _ = holdout_split(cache, 0.1, 0)  # train_sae's default hold-out
    if args.epochs is not None:
        args.n_samples = int(args.epochs * len(train_rows))
    n_steps = args.n_samples // args.batch_size
    if n_steps < 1:
        raise SystemExit("--n-samples must be at least one batch")
    n_samples = n_steps * args.batch_size
    warm = max(1, n_steps // 20)
    x_ND = cache.load(hook, rows=train_rows)  # what variant A trains from, in memory

    def make_sae():
        sae_cls, cfg_cls = get_sae_training_class("topk")
        torch.manual_seed(args.seed)
        # As train_sae builds it (training._build_training_sae).
        return sae_cls(cfg_cls(d_in=d_in, d_sae=d_in * args.expansion_factor, k=args.k, dtype="float32", device="cpu",
                               apply_b_dec_to_input=True, normalize_activations="none", decoder_init_norm=1.0,
                               aux_loss_coefficient=1.0, rescale_acts_by_decoder_norm=True))

    def trainer_cfg() -> SAETrainerConfig:
        # As train_sae configures SAETrainer.
        return SAETrainerConfig(total_training_samples=n_samples, train_batch_size_samples=args.batch_size,
                                lr=args.lr, lr_end=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=warm,
                                lr_decay_steps=n_steps - warm, device="cpu", dead_feature_window=100,
                                feature_sampling_window=max(n_steps + 1, 2000), n_checkpoints=0,
                                checkpoint_path=None, save_final_checkpoint=False,
                                logger=LoggingConfig(log_to_wandb=False))

    def fit(provider) -> None:
        SAETrainer(cfg=trainer_cfg(), sae=make_sae(), data_provider=provider).fit()

    def memory() -> None:
        fit(in_memory_batches(x_ND, args.batch_size, args.seed))

    def provider() -> None:
        fit(activation_batches(cache, hook, args.batch_size, rows=train_rows, seed=args.seed))

    scratch = Path(tempfile.mkdtemp(prefix="training_throughput_", dir=args.work_dir))
    train_sae_wall: list[float] = []
    train_sae_fits: list[float] = []
    train_sae_cpu: list[float] = []
    last: dict = {}

    def train_sae_fit() -> float:
        t0 = time.perf_counter()
        res = train_sae(cache, hook, k=args.k, expansion_factor=args.expansion_factor, lr=args.lr,
                        batch_size=args.batch_size, total_training_samples=n_samples, seed=args.seed,
                        out_dir=scratch / "sae", n_checkpoints=0, overwrite=True, show_progress=False)
        train_sae_wall.append(time.perf_counter() - t0)
        train_sae_fits.append(res.metrics["fit_seconds"])
        train_sae_cpu.append(res.metrics["fit_cpu_seconds"])
        last.update(res.metrics)
        return res.metrics["fit_seconds"]

    try:
        t = interleave({"memory": memory, "provider": provider, "train_sae": train_sae_fit},
                       reps=args.reps, warmup=args.warmup)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    desc = (f"TopK {d_in}x{d_in * args.expansion_factor} k={args.k}, batch {args.batch_size}, {n_samples} samples "
            f"({n_steps} steps) from {cache.n_rows} cached rows ({cache.metadata['dtype']}, {cache.n_shards} shards)")
    e2e = summarize(train_sae_wall[args.warmup:]).median
    rows = [("provider", "SAETrainer fed by activation_batches (on-disk cache)", t.wall, ""),
            ("train_sae", "train_sae fit_seconds (on-disk cache)", t.wall,
             f"; train_sae wall incl. mean, held-out eval, save: median {e2e:.3g} s"),
            # Process CPU time (all threads; the provider runs in this process): less sensitive to other
            # jobs on a shared machine than wall time.
            ("provider_cpu", "SAETrainer fed by activation_batches, process CPU time", t.cpu, "")]
    # train_sae's own CPU time in its fit (fit_cpu_seconds), against A's process CPU time
    cpu = dict(t.cpu)
    cpu["train_sae"] = train_sae_cpu[args.warmup:]
    rows.append(("train_sae_cpu", "train_sae fit, process CPU time (fit_cpu_seconds)", cpu, ""))
    for name, label, clock, extra in rows:
        a, b = summarize(clock["memory"]), summarize(clock[name.removesuffix("_cpu")])
        report(Figure(f"training_throughput/{name}", a, b, "speed", "SAETrainer fed from one in-memory tensor",
                      label, ">= 0.95",
                      desc + f"; {n_samples / a.median:.0f} vs {n_samples / b.median:.0f} samples/s" + extra,
                      {"samples_per_s_a": n_samples / a.median, "samples_per_s_b": n_samples / b.median}),
               args.json_out)
    fits, walls = summarize(train_sae_fits[args.warmup:]), summarize(train_sae_wall[args.warmup:])
    ev = last.get("evaluation", {})
    report(Figure("training_throughput/train_sae_wall_over_fit", fits, walls, "time", "train_sae fit_seconds",
                  "train_sae wall time", "<= 1.15",
                  desc + f"; last run: open + checks {last.get('open_seconds', 0):.2f} s, closing evaluation "
                  f"{last.get('eval_seconds', 0):.2f} s on {ev.get('train_rows')} of {ev.get('train_rows_total')} "
                  f"train + {ev.get('heldout_rows')} of {ev.get('heldout_rows_total')} held-out rows"),
           args.json_out)

if __name__ == "__main__":
    main()
