"""ViSAEBench checkpoints: `<subfolder>/sae.pt` (or `model.safetensors` / `model.pt`) + `config.json`
(or `config.yaml` / `config.yml`), as `visaebench.hub.load_sae` reads them.

Hub repos: `visaebench/<backbone>-saes/batchtopk_{8,16,32}x_k{64,128,192,256}/`. Config keys: `activation`
(or `sae_type` / `architecture`: `topk`, `batchtopk`, `jumprelu`), `input_dim`, `hidden_dim`,
`expansion_factor`, `k`, `threshold`. Weights: `encoder.weight [M, d]`, `encoder.bias [M]`,
`decoder.weight [M, d]`, `decoder.bias [d]` (optional), or overcomplete's keys (`encoder.final_block.0.*`,
`dictionary._weights` times `exp(dictionary.multiplier)`, no decoder bias); BatchTopK's threshold from the
config or `_running_threshold`, JumpReLU's from `jump_thresholds` / `thresholds` (ViSAEBench's defaults, 0
and 0.01, are used when absent, as its `GenericSAE` does).

`GenericSAE` computes `c = relu(x W^T + b)` and keeps the top k of `c` (SAELens `topk`), `c >= threshold`
(`jumprelu` with the threshold moved one float down, which keeps exactly `h >= t`) or `c > t_i` (`jumprelu`).
ViSAEBench feeds its SAEs `(x - mean) / std`, with `mean` per dimension and `std` one number, computed from
the evaluation activations (`norm_stats.pt` in its activation cache) and not stored with the SAE: pass them
as `input_norm` (the `norm_stats.pt` file itself works) and they are folded into the weights. Backbones:
`clip_vitb16` is `openai/clip-vit-base-patch16`'s `hidden_states[layer + 1]` (block `layer`'s output,
default 11) with the CLS token dropped, so the SAE reads `blocks.11.hook_resid_post` at `patches`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...core.errors import InputError, UsageError
from .common import (
    ImportOptions,
    build_sae,
    check_shapes,
    fold_input_norm,
    import_metadata,
    read_input_norm,
    threshold_at_or_above,
    torch_load,
)

NAME = "visaebench"
DESCRIPTION = "ViSAEBench: <config>/sae.pt or model.safetensors + config.json/.yaml"
WEIGHT_FILES = ("sae.pt", "model.safetensors", "model.pt")
CONFIG_FILES = ("config.json", "config.yaml", "config.yml")
# ViSAEBench's backbone registry (visaebench/backbones/*.py): Hub repo prefix -> (our model name, positions).
BACKBONES = {
    "clip-vitb16": "hf:openai/clip-vit-base-patch16",
    "dinov2-vitb14": "hf:facebook/dinov2-base",
    "siglip-vitb16": "hf:google/siglip-base-patch16-224",
}
DEFAULT_LAYER = 11
CONFIG_KEYS = ("activation", "sae_type", "architecture", "input_dim", "hidden_dim", "expansion_factor", "k", "threshold",
               "layer")


def _first(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def read_config(folder: Path) -> dict[str, Any] | None:
    path = _first(folder, CONFIG_FILES)
    if path is None:
        return None
    if path.suffix == ".json":
        return json.loads(path.read_text())
    import yaml

    return yaml.safe_load(path.read_text())


def detect(folder: Path) -> bool:
    if not folder.is_dir() or _first(folder, WEIGHT_FILES) is None:
        return False
    cfg = read_config(folder)
    return isinstance(cfg, dict) and any(k in cfg for k in ("activation", "sae_type", "input_dim", "hidden_dim"))


def _weights(raw: dict[str, torch.Tensor], where: str) -> tuple[torch.Tensor, ...]:
    if "encoder.weight" in raw:
        return raw["encoder.weight"], raw.get("encoder.bias"), raw.get("decoder.weight"), raw.get("decoder.bias")
    if "encoder.final_block.0.weight" in raw:
        dec = raw.get("dictionary._weights")
        mult = raw.get("dictionary.multiplier")
        if dec is not None and mult is not None and float(mult) != 0.0:
            dec = dec * mult.exp()
        return raw["encoder.final_block.0.weight"], raw.get("encoder.final_block.0.bias"), dec, None
    raise InputError(f"{where}: unrecognised weight names {sorted(raw)[:8]}; ViSAEBench expects 'encoder.weight' "
                     "or overcomplete's 'encoder.final_block.0.weight'")


def load(folder: Path, options: ImportOptions, where: str, repo_id: str | None = None):
    cfg = read_config(folder) or {}
    wfile = _first(folder, WEIGHT_FILES)
    if wfile.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(wfile))
    else:
        raw = torch_load(wfile, options.allow_pickle)
    enc_w, enc_b, dec_w, dec_b = _weights(raw, where)
    d_sae, d_in = int(cfg.get("hidden_dim", enc_w.shape[0])), int(cfg.get("input_dim", enc_w.shape[1]))
    parts = {"encoder weight": enc_w, "encoder bias": enc_b, "decoder weight": dec_w}
    check_shapes({k: v for k, v in parts.items() if v is not None},
                 {"encoder weight": (d_sae, d_in), "encoder bias": (d_sae,), "decoder weight": (d_sae, d_in)}, where)
    if dec_b is not None:
        check_shapes({"decoder bias": dec_b}, {"decoder bias": (d_in,)}, where)
    activation = str(cfg.get("activation", cfg.get("sae_type", cfg.get("architecture", "topk")))).lower()
    weights = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": dec_w,
               "b_dec": dec_b if dec_b is not None else torch.zeros(d_in)}
    extra: dict[str, Any] = {}
    if activation == "topk":
        if cfg.get("k") is None:
            raise InputError(f"{where}: a topk ViSAEBench config needs k")
        architecture, extra = "topk", {"k": int(cfg["k"])}
    elif activation == "batchtopk":
        t = cfg.get("threshold")
        t = float(raw["_running_threshold"]) if t is None and "_running_threshold" in raw else float(t or 0.0)
        architecture, weights["threshold"] = "jumprelu", threshold_at_or_above(torch.full((d_sae,), t))
    elif activation == "jumprelu":
        t = raw.get("jump_thresholds", raw.get("thresholds"))
        architecture = "jumprelu"
        weights["threshold"] = torch.full((d_sae,), 0.01) if t is None else t.to(torch.float32)
    else:
        raise InputError(f"{where}: unknown ViSAEBench activation {activation!r} (topk, batchtopk, jumprelu)")
    if options.input_norm is None:
        raise UsageError(f"{where}: ViSAEBench feeds its SAEs (x - mean) / std with statistics of the evaluation "
                         "activations, which are not stored with the SAE. Pass input_norm= the norm_stats.pt of "
                         "ViSAEBench's activation cache (or {'mean': ..., 'std': ...}), or 'none'",
                         arguments=("input_norm",))
    norm = read_input_norm(options.input_norm, d_in, where)
    backbone = (repo_id or "").split("/")[-1].removesuffix("-saes")
    recorded = {"model_name": BACKBONES.get(backbone), "positions": "patches",
                "hook_name": f"blocks.{int(cfg.get('layer', DEFAULT_LAYER))}.hook_resid_post"}
    recorded_cfg = {k: cfg[k] for k in CONFIG_KEYS if k in cfg}  # JSON values only: the metadata goes to cfg.json
    source = {"format": NAME, "library": "visaebench", "file": wfile.name, "config": recorded_cfg,
              "input_normalization": "folded" if norm else "none"}
    if "layer" not in cfg:
        source["hook_from"] = f"ViSAEBench's default layer {DEFAULT_LAYER} (the config records none)"
    meta = import_metadata(options, recorded, source, where)
    sae = build_sae(architecture, weights, meta, where, apply_b_dec_to_input=False, **extra)
    if norm is not None:
        fold_input_norm(sae, norm)
    return sae
