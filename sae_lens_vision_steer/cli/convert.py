"""`vision-steer convert`: an SAE trained with another library, written as a SAELens SAE folder."""

from __future__ import annotations

import argparse

from .common import json_object

HELP = "convert an SAE from sparsify, ViT-Prisma, saev, ViSAEBench or overcomplete into a SAELens SAE folder"
DESCRIPTION = (HELP + ". The folder then works with every command that takes --sae (eval, sweep, features, "
               "publish) and with plain SAE.load_from_disk. A checkpoint that SAELens cannot represent exactly is "
               "refused with the reason (docs/sae-sources.md).")
FORMATS = "auto, saelens, sparsify, prisma, visaebench, saev, overcomplete"
# The library arguments (ImportOptions, import_sae) whose flags differ (see common.ARGUMENT_FLAGS).
ARGUMENT_FLAGS = {"hook_name": "--hook", "model_name": "--model", "source": "--source", "out_dir": "--out"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="folder, file, or Hub repo id (ORG/NAME) holding the SAE")
    p.add_argument("--sae-id", default=None, help="the SAE's sub-folder in --source (when it holds several)")
    p.add_argument("--format", default="auto", help=f"one of: {FORMATS}; auto detects it from the files")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    g = p.add_argument_group("what the source's files may not say (each overrides what they say)")
    g.add_argument("--hook", default=None, help="hook on our model the SAE reads, e.g. blocks.11.hook_resid_post")
    g.add_argument("--model", default=None,
                   help="the model it was trained on, in our naming (ViT-B-32, hf-hub:..., hf:...)")
    g.add_argument("--pretrained", default=None, help="that model's pretrained tag (openai, ...)")
    g.add_argument("--positions", default=None, choices=["cls", "patches", "all"], help="tokens it was trained on")
    g.add_argument("--input-norm", default=None,
                   help="'none', or a .pt/.json file with 'mean' and 'std': the normalisation the source applied to "
                        "activations before its SAE (saev, ViSAEBench's norm_stats.pt); folded into the weights")
    g.add_argument("--constructor", type=json_object, default=None,
                   help="overcomplete: JSON of the constructor arguments (class, input_shape, nb_concepts, top_k, ...)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="read a torch file that needs full unpickling (runs code from it: trusted files only)")


def run(args: argparse.Namespace) -> int:
    from ..sae.formats import ImportOptions
    from ..sae.importing import import_sae

    options = ImportOptions(hook_name=args.hook, model_name=args.model, pretrained=args.pretrained,
                            positions=args.positions, input_norm=args.input_norm, allow_pickle=args.allow_pickle,
                            constructor=args.constructor)
    res = import_sae(args.source, args.out, args.sae_id, args.format, options, args.revision)
    cfg, meta = res.sae.cfg, res.info.metadata
    print(f"{res.info.format} SAE -> SAELens {cfg.architecture()} SAE, d_in {cfg.d_in}, d_sae {cfg.d_sae}"
          + (f", k {cfg.k}" if hasattr(cfg, "k") else ""))
    print(f"hook {meta.get('hook_name')}, positions {meta.get('positions') or 'all (not recorded)'}, "
          f"model {meta.get('model_name') or 'not recorded'}")
    print(f"wrote {res.out_dir}")
    return 0
