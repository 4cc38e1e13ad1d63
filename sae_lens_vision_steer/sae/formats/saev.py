"""saev (OSU-NLP-Group) checkpoints: one file `sae.pt` = a JSON header line, then `torch.save(state_dict)`.

Written by `saev.nn.dump`; Hub repos hold it at the root (`osunlp/SAE_CLIP_24K_ViT-B-16_IN1K/sae.pt`) or
per run (`layer_23/<run>/sae.pt`). Weights: `W_enc [d, M]`, `b_enc [M]`, `W_dec [M, d]`, `b_dec [d]`
(a BatchTopK SAE adds `activation.threshold`). The header changed over time; what the SAE computed
changed with it (traced through saev's history):

- no `schema` (saev <= 0.1, the published CLIP/DINOv2/BioCLIP SAEs): `relu((x - b_dec) W_enc + b_enc)`, on
  activations the data loader may have normalised as `(x - mean) / scale` (`scale_mean` / `scale_norm`, on by
  default), with statistics of the training data that are not in the file;
- schema 1 (2025-04 .. 07): the same encoder; the activation from `cls` or `cfg.activation`;
- schema 2 (2025-07 .. 10): `- b_dec` until 2025-09-05, not after; raw activations;
- schema 3-5: `act(x W_enc + b_enc)`, raw activations.

Mapping: ReLU -> SAELens `standard`; BatchTopK (at inference `x if x > threshold else 0`, `x > 0` when the
threshold is <= 0) -> `jumprelu` with that threshold on every latent. Refused: saev's TopK (it keeps the
top k pre-activations with their sign, SAELens' TopK applies ReLU), schema 2 with a non-zero `b_dec` (the
file does not say which encoder made it), and older checkpoints without `input_norm`: their normalisation
statistics are not in the file (pass them, or `"none"` if the data loader did not normalise).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from ...core.errors import InputError, UsageError
from .common import ImportOptions, build_sae, check_shapes, fold_input_norm, import_metadata, read_input_norm

NAME = "saev"
DESCRIPTION = "saev (OSU-NLP-Group): sae.pt = JSON header line + torch state dict"
FILE = "sae.pt"


def checkpoint_file(path: Path) -> Path | None:
    candidate = path / FILE if path.is_dir() else path
    if not candidate.is_file():
        return None
    with open(candidate, "rb") as f:
        head = f.read(1)
    return candidate if head == b"{" else None


def detect(path: Path) -> bool:
    return checkpoint_file(path) is not None


def read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, state dict), the way `saev.nn.load` splits the file, with torch.load(weights_only=True)."""
    with open(path, "rb") as f:
        try:
            header = json.loads(f.readline())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: the first line is not saev's JSON header ({e})") from None
        payload = f.read()
    tmp = io.BytesIO(payload)
    try:
        state = torch.load(tmp, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable payload is the user's file
        raise InputError(f"{path}: the state dict after the header cannot be read with "
                         f"torch.load(weights_only=True): {str(e).splitlines()[0][:200]}") from None
    return header, state


def _activation(header: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    schema = header.get("schema")
    if schema is None:
        return "Relu", {}
    cfg = header.get("cfg", {})
    if schema == 1 and header.get("cls") in ("Relu", "TopK", "BatchTopK"):
        return header["cls"], {"top_k": cfg.get("top_k")}
    act = cfg.get("activation") or {}
    return act.get("cls", "Relu"), act.get("params", {})


def load(path: Path, options: ImportOptions, where: str, repo_id: str | None = None):
    file = checkpoint_file(path)
    header, state = read(file)
    schema = header.get("schema")
    if schema not in (None, 1, 2, 3, 4, 5):
        raise InputError(f"{where}: saev header schema {schema!r} is newer than this loader knows (1-5)")
    cfg = header if schema is None else header.get("cfg", {})
    d_in = cfg.get("d_model", cfg.get("d_vit"))
    d_sae = cfg.get("d_sae") or (d_in * cfg["exp_factor"] if d_in and cfg.get("exp_factor") else None)
    if not d_in or not d_sae:
        raise InputError(f"{where}: the saev header records no d_model/d_vit and d_sae/exp_factor")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    check_shapes(state, expected, where)
    act, params = _activation(header)
    subtract = schema in (None, 1) or (schema == 2 and bool(state["b_dec"].abs().max() > 0))
    if schema == 2 and subtract:
        raise InputError(f"{where}: saev schema 2 with a non-zero b_dec: saev subtracted b_dec from the input until "
                         "2025-09-05 and not after, under the same schema; the file does not say which encoder it had")
    norm = None
    if schema in (None, 1) and options.input_norm is None:
        raise UsageError(f"{where}: this saev checkpoint (schema {schema or 'none'}) was trained on activations "
                         "that saev's data loader may have normalised as (x - mean) / scale (scale_mean, scale_norm, "
                         "on by default); the statistics are not in the file. Pass input_norm={'mean': ..., "
                         "'std': ...} from the activation folder, or input_norm='none' if it did not normalise",
                         arguments=("input_norm",))
    if options.input_norm is not None:
        norm = read_input_norm(options.input_norm, d_in, where)
    weights = {k: state[k] for k in expected}
    if act == "Relu":
        architecture, extra = "standard", {}
    elif act == "BatchTopK":
        threshold = state.get("activation.threshold", torch.tensor(0.0)).to(torch.float32)
        weights["threshold"] = threshold.clamp_min(0.0).expand(d_sae).clone()
        architecture, extra = "jumprelu", {}
    elif act == "TopK":
        raise InputError(f"{where}: saev's TopK keeps the top {params.get('top_k')} pre-activations with their sign "
                         "(no ReLU); SAELens' TopK applies ReLU, so the latents would differ whenever fewer than k "
                         "are positive. Not loaded")
    else:
        raise InputError(f"{where}: unknown saev activation {act!r}")
    source = {"format": NAME, "library": "saev", "schema": schema, "file": file.name, "saev_version": header.get("lib"),
              "input_normalization": "folded" if norm else "none"}
    meta = import_metadata(options, {}, source, where)
    sae = build_sae(architecture, weights, meta, where, apply_b_dec_to_input=subtract, **extra)
    if norm is not None:
        fold_input_norm(sae, norm)
    return sae
