"""`vision-steer run`: the main job in one command. Cache the training split's CLS activations, train
the top-k SAE, and evaluate zero-shot CLIP, VS2 and the reconstruction baselines on the evaluation split.

Every stage reuses or resumes its output in `--out` when the request matches (a cache or a run made
differently is refused, naming the difference; `--overwrite` starts again):

    OUT/cache_train/   activation cache of the training split (`vision-steer cache`)
    OUT/sae/           the SAELens SAE (`vision-steer train`)
    OUT/results.json   results.md, per_class_<method>.png (`vision-steer eval`)
    OUT/run.json       what ran, with each stage's time, the SAE's metrics and its FVU distribution
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
    write_json_atomic,
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


RUN_REQUEST_KEYS = ("model", "pretrained", "random_weights", "model_kwargs", "seed", "dataset", "data_dir",
                    "train_split", "eval_split", "train_limit", "eval_limit", "skip_bad_images", "k", "expansion",
                    "epochs", "lr", "train_batch_size", "sae_holdout_fraction", "cache_dtype", "hook", "lam",
                    "gamma", "fvu_threshold", "fvu_quantile", "gate_methods", "gate_datasets", "templates", "methods",
                    "n_neighbours",
                    "retrieval_backbone", "retrieval_pretrained", "retrieval_random_weights", "retrieval_model_kwargs",
                    "retrieval_cache")


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
    import torch

    from ..activation_cache import cache_activations
    from ..core import distributed
    from ..core.outputs import prepare_output_dir
    from ..data import load_image_dataset
    from ..evaluation import evaluate
    from ..training.gate import fvu_threshold_from_reference
    from ..training.trainer import (
        check_training_args,
        fvu_distribution,
        sae_size,
        train_sae,
    )

    if args.reference_cache:
        raise ValueError("run uses its own training cache as the FVU reference; --reference-cache is for eval")
    check_steering_values(args)
    retrieval_backbone_options(args)  # --retrieval-* flags without --retrieval-backbone: refused now
    gated = gate_methods(args)
    methods = split_list(args.methods)
    if not methods:
        raise ValueError("--methods is empty")
    resolve_model_args(args)
    k, expansion, source = sae_size(args.model, args.k, args.expansion)
    check_training_args(k=k, expansion_factor=expansion, lr=args.lr, batch_size=args.train_batch_size,
                        epochs=args.epochs, total_training_samples=None, lr_warm_up_steps=None, lr_decay_steps=None,
                        holdout_fraction=args.sae_holdout_fraction, n_checkpoints=10)
    folder = distributed.on_main(lambda: prepare_output_dir(args.out, "run", request_of(args, RUN_REQUEST_KEYS),
                                                            args.overwrite))  # torchrun: rank 0 owns it
    out = folder.path
    show = not args.no_progress
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    model = load_model(args)
    hook = args.hook or model.steer_hook  # the paper: final block, CLS (the pooled token without one)
    model.check_hook_name(hook)
    train_data = load_image_dataset(args.dataset, args.train_split, args.data_dir, model.preprocess,
                                    args.train_limit, args.skip_bad_images)
    eval_data = load_image_dataset(args.dataset, args.eval_split, args.data_dir, model.preprocess,
                                   args.eval_limit, args.skip_bad_images)
    union = getattr(eval_data, "members", None) is not None  # several data sets (union.py)
    pairs = zip(train_data.members, eval_data.members) if union else [(train_data, eval_data)]
    for tr, ev in pairs:
        if list(tr.classnames) != list(ev.classnames):
            raise ValueError(f"the training and evaluation splits of {ev.dataset_id} have different classes")
    if (train_data.dataset_id, train_data.split) == (eval_data.dataset_id, eval_data.split):
        print(f"WARNING: training and evaluating on the same images ({eval_data.dataset_id}/{eval_data.split}), "
              "as --train-split and --eval-split ask", file=sys.stderr)
    stages["setup_s"] = time.perf_counter() - t0

    # (1) cache the training split (reused when complete and matching, resumed when interrupted)
    t = time.perf_counter()
    print(f"[1/4] caching {hook} CLS for {len(train_data)} images of {train_data.dataset_id}/{train_data.split}")
    cache = cache_activations(model, train_data, hook, out / "cache_train", positions="cls", dtype=args.cache_dtype,
                              batch_size=args.batch_size, num_workers=args.num_workers, show_progress=show,
                              overwrite=args.overwrite)
    stages["cache_s"] = time.perf_counter() - t

    # (2) train the SAE (returned as is when a finished run with the same settings is there)
    t = time.perf_counter()
    print(f"[2/4] training a top-k SAE (k={k}, expansion {expansion}: {source}) on {cache.n_rows} cached rows")
    box = {}

    def train() -> str:  # under torchrun rank 0 trains; the others load the saved SAE
        box["trained"] = train_sae(cache, hook, k=k, expansion_factor=expansion, lr=args.lr,
                                   batch_size=args.train_batch_size, epochs=args.epochs, seed=args.seed,
                                   device=args.device, out_dir=out / "sae", holdout_fraction=args.sae_holdout_fraction,
                                   resume=True, overwrite=args.overwrite, show_progress=show)
        return str(box["trained"].out_dir)

    sae_dir = distributed.on_main(train)
    if "trained" not in box:
        from types import SimpleNamespace

        from ..sae.loading import load_sae

        box["trained"] = SimpleNamespace(sae=load_sae(sae_dir, args.device), out_dir=Path(sae_dir), metrics={})
    trained = box["trained"]
    sae = trained.sae
    stages["train_s"] = time.perf_counter() - t
    print(f"      SAE in {trained.out_dir}: held-out FVU {_fmt(trained.metrics.get('heldout_fvu'))}, "
          f"dead fraction {_fmt(trained.metrics.get('dead_fraction'))}")

    # (3) the FVU gate threshold over the unlabeled training activations, and the FVU distribution
    t = time.perf_counter()
    fvu_dist = fvu_distribution(sae, cache, hook)
    tau, gate_cfg = args.fvu_threshold, {}
    if args.fvu_quantile is not None and (union or args.gate_datasets):  # the training union (or some members)
        from ..training.gate import union_fvu_threshold

        tau, info = union_fvu_threshold(sae, cache, args.fvu_quantile, datasets=args.gate_datasets,
                                        hook_name=hook, model=model)
        gate_cfg = {"fvu_quantile": args.fvu_quantile, "reference_cache": str(cache.root),
                    "gate_datasets": info["datasets"], "gate_rows": info["rows_per_dataset"]}
        print(f"      FVU gate: tau = {tau:.4f} (quantile {args.fvu_quantile} over the training rows of "
              f"{', '.join(info['datasets'])})")
    elif args.fvu_quantile is not None:
        tau = fvu_threshold_from_reference(sae, cache.root, args.fvu_quantile, hook, model=model)
        gate_cfg = {"fvu_quantile": args.fvu_quantile, "reference_cache": str(cache.root)}
        print(f"      FVU gate: tau = {tau:.4f} (quantile {args.fvu_quantile} over the training cache)")
    if union:  # the FVU distribution of every member's training rows, too
        from ..activation_cache.union import member_rows

        fvu_dist["per_dataset"] = {m.dataset_id: fvu_distribution(sae, cache, hook, rows=member_rows(cache, i))
                                   for i, m in enumerate(train_data.members)}
    stages["fvu_s"] = time.perf_counter() - t

    # (4) evaluate every method on one backbone pass over the evaluation split
    t = time.perf_counter()
    print(f"[3/4] evaluating {', '.join(methods)} on {len(eval_data)} images of "
          f"{eval_data.dataset_id}/{eval_data.split}")
    with torch.no_grad():
        run_eval = evaluate
        if union:  # each data set on its own, with its own classes and templates (union_eval.py)
            from ..evaluation.union import evaluate_members

            run_eval = evaluate_members  # the same arguments, with the list of member data sets
        result = run_eval(model, eval_data.members if union else eval_data, sae, methods, lam=args.lam,
                          gamma=args.gamma, fvu_threshold=tau, templates=args.templates, hook_name=hook,
                          batch_size=args.batch_size,
                          num_workers=args.num_workers, show_progress=show, gate_methods=gated,
                          text_cache=resolve_text_cache(args),
                          options={"pool_cache": str(cache.root), "n_neighbours": args.n_neighbours,
                                   **retrieval_backbone_options(args)},
                          config={"sae_path": str(trained.out_dir), "random_weights": args.random_weights,
                                  "seed": args.seed, "train_limit": args.train_limit, "eval_limit": args.eval_limit,
                                  **gate_cfg})
    stages["eval_s"] = time.perf_counter() - t

    if not distributed.is_main():
        return 0  # the other ranks helped with caching and the backbone pass; rank 0 writes
    print("[4/4] writing results")
    for one in result.results.values() if union else [result]:
        print_summary(one)  # before saving: a failing disk cannot take the numbers with it
    if union:
        print("summary (top-1, change against zero-shot):\n" + result.table())
    written = result.save(folder)
    stages["total_s"] = time.perf_counter() - t0
    folder.add(write_json_atomic(out / "run.json", {
        "command": "run", "args": {k_: v for k_, v in vars(args).items() if not k_.startswith("_")},
        "hook_name": hook, "cache": str(cache.root), "sae": str(trained.out_dir),
        "cache_rows": cache.n_rows, "sae_metrics": trained.metrics, "fvu_distribution": fvu_dist,
        "fvu_threshold": tau, "results": str(written["summary" if union else "json"]), "stages": stages,
        "peak_rss_mib": peak_rss_mib(),
    }))
    folder.finish()
    print("stages: " + ", ".join(f"{k_[:-2]} {v:.1f} s" for k_, v in stages.items()))
    print(f"wrote {out}/: cache_train/, sae/, "
          + ("summary.json, summary.md, " + "".join(f"{f}/, " for f in result.summary()["folders"].values())
             if union else "results.json, results.md, ") + "run.json, "
          + ", ".join(p.name for key, p in written.items() if key.startswith("plot:") or key == "summary_plot"))
    return 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
