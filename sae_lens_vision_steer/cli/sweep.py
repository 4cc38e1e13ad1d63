"""`vision-steer sweep`: VS2 top-1 over a lambda x gamma grid from one backbone pass, and a heatmap."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from .common import (
    add_data_args,
    add_model_args,
    add_progress_arg,
    finite_float,
    load_data,
    load_model,
    peak_rss_mib,
    resolve_model_args,
    resolve_text_cache,
    write_json_atomic,
)
from .eval import (
    EVAL_REQUEST_KEYS,
    add_retrieval_args,
    add_steering_args,
    check_steering_values,
    default_out,
    gate_methods,
    load_sae_arg,
    print_summary,
    request_of,
    resolve_fvu_threshold,
    retrieval_backbone_options,
    retrieval_options,
    split_list,
)

HELP = "sweep VS2's lambda x gamma grid; heatmap of top-1 minus zero-shot"
DESCRIPTION = (
    "Scores VS2 on every (lambda, gamma) cell from one cached backbone pass. By default the grid is "
    "scored on the evaluation split itself, which selects hyper-parameters on test labels (a warning "
    "says so); --select-on train-holdout picks the cell on a held-out part of the training split and "
    "then reports zero-shot and VS2 at that cell on the evaluation split."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, from_sae=True)
    add_data_args(p)
    add_steering_args(p, sae_required=True)
    g = p.add_argument_group("sweep")
    g.add_argument("--lams", default="1,1.5,2,2.5,3", help="comma-separated lambda values")
    g.add_argument("--gammas", default="1.25,1.5,1.75,2,2.5", help="comma-separated gamma values")
    g.add_argument("--sweep-method", default="vs2", choices=["vs2", "vs2_ens", "vs2pp", "vs2pp_majority", "vs2pp_oracle"],
                   help="method swept over the grid (VS2++ ones need --pool-cache; the pool must not be the "
                        "selection split)")
    g.add_argument("--select-on", choices=["eval", "train-holdout"], default="eval",
                   help="where the best cell is chosen: the evaluation split (test-tuned) or a held-out part "
                        "of the training split")
    g.add_argument("--train-split", default="train", help="training split for --select-on train-holdout")
    g.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="fraction of the training split (evenly spaced, all classes) used for selection")
    add_retrieval_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/sweep_<dataset>_<split>)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different request in --out")
    add_progress_arg(p)


SWEEP_REQUEST_KEYS = tuple(k for k in EVAL_REQUEST_KEYS if k not in ("methods", "layer_saes")) + (
    "lams", "gammas", "select_on", "train_split", "holdout_fraction", "sweep_method")


def interrupted(args: argparse.Namespace) -> str:
    return "nothing was saved (results are written at the end); earlier results in --out are unchanged"


# The library arguments whose flags differ here (see common.ARGUMENT_FLAGS).
ARGUMENT_FLAGS = {"select_on": "--select-on"}


def run(args: argparse.Namespace) -> int:
    from ..core import distributed
    from ..core.outputs import prepare_output_dir
    from ..evaluation import plot_sweep_heatmap
    from ..evaluation.selection import EVAL_SELECTION_WARNING, SweepConfig, holdout_split, select_steering
    from ..evaluation.protocol import protocol_of, run_classifier

    check_steering_values(args)
    retrieval_backbone_options(args)  # --retrieval-* flags without --retrieval-backbone: refused now
    t0 = time.perf_counter()
    show = not args.no_progress
    cfg = SweepConfig(lams=tuple(split_list(args.lams, finite_float)), gammas=tuple(split_list(args.gammas, finite_float)),
                      method=args.sweep_method, select_on=args.select_on, holdout_fraction=args.holdout_fraction,
                      gate_methods=tuple(gate_methods(args)), hook_name=args.hook, batch_size=args.batch_size,
                      num_workers=args.num_workers, options=retrieval_options(args), show_progress=show)
    sae = load_sae_arg(args.sae, args.device)
    for note in resolve_model_args(args, sae, args.sae):
        print(f"using {note}")
    # torchrun: every rank names the same folder, rank 0 owns it
    folder = prepare_output_dir(default_out(args, "sweep"), "sweep", request_of(args, SWEEP_REQUEST_KEYS),
                                args.overwrite)
    out = folder.path
    model = load_model(args)
    data = load_data(args, model)
    tau, gate_cfg = resolve_fvu_threshold(args, sae, model)
    classifier = run_classifier(model, data, args.templates, show, resolve_text_cache(args))
    templates = protocol_of(classifier).record()
    select_data = None
    if args.select_on == "train-holdout":
        from ..data import load_image_dataset

        full = load_image_dataset(args.dataset, split=args.train_split, data_dir=args.data_dir,
                                  transform=model.preprocess, skip_bad_images=args.skip_bad_images)
        n_full = len(full)  # before `holdout_split`, whose `subset` narrows the data set in place
        select_data = holdout_split(full, data, args.holdout_fraction)
        print(f"selecting on {len(select_data)} held-out images of {full.dataset_id}/{args.train_split} "
              f"({args.holdout_fraction:g} of {n_full:,})")
    else:
        print(EVAL_SELECTION_WARNING.format(split=f"{data.dataset_id}/{data.split}"), file=sys.stderr)
    cfg = dataclasses.replace(cfg, fvu_threshold=tau,
                              record={"templates": templates, "sae_path": args.sae, **gate_cfg})
    res = select_steering(model, data, sae, classifier, cfg, select_data)

    sweep = res.sweep
    lam, gamma, top1 = sweep.best
    print(f"{cfg.method} sweep on {res.selection} ({sweep.n_images} images): zero-shot top-1 {sweep.zeroshot_top1:.2f}")
    print(format_grid(sweep))
    print(f"best cell: lam={lam:g}, gamma={gamma:g}: top-1 {top1:.2f} ({top1 - sweep.zeroshot_top1:+.2f} vs zero-shot)"
          + (" [selected on the evaluation split]" if args.select_on == "eval" else ""))
    if res.final is not None:
        print_summary(res.final)  # before saving
    if not distributed.is_main():
        return 0  # the other ranks helped with the backbone passes; rank 0 writes
    if res.final is not None:
        res.final.save(folder)
    summary = res.summary
    summary["timing"]["total_s"] = time.perf_counter() - t0
    summary["timing"]["peak_rss_mib"] = peak_rss_mib()
    folder.add(write_json_atomic(out / "sweep.json", summary))
    title = (f"{cfg.method} top-1 minus zero-shot ({sweep.zeroshot_top1:.2f}) on {res.selection}, {sweep.n_images} "
             "images" + (" [test-tuned]" if args.select_on == "eval" else " [held-out train]"))
    heat = folder.add(plot_sweep_heatmap(sweep, out / "sweep_heatmap.png", title=title))
    folder.finish()
    print(f"wrote {out / 'sweep.json'}, {heat}")
    return 0


def format_grid(sweep) -> str:
    """Top-1 minus zero-shot, rows gamma, columns lambda."""
    head = "gamma \\ lam " + " ".join(f"{v:>7g}" for v in sweep.lams)
    rows = [f"{g:>11g} " + " ".join(f"{d:>+7.2f}" for d in sweep.delta_GL[i]) for i, g in enumerate(sweep.gammas)]
    return "\n".join([head] + rows)
