"""Checks on an SAE folder before and after SAELens loads it (`loading.load_vision_sae` calls them), so that a
damaged or hostile folder ends in one `InputError` naming the file, never in a traceback, a pickle being
run, or numbers computed from NaN weights.

- `cfg.json`: a JSON object with whole `d_in`, `d_sae` >= 1 and, for top-k SAEs, `0 < k <= d_sae`; the vision
  metadata's `model_kwargs` pass `models.kwargs.check_file_model_kwargs` (architecture options only).
- `sae_weights.safetensors`: really a safetensors file (its header is read; a pickle saved under this name is
  refused, never unpickled); its tensors match what `cfg.json` describes (SAELens' own `load_state_dict`
  check, e.g. the `threshold` of a JumpReLU SAE); every weight is finite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

from ..core.errors import InputError, MissingInputError
from ..models.kwargs import check_file_model_kwargs

KWARGS_FIELDS = ("model_kwargs", "model_from_pretrained_kwargs")  # the second is SAELens' copy of the first


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sae_config(folder: Path) -> dict[str, Any]:
    """Read and check `cfg.json` (see the module docstring); returns it."""
    path = folder / SAE_CFG_FILENAME
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} should hold a JSON object, got {type(cfg).__name__}")
    for key in ("d_in", "d_sae"):
        if not _whole(cfg.get(key)) or cfg[key] < 1:
            raise InputError(f"{path}: {key} should be a whole number >= 1, got {cfg.get(key)!r}")
    if "k" in cfg:
        k = cfg["k"]
        integral = cfg.get("architecture", "topk") == "topk"
        number = _whole(k) if integral else isinstance(k, (int, float)) and not isinstance(k, bool)
        if not number or not 0 < k <= cfg["d_sae"]:
            raise InputError(f"{path}: k={k!r} is out of range; a top-k SAE needs 0 < k <= d_sae "
                             f"({cfg['d_sae']})" + (" and a whole k" if integral else ""))
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise InputError(f"{path}: metadata should be a JSON object, got {type(meta).__name__}")
    for field in KWARGS_FIELDS:
        if meta.get(field) is not None:
            check_file_model_kwargs(meta[field], meta.get("model_name"), f"{path}: metadata.{field}")
    return cfg


def check_weights_file(folder: Path) -> Path:
    """The weights file exists and is a safetensors file (only its header is read)."""
    from safetensors import safe_open

    path = folder / SAE_WEIGHTS_FILENAME
    if not path.is_file():
        raise MissingInputError(f"{path} not found: an SAE folder holds {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME}")
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for every kind of damage
        head = path.open("rb").read(2)
        hint = " (it looks like a pickle; pickles are never loaded)" if head[:1] == b"\x80" else ""
        raise InputError(f"{path} is not a safetensors file{hint}: {' '.join(str(e).split())}") from None
    return path


def load_checked(sae_cls: Any, folder: Path, device: str, dtype: str | None):
    """`sae_cls.load_from_disk`, with SAELens' tensor-vs-config mismatch turned into an InputError."""
    try:
        sae = sae_cls.load_from_disk(folder, device=device, dtype=dtype)
    except RuntimeError as e:
        text = " ".join(str(e).split())
        if "Error(s) in loading state_dict" not in text:
            raise
        raise InputError(f"{folder / SAE_WEIGHTS_FILENAME} does not match {folder / SAE_CFG_FILENAME}: {text}") from None
    check_finite(sae, folder / SAE_WEIGHTS_FILENAME)
    return sae


def check_finite(sae: torch.nn.Module, where: Path | str) -> None:
    """Every floating-point weight is finite (NaN or inf weights give numbers that mean nothing)."""
    for name, t in sae.state_dict().items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise InputError(f"{where}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf); "
                                 "the SAE cannot be used")


__all__ = ["check_finite", "check_sae_config", "check_weights_file", "load_checked"]
