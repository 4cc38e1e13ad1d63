"""`vision-steer eval`: zero-shot accuracy of VS2 and the baselines, one backbone pass for all of them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import add_data_args, add_model_args, load_data, load_model, peak_rss_mib

HELP = "evaluate zero-shot CLIP, VS2 and SAE-reconstruction baselines on a data set"
DESCRIPTION = (
    "Runs the backbone once, caches the SAE hook's CLS tokens, and scores every method on them: "
    "zeroshot (plain CLIP), vs2, rec_final, rec_final_gamma (and rec_all with --layer-saes, which needs "
    "its own pass). Writes results.json, results.md and per-class gain/loss plots to --out."
)


def add_steering_args(p: argparse.ArgumentParser, with_sae: bool = True, sae_required: bool = False) -> None:
    """SAE, VS2 settings and the FVU gate (shared by eval, sweep and run)."""
    g = p.add_argument_group("steering")
    if with_sae:
        g.add_argument("--sae", required=sae_required, default=None,
                       help="SAELens SAE folder (cfg.json + sae_weights.safetensors), trained on the hook to steer")
    g.add_argument("--hook", default=None, help="hook to steer (default: the SAE's metadata)")
    g.add_argument("--lam", type=float, default=2.1, help="VS2 lambda (paper: 2.1 for CIFAR-100, ViT-B/32)")
    g.add_argument("--gamma", type=float, default=1.5, help="VS2 gamma, also used by rec_final_gamma (paper: 1.5)")
    g.add_argument("--fvu-threshold", type=float, default=None,
                   help="FVU gate: steer only images with per-sample FVU <= this")
    g.add_argument("--fvu-quantile", type=float, default=None,
                   help="FVU gate threshold as this quantile (e.g. 0.99) of FVU over --reference-cache")
    g.add_argument("--reference-cache", default=None,
                   help="activation cache of unlabeled training images for --fvu-quantile")
    g.add_argument("--templates", default=None,
                   help="template set: cifar (18), imagenet (80), cub, single; default: the data set's CLIP set")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_data_args(p)
    add_steering_args(p)
    p.add_argument("--methods", default="zeroshot,vs2,rec_final,rec_final_gamma",
                   help="comma-separated methods: zeroshot, vs2, rec_final, rec_final_gamma, rec_all, and any "
                        "other registered method (e.g. VS2++ ones)")
    p.add_argument("--layer-saes", default=None,
                   help="for rec_all: comma-separated SAE folders, or one folder holding one SAE folder per layer")
    add_retrieval_args(p)
    p.add_argument("--out", default=None, help="output folder (default: runs/eval_<dataset>_<split>)")
    p.add_argument("--no-plots", action="store_true", help="skip the per-class PNGs")


def add_retrieval_args(p: argparse.ArgumentParser) -> None:
    """VS2++ and retrieval baselines (methods vs2pp, vs2pp_majority, vs2pp_oracle, clip_steer,
    clip_steer_oracle, weighted_rag, weighted_rag_oracle; see steering/vs2pp_methods.py)."""
    g = p.add_argument_group("retrieval (VS2++ and its baselines)")
    g.add_argument("--pool-cache", default=None,
                   help="activation cache of the unlabeled training split at the SAE's hook (the retrieval pool)")
    g.add_argument("--n-neighbours", type=int, default=50, help="neighbours retrieved per test image (paper: 50)")
    g.add_argument("--retrieval-backend", default="exact", choices=["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf"],
                   help="exact chunked search, or a FAISS index (pip install faiss-cpu)")
    g.add_argument("--pool-retrieval-embeds", default=None,
                   help=".npy [pool rows, dim] retrieval embedding (e.g. DINOv2) instead of CLIP; needs the next flag")
    g.add_argument("--query-retrieval-embeds", default=None, help=".npy [test images, dim], aligned with the test set")
    g.add_argument("--rag-alpha", type=float, default=0.5, help="weighted RAG: weight of the query embedding")
    g.add_argument("--vs2pp-fallback", default="vs2", choices=["vs2", "none"],
                   help="VS2++ when S+ or S- is empty: plain VS2 for that image, or no steering")


def retrieval_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"pool_cache": args.pool_cache, "n_neighbours": args.n_neighbours,
            "retrieval_backend": args.retrieval_backend, "pool_retrieval_embeds": args.pool_retrieval_embeds,
            "query_retrieval_embeds": args.query_retrieval_embeds, "rag_alpha": args.rag_alpha,
            "vs2pp_fallback": args.vs2pp_fallback}


def split_list(text: str | None, cast: Any = str) -> list[Any]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError as e:
        raise ValueError(f"cannot parse {text!r} as a comma-separated list of {cast.__name__}: {e}") from None


def load_sae_arg(path: str | None, device: str):
    if path is None:
        return None
    from ..evaluation import load_sae

    return load_sae(path, device)


def load_layer_saes(text: str | None, device: str) -> list[Any] | None:
    from ..evaluation import load_sae

    if not text:
        return None
    paths = [Path(p) for p in split_list(text)]
    if len(paths) == 1 and paths[0].is_dir() and not (paths[0] / "cfg.json").is_file():
        paths = sorted(p.parent for p in paths[0].glob("*/cfg.json"))
        if not paths:
            raise FileNotFoundError(f"{text} holds no SAE folders (no */cfg.json)")
    saes = [load_sae(p, device) for p in paths]
    return saes


def resolve_fvu_threshold(args: argparse.Namespace, sae) -> tuple[float | None, dict[str, Any]]:
    """The gate threshold from --fvu-threshold, or from --fvu-quantile over --reference-cache."""
    if args.fvu_threshold is not None and args.fvu_quantile is not None:
        raise ValueError("give --fvu-threshold or --fvu-quantile, not both")
    if args.fvu_quantile is None:
        return args.fvu_threshold, ({"fvu_threshold_source": "given"} if args.fvu_threshold is not None else {})
    if not args.reference_cache:
        raise ValueError("--fvu-quantile needs --reference-cache (unlabeled training activations)")
    if sae is None:
        raise ValueError("--fvu-quantile needs --sae")
    from ..steering.vs2 import fvu_threshold_from_reference

    tau = fvu_threshold_from_reference(sae, args.reference_cache, args.fvu_quantile, hook_name=args.hook,
                                       show_progress=True)
    print(f"FVU gate: tau = {tau:.4f} (quantile {args.fvu_quantile} of per-sample FVU over {args.reference_cache})")
    return tau, {"fvu_quantile": args.fvu_quantile, "reference_cache": str(args.reference_cache)}


def check_sae_model(sae, args: argparse.Namespace) -> None:
    """Warn when the SAE's metadata says it was trained on another model than the one loaded."""
    import warnings

    if sae is None:
        return
    meta = sae.cfg.metadata
    recorded = meta.get("model_name")
    if recorded and recorded != args.model:
        warnings.warn(f"the SAE was trained on {recorded!r}, evaluating on {args.model!r}", stacklevel=2)
    pretrained = None if args.random_weights else args.pretrained
    if "pretrained" in meta and meta.get("pretrained") != pretrained:
        warnings.warn(f"the SAE was trained on weights {meta.get('pretrained')!r}, evaluating with {pretrained!r}",
                      stacklevel=2)


