"""ViT-Prisma SAEs (`Prisma-Multimodal/...` Hub repos): `config.json` + one weights file `*.pt`.

`config.json` is `VisionModelSAERunnerConfig.save_config` (ViT-Prisma 2.x): `model_name`
(`open-clip:<hf repo>`, a timm or HF name), `hook_point_layer` + `layer_subtype` (the hook is
`blocks.{layer}.{subtype}`, TransformerLens names, the same as ours), `d_in`, `expansion_factor`
(`d_sae = d_in * expansion_factor`), `architecture`, `activation_fn_str` / `activation_fn_kwargs`,
`cls_token_only`, `use_patches_only`, `normalize_activations`, `is_transcoder`. The weights file
(`n_images_<N>.pt`) is `save_model`'s `{"cfg": <config object>, "state_dict": ...}` or a plain state dict:
`W_enc [d, M]`, `b_enc`, `W_dec [M, d]`, `b_dec` (gated: plus `b_gate`, `r_mag`, `b_mag`). It is read with
`torch.load(weights_only=True)`; the pickled config object is received by an inert stand-in (its code is
not run, and ViT-Prisma need not be installed).

Mapping: `standard` + `relu` -> SAELens `standard`; `standard` + `topk` (top k, then ReLU) -> `topk`;
`gated` + `relu` -> `gated`; always `apply_b_dec_to_input=True`.

The model's activations: ViT-Prisma 2.0 trains on `HookedViT.from_pretrained(...)`, whose defaults
(`center_writing_weights=True`, base_transformer.py) centre the weights that write to the residual stream
(not the patch embedding). Its hook values then differ from the original tower's, which ours are, by a
per-token multiple of the all-ones vector; the config does not record whether that was on. An SAE with
run-time `layer_norm` subtracts the mean first and is unaffected; for any other the loader says so (a
warning, and `source.residual_centering` in the metadata). `normalize_activations`
`layer_norm` / `constant_norm_rescale` are SAELens' own run-time normalisations (the same code): kept
as they are, exact, but the reconstruction is then not an affine map of the latents in the model's
activation space, so VS2 and the reconstruction baselines refuse such SAEs by name
(`steering.hooks.check_affine_decoder`). Positions:
`cls_token_only` -> `cls`, `use_patches_only` -> `patches`, else `all`. Refused: transcoders,
`tanh-relu`, gated + topk, `jumprelu` (ViT-Prisma's loader has no such class).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ...core.errors import InputError
from .common import ImportOptions, Opaque, build_sae, import_metadata, torch_load

NAME = "prisma"
DESCRIPTION = "ViT-Prisma: config.json (VisionModelSAERunnerConfig) + a *.pt weights file"
CONFIG = "config.json"
CONFIG_CLASS = "vit_prisma.sae.config.VisionModelSAERunnerConfig"
RUNTIME_NORMS = ("layer_norm", "constant_norm_rescale")
CENTERING_NOTE = ("ViT-Prisma's HookedViT centres the weights writing to the residual stream by default; if this SAE "
                  "was trained that way, its inputs differed from this model's by a per-token multiple of the "
                  "all-ones vector (the config does not record it; only a run-time layer_norm removes it)")


def _config(folder: Path) -> dict[str, Any] | None:
    path = folder / CONFIG
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return cfg if isinstance(cfg, dict) and "hook_point_layer" in cfg and "d_in" in cfg else None


def detect(folder: Path) -> bool:
    return folder.is_dir() and _config(folder) is not None and any(folder.glob("*.pt"))


def model_name(name: str | None) -> str | None:
    """ViT-Prisma's model names in ours: `open-clip:<repo>` is open_clip's `hf-hub:<repo>`."""
    if not name:
        return None
    if name.startswith("open-clip:"):
        return "hf-hub:" + name.split(":", 1)[1]
    return name


def load(folder: Path, options: ImportOptions, where: str, repo_id: str | None = None):
    cfg = _config(folder)
    pts = sorted(folder.glob("*.pt"))
    pts = [p for p in pts if not p.name.endswith("log_feature_sparsity.pt")]
    if len(pts) != 1:
        raise InputError(f"{where}: expected one ViT-Prisma weights file (*.pt) next to {CONFIG}, found "
                         f"{[p.name for p in pts]}")
    blob = torch_load(pts[0], options.allow_pickle, stubs={CONFIG_CLASS: Opaque})
    state = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
    if not isinstance(state, dict):
        raise InputError(f"{where}: {pts[0].name} holds no state dict")
    arch, act = cfg.get("architecture", "standard"), cfg.get("activation_fn_str", "relu")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    norm = cfg.get("normalize_activations") or "none"
    refused = []
    if cfg.get("is_transcoder"):
        refused.append("a transcoder")
    if cfg.get("hook_point_head_index") is not None:
        refused.append(f"an SAE on one attention head (hook_point_head_index {cfg['hook_point_head_index']})")
    if (arch, act) not in (("standard", "relu"), ("standard", "topk"), ("gated", "relu")):
        refused.append(f"architecture {arch!r} with activation {act!r}")
    if norm not in ("none", *RUNTIME_NORMS):
        refused.append(f"normalize_activations {norm!r}")
    if refused:
        raise InputError(f"{where}: cannot be represented exactly as a SAELens SAE: " + "; ".join(refused))
    d_in = int(cfg["d_in"])
    d_sae = d_in * int(cfg.get("expansion_factor", 16))
    keys = ("W_enc", "W_dec", "b_dec") + (("b_gate", "r_mag", "b_mag") if arch == "gated" else ("b_enc",))
    weights = {k: state[k] for k in keys if k in state}
    if "W_enc" in weights and weights["W_enc"].shape[-1] != d_sae:
        raise InputError(f"{where}: W_enc has {weights['W_enc'].shape[-1]} latents, the config implies "
                         f"d_in * expansion_factor = {d_sae}")
    positions = "cls" if cfg.get("cls_token_only") else ("patches" if cfg.get("use_patches_only") else "all")
    recorded = {"hook_name": f"blocks.{cfg['hook_point_layer']}.{cfg.get('layer_subtype', 'hook_resid_post')}",
                "model_name": model_name(cfg.get("model_name")), "positions": positions}
    source = {"format": NAME, "library": "vit-prisma", "file": pts[0].name, "model_name": cfg.get("model_name"),
              "normalize_activations": norm,
              "residual_centering": CENTERING_NOTE if norm != "layer_norm" else "no effect (run-time layer norm)"}
    if norm != "layer_norm":
        warnings.warn(f"{where}: {CENTERING_NOTE}", stacklevel=4)
    meta = import_metadata(options, recorded, source, where)
    extra: dict[str, Any] = {"apply_b_dec_to_input": True, "normalize_activations": norm}
    architecture = "gated" if arch == "gated" else ("topk" if act == "topk" else "standard")
    if architecture == "topk":
        if "k" not in kwargs:
            raise InputError(f"{where}: activation 'topk' without activation_fn_kwargs.k")
        extra["k"] = int(kwargs["k"])
    if "W_enc" not in weights:
        raise InputError(f"{where}: {pts[0].name} has no W_enc")
    return build_sae(architecture, weights, meta, where, **extra)
