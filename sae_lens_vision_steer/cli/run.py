"""`vision-steer run`: the main job in one command (`pipeline.run_pipeline`). Cache the training split's CLS
activations, train the top-k SAE, and evaluate zero-shot CLIP, VS2 and the reconstruction baselines on the
evaluation split; every stage reuses or resumes its output in `--out` (see `pipeline`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UsageError
from .common import (
    add_model_args,
    add_progress_arg,
    load_model,
    non_negative_int,
    peak_rss_mib,
    positive_float,
    positive_int,
    resolve_model_args,
    resolve_text_cache,
)
from .eval import (
    add_retrieval_backbone_args,
    add_steering_args,
    check_steering_values,
    gate_methods,
    print_summary,
    request_of,
    retrieval_backbone_options,
    split_list,
)

HELP = "the main job: cache the training split, train the SAE, evaluate VS2 and baselines (one folder)"
DESCRIPTION = (
    "Caches the final block's CLS activations of the training split, trains a top-k SAE on them (the paper's "
    "k and expansion for ViT-B-32/B-16/L-14), and evaluates zero-shot CLIP, VS2 and the SAE-reconstruction "
    "baselines on the evaluation split. Defaults follow the paper: ViT-B-32 openai, CIFAR-100 from the Hub. "
    "Offline example (the small CLIP trained on Tiny-ImageNet, committed in assets/): vision-steer run "
    "--model local-dir:assets/tiny-clip-tinyimagenet --dataset tiny-imagenet "
    "--data-dir ../shared/datasets/tiny-imagenet-200 --k 16 --expansion 4 --out runs/demo"
)
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar100",
                   help="cifar100, tiny-imagenet, cub200, imagefolder, or a Hub repo id; several, comma-separated, "
                        "train one SAE on the union of their training splits (the paper's generalized SAE) and "
                        "evaluate each data set on its own")
    g.add_argument("--data-dir", default=None,
                   help="local data folder; without it the data set comes from the Hub (a union: one per member, "
                        "comma-separated in member order, empty = Hub, or member=DIR pairs)")
    g.add_argument("--train-split", default="train",
                   help="split the SAE is trained on (labels unused; imagefolder: a subfolder, or 'all')")
    g.add_argument("--eval-split", default="val",
                   help="evaluation split ('val' = CIFAR-100 test, Tiny-ImageNet val; imagefolder: a subfolder)")
    g.add_argument("--train-limit", type=positive_int, default=None,
                   help="cache only this many training images (evenly spaced; a union: this many per member)")
    g.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate only this many images (evenly spaced; a union: this many per member)")
    g.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    g.add_argument("--num-workers", type=non_negative_int, default=2, help="DataLoader workers")
    g.add_argument("--skip-bad-images", action="store_true", help="skip and count unreadable images")
    g = p.add_argument_group("SAE")
    g.add_argument("--k", type=positive_int, default=None,
                   help="active latents, at most d_sae (default: the paper's for --model, else 64)")
    g.add_argument("--expansion", type=positive_int, default=None, help="d_sae / d_in (default: the paper's, else 4)")
    g.add_argument("--epochs", type=positive_float, default=10, help="passes over the cached training rows")
    g.add_argument("--lr", type=positive_float, default=5e-4)
    g.add_argument("--train-batch-size", type=positive_int, default=256, help="SAE training batch size")
    g.add_argument("--sae-holdout-fraction", type=float, default=0.1,
                   help="fraction of training images held out to measure the SAE's FVU")
    g.add_argument("--cache-dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    add_steering_args(p, with_sae=False)
    p.add_argument("--methods", default="zeroshot,vs2,rec_final,rec_final_gamma",
                   help="comma-separated methods (VS2++ ones, e.g. vs2pp, retrieve from the run's own training cache)")
    g = p.add_argument_group("retrieval (VS2++: the pool is the run's training cache)")
    g.add_argument("--n-neighbours", type=positive_int, default=50, help="neighbours retrieved per test image (paper: 50)")
    add_retrieval_backbone_args(g)
    p.add_argument("--out", required=True, help="output folder for the cache, the SAE and the results")
    p.add_argument("--overwrite", action="store_true", help="recompute the cache and the SAE even if present")
    add_progress_arg(p)


# The library arguments whose flags differ here (see common.ARGUMENT_FLAGS).
ARGUMENT_FLAGS = {"batch_size": "--train-batch-size", "holdout_fraction": "--sae-holdout-fraction"}

RUN_REQUEST_KEYS = ("model", "pretrained", "random_weights", "model_kwargs", "seed", "dataset", "data_dir",
                    "train_split", "eval_split", "train_limit", "eval_limit", "skip_bad_images", "k", "expansion",
                    "epochs", "lr", "train_batch_size", "sae_holdout_fraction", "cache_dtype", "hook", "lam",
                    "gamma", "fvu_threshold", "fvu_quantile", "gate_methods", "gate_datasets", "templates", "methods",
                    "n_neighbours",
                    "retrieval_backbone", "retrieval_pretrained", "retrieval_random_weights", "retrieval_model_kwargs",
                    "retrieval_cache")


# Settings that change only the evaluation: a finished run asked again with other values of these reuses its
# cache and SAE and evaluates again (the training split's cache and the SAE do not depend on them).
RUN_REEVALUATE_KEYS = ("eval_split", "eval_limit", "lam", "gamma", "fvu_threshold", "fvu_quantile", "gate_methods",
                       "gate_datasets", "templates", "methods", "n_neighbours", "retrieval_backbone",
                       "retrieval_pretrained", "retrieval_random_weights", "retrieval_model_kwargs", "retrieval_cache")


def interrupted(args: argparse.Namespace) -> str:
    from .cache import interrupted as cache_interrupted
    from .train import interrupted as train_interrupted

    out = Path(args.out)
    if (out / "sae" / "cfg.json").is_file():
        return f"the cache and the trained SAE are saved in {out}; run the same command again to evaluate"
    if (out / "sae").is_dir():
        ns = argparse.Namespace(out=str(out / "sae"))
        return f"the cache is complete in {out / 'cache_train'}; " + train_interrupted(ns).replace(
            "run again with --resume", "run the same command again")
    return cache_interrupted(argparse.Namespace(out=str(out / "cache_train")))


def run(args: argparse.Namespace) -> int:
    from ..evaluation.union import UnionEvaluation
    from ..pipeline import PipelineConfig, run_pipeline
    from ..training.config import TrainConfig, sae_size

    if args.reference_cache:
        raise UsageError("run uses its own training cache as the FVU reference; --reference-cache is for eval")
    check_steering_values(args)
    options = {"n_neighbours": args.n_neighbours, **retrieval_backbone_options(args)}  # flags checked now
    gated = gate_methods(args)
    methods = split_list(args.methods)
    if not methods:
        raise UsageError("--methods is empty")
    resolve_model_args(args)
    k, expansion, source = sae_size(args.model, args.k, args.expansion)
    train = TrainConfig(k=k, expansion_factor=expansion, lr=args.lr, batch_size=args.train_batch_size,
                        epochs=args.epochs, seed=args.seed, device=args.device,
                        holdout_fraction=args.sae_holdout_fraction)
    cfg = PipelineConfig(
        out=args.out, dataset=args.dataset, data_dir=args.data_dir, train_split=args.train_split,
        eval_split=args.eval_split, train_limit=args.train_limit, eval_limit=args.eval_limit,
        skip_bad_images=args.skip_bad_images, hook=args.hook, batch_size=args.batch_size,
        num_workers=args.num_workers, cache_dtype=args.cache_dtype, train=train, methods=tuple(methods),
        lam=args.lam, gamma=args.gamma, fvu_threshold=args.fvu_threshold, fvu_quantile=args.fvu_quantile,
        gate_methods=tuple(gated), gate_datasets=tuple(split_list(args.gate_datasets)) or None,
        templates=args.templates, text_cache=resolve_text_cache(args), options=options,
        record={"random_weights": args.random_weights, "seed": args.seed, "train_limit": args.train_limit,
                "eval_limit": args.eval_limit},
        request=request_of(args, RUN_REQUEST_KEYS), reevaluate_keys=RUN_REEVALUATE_KEYS, overwrite=args.overwrite,
        show_progress=not args.no_progress)
    print(f"SAE size: k={k}, expansion {expansion} ({source})")
    model = load_model(args)

    def show(result) -> None:
        union = isinstance(result, UnionEvaluation)
        for one in result.results.values() if union else [result]:
            print_summary(one)
        if union:
            print("summary (top-1, change against zero-shot):\n" + result.table())

    res = run_pipeline(cfg, model, log=lambda line: print(line, file=sys.stderr if line.startswith("WARNING")
                                                              else sys.stdout), on_result=show)
    if not res.written:
        return 0  # a rank other than 0 under torchrun
    if res.reused:
        why = "only evaluation settings changed" if res.changed else "same request"
        print(f"reused from {res.out}: " + ", ".join(res.reused) + f" ({why}; --overwrite recomputes)")
    print("stages: " + ", ".join(f"{k_[:-2]} {v:.1f} s" for k_, v in res.stages.items())
          + f"; peak RSS {peak_rss_mib():.0f} MiB")
    union = "summary" in res.written
    print(f"wrote {res.out}/: cache_train/, sae/, "
          + ("summary.json, summary.md, " + "".join(f"{f}/, " for f in res.result.summary()["folders"].values())
             if union else "results.json, results.md, ") + "run.json, "
          + ", ".join(p.name for key, p in res.written.items() if key.startswith("plot:") or key == "summary_plot"))
    return 0
