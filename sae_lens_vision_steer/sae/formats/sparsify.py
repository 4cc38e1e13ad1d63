"""EleutherAI sparsify checkpoints: `<hookpoint>/cfg.json` + `<hookpoint>/sae.safetensors`.

Written by `SparseCoder.save_to_disk` (eai-sparsify >= 1.0): `cfg.json` holds `SparseCoderConfig`
(`activation`, `expansion_factor`, `num_latents`, `k`, `normalize_decoder`, `multi_topk`,
`skip_connection`, `transcode`) plus `d_in`; the weights are `encoder.weight [M, d_in]`,
`encoder.bias [M]`, `W_dec [M, d_in]`, `b_dec [d_in]` (and `W_skip` with a skip connection). A training
run's root folder may hold `config.json` with the model it hooked (`model`).

Its SAE computes `top_k(relu(encoder(x - b_dec)))` and decodes `acts @ W_dec + b_dec`: SAELens' `topk`
architecture with `apply_b_dec_to_input=True` (SAELens takes the top k and then applies ReLU, which gives
the same latents). Refused: `groupmax` activations, skip connections and transcoders.

SAELens' own `sparsify_disk_loader` (6.54) reads these files but does not fit sparsify 1.x checkpoints:
it takes `d_sae` from `num_latents` (0 when `expansion_factor` is used), transposes `W_dec` (stored
`[M, d_in]` already), sets `apply_b_dec_to_input = not normalize_decoder` (sparsify always subtracts
`b_dec` from an SAE's input) and forces bfloat16. We read the same files with this mapping instead; the
exactness test against sparsify's own forward is in tests/sae/test_sae_formats.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import load_file

from ...core.errors import InputError
from .common import ImportOptions, build_sae, check_shapes, import_metadata

NAME = "sparsify"
DESCRIPTION = "EleutherAI sparsify: <hookpoint>/cfg.json + sae.safetensors"
CFG_FILE, WEIGHTS_FILE, RUN_CONFIG = "cfg.json", "sae.safetensors", "config.json"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)$")


def detect(folder: Path) -> bool:
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def hook_for_hookpoint(hookpoint: str) -> str | None:
    """`vision_model.encoder.layers.11` (a transformer block's output) -> `blocks.11.hook_resid_post`."""
    match = _LAYER_RE.search(hookpoint)
    return f"blocks.{int(match.group(1))}.hook_resid_post" if match else None


def load(folder: Path, options: ImportOptions, where: str, repo_id: str | None = None):
    cfg = json.loads((folder / CFG_FILE).read_text())
    refused = []
    if cfg.get("activation", "topk") != "topk":
        refused.append(f"activation {cfg.get('activation')!r} (SAELens has top-k, not group-max)")
    if cfg.get("transcode"):
        refused.append("transcode=True (a transcoder; checkpoints before sparsify PR #49, 2025-02, also subtracted "
                       "b_dec from the input, which the file does not record)")
    if cfg.get("skip_connection"):
        refused.append("skip_connection=True (an SAE with a linear skip term is not a SAELens SAE)")
    if refused:
        raise InputError(f"{where}: cannot be represented exactly as a SAELens SAE: " + "; ".join(refused))
    if "d_in" not in cfg or "k" not in cfg:
        raise InputError(f"{where}: {CFG_FILE} lacks d_in or k; not a sparsify SparseCoder config")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    raw = load_file(str(folder / WEIGHTS_FILE))
    if "W_skip" in raw:
        raise InputError(f"{where}: the weights hold W_skip (a skip connection), which a SAELens SAE cannot represent")
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    check_shapes(raw, expected, where)
    run = json.loads((folder.parent / RUN_CONFIG).read_text()) if (folder.parent / RUN_CONFIG).is_file() else {}
    model = run.get("model")
    recorded = {"hook_name": hook_for_hookpoint(folder.name), "model_name": f"hf:{model}" if model else None}
    source = {"format": NAME, "library": "eai-sparsify", "hookpoint": folder.name,
              "file": f"{folder.name}/{WEIGHTS_FILE}",
              "hook_hint": f"; its hookpoint is {folder.name!r}"}
    meta = import_metadata(options, recorded, source, where)
    weights = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"],
               "b_dec": raw["b_dec"]}
    return build_sae("topk", weights, meta, where, k=int(cfg["k"]), apply_b_dec_to_input=True)