def default_out(args: argparse.Namespace, data, prefix: str) -> Path:
    return Path(args.out or f"runs/{prefix}_{data.dataset_id.replace('/', '_').replace(':', '_')}_{data.split}")


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate

    methods = split_list(args.methods)
    if not methods:
        raise ValueError("--methods is empty")
    t0 = time.perf_counter()
    model = load_model(args)
    sae = load_sae_arg(args.sae, args.device)
    check_sae_model(sae, args)
    data = load_data(args, model)
    tau, gate_cfg = resolve_fvu_threshold(args, sae)
    layer_saes = load_layer_saes(args.layer_saes, args.device)
    out = default_out(args, data, "eval")
    setup_s = time.perf_counter() - t0
    config = {"sae_path": args.sae, "random_weights": args.random_weights, "seed": args.seed, "limit": args.limit,
              **gate_cfg, **({"retrieval": retrieval_options(args)} if args.pool_cache else {})}
    result = evaluate(model, data, sae, methods, lam=args.lam, gamma=args.gamma, fvu_threshold=tau,
                      templates=args.templates, hook_name=args.hook, batch_size=args.batch_size,
                      num_workers=args.num_workers, options={"layer_saes": layer_saes, **retrieval_options(args)}, config=config)
    result.timing["setup_s"] = setup_s
    result.timing["peak_rss_mib"] = peak_rss_mib()
    written = result.save(out, plots=not args.no_plots)
    print_summary(result)
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    return 0


def print_summary(result) -> None:
    c, t = result.config, result.timing
    print(f"{c['dataset']}/{c['split']}: {c['n_images']} images"
          + (f" ({c['n_skipped']} unreadable skipped)" if c.get("n_skipped") else "")
          + f", hook {c['hook_name']}, lam={c['lam']}, gamma={c['gamma']}"
          + (f", FVU gate tau={c['fvu_threshold']:.4g}" if c.get("fvu_threshold") is not None else ""))
    print(result.table())
    print(f"time: text {t['text_s']:.1f} s, backbone {t['backbone_s']:.1f} s ({t['n_backbone_passes']} pass(es)), "
          f"methods {sum(t['methods_s'].values()):.2f} s, total {t['total_s']:.1f} s")
