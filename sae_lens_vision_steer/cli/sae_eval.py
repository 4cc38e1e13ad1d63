"""`vision-steer sae-eval`: one yardstick for any SAE on the same images (evaluation/sae_eval.py)."""

from __future__ import annotations

import argparse

from ..core.errors import UsageError
from .common import (
    add_data_args,
    add_model_args,
    add_progress_arg,
    add_text_cache_args,
    load_data,
    load_model,
    resolve_model_args,
    resolve_text_cache,
)

HELP = "score any SAE or transcoder on images: FVU, L0, dead latents, Δ top-1, zero-shot KL recovered"
DESCRIPTION = (
    "One yardstick for any SAE (ours or imported) on the same images, per hook: mean-centred FVU and explained "
    "variance (SAELens' formula), L0, dead and alive fraction of latents over the images, the change in zero-shot "
    "top-1 when the reconstruction replaces the activation (error term off), and the fraction of the zero-shot "
    "KL divergence recovered (CLIP's scaled logits; SAELens' kl_div_score) against zero- or mean-ablation of the "
    "same positions. Writes sae_eval.json, sae_eval.md and sae_eval.png to --out and records the figures in each "
    "SAE folder's cfg.json metadata (sae_eval), which `publish` puts on the model card."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE folder(s) (SAELens format), comma-separated: one row each")
    add_model_args(p, from_sae=True)
    add_data_args(p)
    p.add_argument("--baseline", default="zero", choices=["zero", "mean"],
                   help="ablation the KL recovered is measured against: zeros, or the mean over the images")
    p.add_argument("--visaebench", default=None, metavar="NAMES",
                   help="also run these ViSAEBench metrics on each SAE's activations (comma-separated: fvu, "
                        "downstream_preservation, sparse_probing; needs `pip install visaebench`)")
    p.add_argument("--templates", default=None, help="template set (default: the data set's CLIP set)")
    add_text_cache_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/sae_eval_<dataset>_<split>)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different request in --out")
    p.add_argument("--no-record", action="store_true", help="do not write the figures into the SAE folders")
    p.add_argument("--no-plots", action="store_true", help="skip sae_eval.png")
    add_progress_arg(p)


REQUEST_KEYS = ("sae", "model", "pretrained", "random_weights", "model_kwargs", "seed", "dataset", "data_dir", "split",
                "limit", "skip_bad_images", "baseline", "templates", "visaebench")


def run(args: argparse.Namespace) -> int:
    from ..core.outputs import prepare_output_dir
    from ..evaluation.sae_eval import evaluate_saes, record_in_sae_folder
    from ..sae.loading import load_sae
    from .eval import default_out, request_of, split_list

    paths = split_list(args.sae)
    if not paths:
        raise UsageError("--sae is empty")
    saes = [load_sae(p, args.device) for p in paths]
    for note in resolve_model_args(args, saes[0]):
        print(f"using {note}")
    folder = prepare_output_dir(default_out(args, "sae_eval"), "sae-eval", request_of(args, REQUEST_KEYS),
                                args.overwrite, results_files=("sae_eval.json",))
    model = load_model(args)
    data = load_data(args, model)
    res = evaluate_saes(model, data, saes, labels=paths if len(paths) > 1 else None, baseline=args.baseline,
                        templates=args.templates, batch_size=args.batch_size, num_workers=args.num_workers,
                        show_progress=not args.no_progress, text_cache=resolve_text_cache(args),
                        visaebench=split_list(args.visaebench))
    c = res.config
    print(f"{c['dataset']}/{c['split']}: {c['n_images']} images, zero-shot top-1 {c['top1_clean']:.2f}%, "
          f"KL recovered against {c['baseline']}-ablation")
    print(res.table())
    for row in res.rows:
        for name, m in (row.visaebench or {}).items():
            print(f"ViSAEBench {name} ({row.label}): {m['value']:.4f} "
                  f"({'higher' if m['higher_is_better'] else 'lower'} is better)")
    written = res.save(folder.path, plot=not args.no_plots)
    for p in written.values():
        folder.add(p)
    folder.finish()
    if not args.no_record:
        for path, row in zip(paths, res.rows):
            record_in_sae_folder(path, row, c)
    print(f"wrote {', '.join(str(p) for p in written.values())}"
          + ("" if args.no_record else f"; recorded in {len(paths)} SAE folder(s)"))
    return 0
