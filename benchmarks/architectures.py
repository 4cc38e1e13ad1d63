"""Every SAELens training architecture on one activation store (issue 23): training speed against top-k,
and held-out quality.

Each architecture is trained by `train_sae(..., architecture=NAME)` (SAELens' own training class from its
registry, fed by our loader) on the same store, hook, rows, batch size and number of samples; the rounds
interleave the architectures in rotating order (the machine is shared and drifts). Figures per
architecture:

- `train_samples_per_second` (samples / `SAETrainer.fit` seconds) as a ratio of medians over top-k's,
  with the per-round ratio's min-max;
- held-out FVU, held-out L0 and dead fraction (`train_sae`'s metrics, the same held-out images).

Sparsity settings are SAELens' defaults for each architecture (k for the top-k family; L1/L0
coefficients otherwise), so L0 differs between architectures: FVU is comparable only at similar L0.
With `--transcoder` a transcoder from `blocks.{i}.ln2.hook_normalized` to `blocks.{i}.hook_mlp_out` of
the last block is trained too (the store must hold both hooks).

    vision-steer cache --model local-dir:assets/tiny-clip-tinyimagenet --dataset tiny-imagenet \\
        --data-dir ../shared/datasets/tiny-imagenet-200 --split train --limit 20000 \\
        --hook blocks.3.hook_resid_post --hook blocks.3.ln2.hook_normalized --hook blocks.3.hook_mlp_out \\
        --out runs/archs/cache_train
    python benchmarks/architectures.py --cache runs/archs/cache_train --transcoder --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import DEFAULT_WORK_DIR, load_average, machine_line, quiet_progress, set_threads  # noqa: E402

quiet_progress()

ARCHS = ["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "standard", "gated"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="activation store (from `vision-steer cache`)")
    p.add_argument("--hook", default=None, help="SAE hook (default: the store's first hook)")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--transcoder", action="store_true", help="also train an ln2 -> mlp_out transcoder")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR / "archs",
                   help="the trained SAEs are kept here, one folder per architecture (for `sae-eval`)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()
    threads = set_threads(args.threads)

    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.training.trainer import train_sae

    store = ActivationStore.open(args.cache)
    hook = store.resolve_hook(args.hook)
    runs: dict[str, dict] = {a: {"hook_name": hook} for a in args.archs.split(",")}
    if args.transcoder:
        block = hook.split(".")[1]
        runs["transcoder"] = {"hook_name": f"blocks.{block}.ln2.hook_normalized",
                              "hook_name_out": f"blocks.{block}.hook_mlp_out"}
    names = list(runs)
    print(f"# architectures.py  {machine_line()}  threads={threads}")
    print(f"# store {args.cache} ({store.n_rows} rows, hook {hook}), k={args.k}, expansion {args.expansion}, "
          f"batch {args.batch_size}, {args.epochs} epochs, {args.reps} interleaved rounds")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no architecture always first
        for name in order:
            out = args.work_dir / name
            res = train_sae(store, runs[name]["hook_name"], hook_name_out=runs[name].get("hook_name_out"),
                            architecture=name, k=args.k, expansion_factor=args.expansion, batch_size=args.batch_size,
                            epochs=args.epochs, out_dir=out, overwrite=True, show_progress=False, n_checkpoints=0)
            results[name].append(res.metrics)
    load = load_average()
    ref = [m["train_samples_per_second"] for m in results["topk"]] if "topk" in results else None
    lines = []
    for name in names:
        ms = results[name]
        sps = [m["train_samples_per_second"] for m in ms]
        med = statistics.median(sps)
        row = {"architecture": name, "samples_per_second_median": med, "samples_per_second": sps,
               "heldout_fvu": ms[-1]["heldout_fvu"], "heldout_mean_l0": ms[-1]["heldout_mean_l0"],
               "dead_fraction": ms[-1]["dead_fraction"], "load_average": load}
        if ref:
            per_round = [a / b for a, b in zip(sps, ref)]
            row |= {"ratio_vs_topk": med / statistics.median(ref), "per_round_ratio": per_round}
        lines.append(row)
        ratio = (f"{row['ratio_vs_topk']:.2f}x top-k (per round {min(row['per_round_ratio']):.2f}-"
                 f"{max(row['per_round_ratio']):.2f})" if ref else "")
        print(f"{name}: {med:.0f} samples/s {ratio}; held-out FVU {row['heldout_fvu']:.4f}, "
              f"L0 {row['heldout_mean_l0']:.1f}, dead fraction {row['dead_fraction']:.4f}")
    print(f"# load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json_out:
        with args.json_out.open("a") as f:
            for row in lines:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
