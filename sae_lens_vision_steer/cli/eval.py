"""`vision-steer eval`: zero-shot accuracy of VS2 and the baselines, one backbone pass for all of them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..core.errors import MissingInputError, UnknownNameError, UsageError
from .common import (
    abspath,
    add_data_args,
    add_model_args,
    add_progress_arg,
    add_text_cache_args,
    finite_float,
    json_object,
    load_data,
    load_model,
    peak_rss_mib,
    positive_int,
    resolve_model_args,
    resolve_text_cache,
)

HELP = "evaluate zero-shot CLIP, VS2 and SAE-reconstruction baselines on a data set"
DESCRIPTION = (
    "Runs the backbone once, caches the SAE hook's CLS tokens, and scores every method on them: "
    "zeroshot (plain CLIP), vs2, rec_final, rec_final_gamma (and rec_all with --layer-saes, which needs "
    "its own pass). The model defaults to the one the SAE was trained on. Writes results.json, results.md "
    "and per-class gain/loss plots to --out; a folder holding results of a different request is refused "
    "unless --overwrite."
)


def add_steering_args(p: argparse.ArgumentParser, with_sae: bool = True, sae_required: bool = False) -> None:
    """SAE, VS2 settings and the FVU gate (shared by eval, sweep and run)."""
    g = p.add_argument_group("steering")
    if with_sae:
        g.add_argument("--sae", required=sae_required, default=None,
                       help="SAELens SAE folder (cfg.json + sae_weights.safetensors), trained on the hook to steer")
    g.add_argument("--hook", default=None,
                   help="hook to steer (default: the SAE's metadata; another hook than the SAE's is refused)")
    g.add_argument("--lam", type=finite_float, default=2.1, help="VS2 lambda (paper: 2.1 for CIFAR-100, ViT-B/32)")
    g.add_argument("--gamma", type=finite_float, default=1.5,
                   help="VS2 gamma, also used by rec_final_gamma (paper: 1.5)")
    g.add_argument("--fvu-threshold", type=finite_float, default=None,
                   help="FVU gate: steer only images with per-sample FVU <= this")
    g.add_argument("--fvu-quantile", type=finite_float, default=None,
                   help="FVU gate threshold as this quantile (e.g. 0.99) of FVU over --reference-cache")
    g.add_argument("--reference-cache", default=None,
                   help="activation cache of unlabeled training images for --fvu-quantile (CLS, the SAE's hook, "
                        "the same model); comma-separated caches (or one union cache) calibrate on their union")
    g.add_argument("--gate-datasets", default=None,
                   help="calibrate the FVU gate on these members of a union reference (comma-separated; default: all; "
                        "the paper's generalized SAE: cifar100,tiny-imagenet)")
    g.add_argument("--gate-methods", default="vs2",
                   help="comma-separated methods the FVU gate applies to (the paper gates VS2 only)")
    g.add_argument("--templates", default=None,
                   help="the run's prompt templates (the zero-shot row, vs2 and the other rows without a protocol of "
                        "their own): cifar (18), imagenet (80), cub, single, or ensemble (the data set's own set, the "
                        "default); vs2_ens, prompt_ensemble always use the ensemble, zeroshot_single, tpt, ctpt and "
                        "zero the single prompt")
    add_text_cache_args(g)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, from_sae=True)
    add_data_args(p)
    add_steering_args(p)
    p.add_argument("--methods", default="zeroshot,vs2,rec_final,rec_final_gamma",
                   help="comma-separated methods: zeroshot, vs2, rec_final, rec_final_gamma, rec_all, and any "
                        "other registered method (e.g. VS2++ ones)")
    p.add_argument("--layer-saes", default=None,
                   help="for rec_all: comma-separated SAE folders, or one folder holding one SAE folder per layer "
                        "(one SAE for every block)")
    add_retrieval_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/eval_<dataset>_<split>)")
    p.add_argument("--overwrite", action="store_true", help="replace results of a different request in --out")
    p.add_argument("--no-plots", action="store_true", help="skip the per-class PNGs")
    add_progress_arg(p)


def add_retrieval_args(p: argparse.ArgumentParser) -> None:
    """VS2++ and retrieval baselines (methods vs2pp, vs2pp_majority, vs2pp_oracle, clip_steer,
    clip_steer_oracle, weighted_rag, weighted_rag_oracle; see steering/vs2pp_methods.py)."""
    g = p.add_argument_group("retrieval (VS2++ and its baselines)")
    g.add_argument("--pool-cache", default=None,
                   help="activation cache of the unlabeled training split at the SAE's hook (the retrieval pool; "
                        "not the evaluation split)")
    g.add_argument("--pool-other-dataset", action="store_true",
                   help="use a --pool-cache of another data set on purpose (its class names must still be the "
                        "evaluation's, in the same order)")
    g.add_argument("--n-neighbours", type=positive_int, default=50, help="neighbours retrieved per test image (paper: 50)")
    g.add_argument("--retrieval-backend", default="exact", choices=["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf"],
                   help="exact chunked search, or a FAISS index (pip install faiss-cpu)")
    g.add_argument("--pool-retrieval-embeds", default=None,
                   help=".npy [pool rows, dim] retrieval embedding (e.g. DINOv2) instead of CLIP; needs the next flag")
    g.add_argument("--query-retrieval-embeds", default=None, help=".npy [test images, dim], aligned with the test set")
    add_retrieval_backbone_args(g)
    g.add_argument("--rag-alpha", type=finite_float, default=0.5, help="weighted RAG: weight of the query embedding")
    g.add_argument("--vs2pp-fallback", default="vs2", choices=["vs2", "none"],
                   help="VS2++ when S+ or S- is empty: plain VS2 for that image, or no steering")


def add_retrieval_backbone_args(g: Any) -> None:
    """A second image backbone for VS2++ retrieval (eval, sweep, run)."""
    g.add_argument("--retrieval-backbone", default=None,
                   help="retrieve neighbours with this image backbone instead of CLIP (the paper: DINOv2): dinov2-small|"
                        "base|large (= hf:facebook/dinov2-*), or any --model name (hf:REPO, timm:NAME, open_clip); "
                        "pool and test images are embedded once and cached next to the pool cache")
    g.add_argument("--retrieval-pretrained", default=None,
                   help="its weights: open_clip tag or checkpoint (needed for open_clip names), hf: revision, timm: tag "
                        "or checkpoint (default for timm: timm's pretrained weights)")
    g.add_argument("--retrieval-random-weights", action="store_true",
                   help="random retrieval-backbone weights, seeded by --seed (offline smoke runs)")
    g.add_argument("--retrieval-model-kwargs", type=json_object, default=None,
                   help='JSON of extra arguments for the backbone\'s constructor, e.g. \'{"img_size": 224}\'')
    g.add_argument("--retrieval-cache", default=None,
                   help="folder for the cached retrieval embeddings (default: <pool cache>.retrieval/<backbone>/)")


RETRIEVAL_BACKBONE_KEYS = ("retrieval_backbone", "retrieval_pretrained", "retrieval_random_weights",
                           "retrieval_model_kwargs", "retrieval_cache")


def retrieval_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"pool_cache": args.pool_cache, "pool_other_dataset": getattr(args, "pool_other_dataset", False),
            "n_neighbours": args.n_neighbours,
            "retrieval_backend": args.retrieval_backend, "pool_retrieval_embeds": args.pool_retrieval_embeds,
            "query_retrieval_embeds": args.query_retrieval_embeds, "rag_alpha": args.rag_alpha,
            "vs2pp_fallback": args.vs2pp_fallback, **retrieval_backbone_options(args)}


def retrieval_backbone_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {k: getattr(args, k, None) for k in RETRIEVAL_BACKBONE_KEYS}
    if opts["retrieval_backbone"] is None:
        extra = [f"--{k.replace('_', '-')}" for k in RETRIEVAL_BACKBONE_KEYS[1:] if opts[k]]
        if extra:
            raise UsageError(f"{', '.join(extra)} only apply with --retrieval-backbone")
        return {}
    return {**opts, "seed": args.seed}


def split_list(text: str | None, cast: Any = str) -> list[Any]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError as e:
        raise UsageError(f"cannot parse {text!r} as a comma-separated list of {cast.__name__}: {e}") from None


def check_steering_values(args: argparse.Namespace) -> None:
    """lam, gamma, the gate settings and the template set, before anything is loaded."""
    from ..evaluation.protocol import check_templates_name

    try:
        check_templates_name(getattr(args, "templates", None))
    except UnknownNameError as e:
        raise UnknownNameError(f"--templates: {e}") from None
    if args.fvu_threshold is not None and args.fvu_quantile is not None:
        raise UsageError("give --fvu-threshold or --fvu-quantile, not both")
    if args.fvu_quantile is not None and not 0 <= args.fvu_quantile <= 1:
        raise UsageError(f"--fvu-quantile must be in [0, 1], got {args.fvu_quantile}")
    if args.fvu_threshold is not None and args.fvu_threshold < 0:
        raise UsageError(f"--fvu-threshold must be >= 0 (an FVU), got {args.fvu_threshold}")
    if args.reference_cache and args.fvu_quantile is None:
        raise UsageError("--reference-cache is only used with --fvu-quantile")
    if args.fvu_quantile is not None and not getattr(args, "reference_cache", None) and args.command != "run":
        raise UsageError("--fvu-quantile needs --reference-cache (unlabeled training activations)")
    for ref in split_list(args.reference_cache):  # one cache, or several (a union for the gate)
        if not Path(ref).is_dir():
            raise MissingInputError(f"--reference-cache {ref} does not exist")
    if getattr(args, "gate_datasets", None) and args.fvu_quantile is None:
        raise UsageError("--gate-datasets is only used with --fvu-quantile")
    if getattr(args, "pool_cache", None) and not Path(args.pool_cache).is_dir():
        raise MissingInputError(f"--pool-cache {args.pool_cache} does not exist")
    if getattr(args, "rag_alpha", None) is not None and not 0 <= args.rag_alpha <= 1:
        raise UsageError(f"--rag-alpha must be in [0, 1], got {args.rag_alpha}")


def gate_methods(args: argparse.Namespace) -> list[str]:
    from ..evaluation import get_method

    names = split_list(args.gate_methods)
    for n in names:
        get_method(n)  # unknown names fail here
    return names


def load_sae_arg(path: str | None, device: str):
    if path is None:
        return None
    from ..sae.loading import load_sae

    return load_sae(path, device)


def load_layer_saes(text: str | None, device: str) -> list[Any] | None:
    from ..sae.loading import load_sae

    if not text:
        return None
    paths = [Path(p) for p in split_list(text)]
    if len(paths) == 1 and paths[0].is_dir() and not (paths[0] / "cfg.json").is_file():
        paths = sorted(p.parent for p in paths[0].glob("*/cfg.json"))
        if not paths:
            raise MissingInputError(f"{text} holds no SAE folders (no */cfg.json)")
    return [load_sae(p, device) for p in paths]


def resolve_fvu_threshold(args: argparse.Namespace, sae, model=None) -> tuple[float | None, dict[str, Any]]:
    """The gate threshold from --fvu-threshold, or from --fvu-quantile over --reference-cache (checked:
    CLS rows at the SAE's hook, made by the same model)."""
    if args.fvu_quantile is None:
        return args.fvu_threshold, ({"fvu_threshold_source": "given"} if args.fvu_threshold is not None else {})
    if sae is None:
        raise UsageError("--fvu-quantile needs --sae")
    if "," in str(args.reference_cache) or getattr(args, "gate_datasets", None):  # a union of references
        from ..training.gate import union_fvu_threshold

        tau, info = union_fvu_threshold(sae, args.reference_cache, args.fvu_quantile, datasets=args.gate_datasets,
                                        hook_name=args.hook, model=model)
        print(f"FVU gate: tau = {tau:.4f} (quantile {args.fvu_quantile} of per-sample FVU over {info['n_rows']} rows "
              f"of {', '.join(info['datasets'])} in {args.reference_cache})")
        return tau, {"fvu_quantile": args.fvu_quantile, "reference_cache": str(args.reference_cache),
                     "gate_datasets": info["datasets"], "gate_rows": info["rows_per_dataset"]}
    from ..training.gate import fvu_threshold_from_reference

    tau = fvu_threshold_from_reference(sae, args.reference_cache, args.fvu_quantile, hook_name=args.hook,
                                       show_progress=not args.no_progress, model=model)
    print(f"FVU gate: tau = {tau:.4f} (quantile {args.fvu_quantile} of per-sample FVU over {args.reference_cache})")
    return tau, {"fvu_quantile": args.fvu_quantile, "reference_cache": str(args.reference_cache)}


def gate_reference(args: argparse.Namespace) -> dict[str, Any]:
    """The gate's quantile and reference store, for the FVU-decile analysis's quantiles (one store only)."""
    ref = getattr(args, "reference_cache", None)
    return {"fvu_quantile": getattr(args, "fvu_quantile", None),
            **({"fvu_reference": ref} if ref and "," not in str(ref) else {})}


def default_out(args: argparse.Namespace, prefix: str) -> Path:
    """`runs/<prefix>_<dataset>_<split>` (known before any data is loaded)."""
    name = args.dataset.replace("/", "_").replace(":", "_").replace(",", "+")
    return Path(args.out or f"runs/{prefix}_{name}_{args.split}")


def request_of(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    """The settings that decide the numbers, for the output folder's record (paths made absolute)."""
    paths = {"sae", "data_dir", "reference_cache", "pool_cache", "layer_saes", "pool_retrieval_embeds",
             "query_retrieval_embeds", "retrieval_cache"}
    values = {k: getattr(args, k, None) for k in keys if hasattr(args, k)}
    if str(values.get("model") or "").startswith("local-dir:"):  # the folder, wherever the command runs from
        values["model"] = "local-dir:" + abspath(values["model"].split(":", 1)[1])
    return {k: (abspath(v) if k in paths and v and "," not in str(v) else v) for k, v in values.items()}


EVAL_REQUEST_KEYS = (
    "model", "pretrained", "random_weights", "model_kwargs", "seed", "dataset", "data_dir", "split", "limit",
    "skip_bad_images", "sae", "hook", "lam", "gamma", "fvu_threshold", "fvu_quantile", "reference_cache",
    "gate_methods", "gate_datasets", "templates", "methods", "layer_saes", "pool_cache", "pool_other_dataset", "n_neighbours", "retrieval_backend",
    "pool_retrieval_embeds", "query_retrieval_embeds", "rag_alpha", "vs2pp_fallback",
    "retrieval_backbone", "retrieval_pretrained", "retrieval_random_weights", "retrieval_model_kwargs",
)


def interrupted(args: argparse.Namespace) -> str:
    return "nothing was saved (results are written at the end); earlier results in --out are unchanged"


def run(args: argparse.Namespace) -> int:
    from ..core import distributed
    from ..core.outputs import prepare_output_dir
    from ..evaluation import evaluate

    methods = split_list(args.methods)
    if not methods:
        raise UsageError("--methods is empty")
    if args.sae is None and args.model is None and not args.random_weights:
        raise UsageError("eval needs a model: --sae DIR (evaluates with the SAE's recorded model) or --model NAME "
                         "--pretrained TAG (e.g. --model ViT-B-32 --pretrained openai --methods zeroshot)")
    check_steering_values(args)
    retrieval_backbone_options(args)  # --retrieval-* flags without --retrieval-backbone: refused now
    gated = gate_methods(args)
    t0 = time.perf_counter()
    sae = load_sae_arg(args.sae, args.device)
    for note in resolve_model_args(args, sae, args.sae):
        print(f"using {note}")
    # torchrun: every rank names the same folder, rank 0 owns it
    folder = prepare_output_dir(default_out(args, "eval"), "eval", request_of(args, EVAL_REQUEST_KEYS), args.overwrite)
    model = load_model(args)
    data = load_data(args, model)
    tau, gate_cfg = resolve_fvu_threshold(args, sae, model)
    layer_saes = load_layer_saes(args.layer_saes, args.device)
    setup_s = time.perf_counter() - t0
    config = {"sae_path": args.sae, "random_weights": args.random_weights, "seed": args.seed, "limit": args.limit,
              **gate_cfg, **({"retrieval": retrieval_options(args)} if args.pool_cache else {})}
    if getattr(data, "members", None) is not None:  # a union: each data set on its own (union_eval.py)
        from ..evaluation.union import evaluate_members

        res = evaluate_members(model, data.members, sae, methods, lam=args.lam, gamma=args.gamma, fvu_threshold=tau,
                               templates=args.templates, hook_name=args.hook, batch_size=args.batch_size,
                               num_workers=args.num_workers, show_progress=not args.no_progress,
                               options={"layer_saes": layer_saes, **gate_reference(args), **retrieval_options(args)}, config=config,
                               gate_methods=gated, text_cache=resolve_text_cache(args))
        return save_members(res, folder, setup_s, plots=not args.no_plots) if distributed.is_main() else 0
    result = evaluate(model, data, sae, methods, lam=args.lam, gamma=args.gamma, fvu_threshold=tau,
                      templates=args.templates, hook_name=args.hook, batch_size=args.batch_size,
                      num_workers=args.num_workers, show_progress=not args.no_progress,
                      options={"layer_saes": layer_saes, **gate_reference(args), **retrieval_options(args)}, config=config,
                      gate_methods=gated, text_cache=resolve_text_cache(args))
    if not distributed.is_main():
        return 0  # the other ranks helped with the backbone pass; rank 0 reports and writes
    result.timing["setup_s"] = setup_s
    result.timing["peak_rss_mib"] = peak_rss_mib()
    print_summary(result)  # before saving: a failing disk cannot take the numbers with it
    written = result.save(folder, plots=not args.no_plots)
    folder.finish()
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


def save_members(res, folder, setup_s: float, plots: bool = True) -> int:
    """Print and save a per-data-set evaluation (`union_eval.UnionEvaluation`): one folder per data set and
    the combined summary; returns the exit code."""
    for result in res.results.values():
        result.timing["setup_s"] = setup_s
        result.timing["peak_rss_mib"] = peak_rss_mib()
        print_summary(result)
    print("summary (top-1, change against zero-shot):")
    print(res.table())
    res.save(folder, plots=plots)
    folder.finish()
    print(f"wrote {folder.path}/: " + ", ".join(f"{n}/" for n in res.summary()["folders"].values())
          + ", summary.json, summary.md" + (", summary_delta.png" if plots else ""))
    return 0


def print_summary(result) -> None:
    c, t = result.config, result.timing
    print(f"{c['dataset']}/{c['split']}: {c['n_images']} images"
          + (f" ({c['n_skipped']} unreadable skipped)" if c.get("n_skipped") else "")
          + f", hook {c['hook_name']}, lam={c['lam']}, gamma={c['gamma']}"
          + (f", FVU gate tau={c['fvu_threshold']:.4g} on {', '.join(c.get('gated_methods') or []) or 'no method'}"
             if c.get("fvu_threshold") is not None else ""))
    print(result.table())
    print(f"time: text {t['text_s']:.1f} s{' (cached)' if t.get('text_cache') == 'hit' else ''}, backbone {t['backbone_s']:.1f} s ({t['n_backbone_passes']} pass(es)), "
          f"methods {sum(t['methods_s'].values()):.2f} s, total {t['total_s']:.1f} s")
