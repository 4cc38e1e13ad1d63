"""The activation cache's on-disk format: constants, errors, fingerprints and the request that
identifies a cache (what must match for a cache to be reused or resumed)."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..core.errors import ConflictError, InputError, UsageError
from ..core.identity import (
    dataset_fingerprint,
    dataset_identity,
    model_fingerprint,
    model_identity,
    portable_model_name,
    stable_repr,
)
from ..core.positions import POOLED_HOOKS, POSITION_NAMES, PositionName, position_index, select_positions  # noqa: F401 (re-exported)
from ..core.requests import describe_differences, request_differences
from ..data.base import ImageDataset
from ..sae.splice import HookedCLIP

Positions = PositionName  # the names a store takes (no index lists)
POSITIONS = POSITION_NAMES
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# 2: the request records `precision` (the backbone's autocast dtype; a version-1 cache was computed in fp32).
# A reader refuses a cache of a newer version than its own, naming the field (`check_format_version`).
FORMAT_VERSION = 2
FORMAT_FIELDS = {2: "precision"}
METADATA_FILE = "metadata.json"
SHARD_PATTERN = "shard_{:05d}.safetensors"
SHARD_NAME_RE = re.compile(r"^shard_\d{5}\.safetensors$")  # our shard names, nothing else
ARRAY_FILES = ("labels.npy", "image_index.npy")
DEFAULT_SHARD_SIZE = 8192
STATS_BLOCK_ROWS = 1024
HEAD_HOOKS = POOLED_HOOKS  # [B, D]: the pooled token only

# Fields of the request that must agree for a cache to be reused or resumed.
IDENTITY_FIELDS = (
    "model_name", "pretrained", "act_fn", "model_fingerprint", "model_config", "preprocess", "hook_names", "d_in",
    "positions", "rows_per_image", "dtype", "precision", "dataset", "split", "n_images", "dataset_fingerprint",
    "shard_size",
)
# What an older cache's request, written before a field existed, meant by its absence.
FIELD_DEFAULTS = {"precision": "fp32"}


class CacheError(UsageError):
    """A cache folder that cannot be used as asked (mismatch, corruption, bad values)."""


class CacheMismatchError(CacheError, ConflictError):
    pass


class CorruptCacheError(CacheError, InputError):
    pass


class NonFiniteActivationsError(CacheError):
    pass


# ---------------------------------------------------------------------------------- small helpers
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def rows_per_image(model: HookedCLIP, positions: str) -> int:
    n_prefix = getattr(model.cfg, "n_prefix_tokens", 1)
    return {"cls": 1, "patches": model.cfg.n_tokens - n_prefix, "all": model.cfg.n_tokens}[positions]


def normalise_hooks(model: HookedCLIP, hook_names: str | Sequence[str], positions: str) -> list[str]:
    names = [hook_names] if isinstance(hook_names, str) else list(dict.fromkeys(hook_names))
    if not names:
        raise UsageError("no hook names given")
    if positions not in POSITIONS:
        raise UsageError(f"positions must be one of {POSITIONS}, got {positions!r}")
    for name in names:
        model.check_hook_name(name)
        if name in HEAD_HOOKS:
            if positions != "cls":
                raise UsageError(f"hook {name!r} holds only the pooled vector; use positions='cls'")
        else:
            position_index(model.cfg, positions, name)  # e.g. `cls` on a model without a CLS token: refused
    return names


def cache_request(model: HookedCLIP, dataset: ImageDataset, hooks: list[str], positions: str, dtype: str,
             shard_size: int) -> dict[str, Any]:
    transform = getattr(dataset, "transform", None)
    preprocess = stable_repr(transform if transform is not None else model.preprocess)
    if transform is not None and preprocess != stable_repr(model.preprocess):
        warnings.warn("the data set's transform differs from model.preprocess; caching with the data set's", stacklevel=3)
    data_id = dataset_identity(dataset)
    return {
        **model_identity(model),  # model_name, pretrained, model_kwargs, model_config (identity.py)
        "model_fingerprint": model_fingerprint(model),
        "preprocess": preprocess,
        "hook_names": hooks,
        "d_in": {h: model.hook_width(h) for h in hooks},
        "positions": positions,
        "rows_per_image": rows_per_image(model, positions),
        "dtype": dtype,
        "precision": getattr(model, "precision", "fp32"),  # the backbone's autocast dtype (--precision)
        "dataset": data_id["dataset"],
        "dataset_path": data_id["dataset_path"],
        "split": data_id["split"],
        "data_dir": data_id.get("data_dir"),  # local path: kept in this local file only, never published
        "n_images": len(dataset),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "n_classes": class_count(dataset),  # labels lie in [0, n_classes): what PASS sizes its prototypes by
        # The label ids' meaning, in order: a pool or reference cache is checked against the evaluation's.
        "classnames": _classnames(dataset),
        "shard_size": shard_size,
        # A union of data sets (union.py) records its members; a single data set's request is unchanged.
        **({"members": dataset.member_records(),
            "member_data_dirs": [None if m.data_dir is None else str(m.data_dir) for m in dataset.members]}
           if callable(getattr(dataset, "member_records", None)) else {}),
    }


def class_count(dataset: ImageDataset) -> int | None:
    """The data set's number of classes; None for a union (one label space per member) or unnamed classes."""
    if callable(getattr(dataset, "member_records", None)):
        return None
    names = getattr(dataset, "classnames", None)
    return len(names) if names else None


def _classnames(dataset: ImageDataset) -> list[str] | None:
    """The data set's class names in label order; None for a union (each member has its own)."""
    if callable(getattr(dataset, "member_records", None)):
        return None
    return [str(c) for c in getattr(dataset, "classnames", None) or []] or None


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    # `local-dir:` caches made before model names were recorded portable (the folder's name only); fields an
    # older cache's request lacks mean their default (`FIELD_DEFAULTS`)
    found, wanted = ({**FIELD_DEFAULTS, **d, "model_name": portable_model_name(d.get("model_name"))}
                     for d in (found, wanted))
    return describe_differences(request_differences(found, wanted, IDENTITY_FIELDS), "cache", max_len=200)


def check_format_version(meta: dict[str, Any], where: Path) -> None:
    """Refuse a cache written by a newer version of the format than this reader's, naming what it added."""
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        added = [f"{FORMAT_FIELDS.get(v, '?')} (version {v})" for v in range(FORMAT_VERSION + 1, version + 1)] \
            if isinstance(version, int) else []
        raise CorruptCacheError(
            f"{where} has format_version {version!r}, newer than this reader's {FORMAT_VERSION}"
            + (f" (it adds the field(s) {', '.join(added)})" if added else "")
            + "; upgrade sae-lens-vision-steer to read it")


def read_metadata(path: Path) -> dict[str, Any]:
    """`metadata.json` as a dict, or a clear `CorruptCacheError`."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptCacheError(f"{path} is not valid JSON ({e}); use --overwrite to start the cache again") from None
    except UnicodeDecodeError:
        raise CorruptCacheError(f"{path} is not a text file; use --overwrite to start the cache again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards", []), list):
        raise CorruptCacheError(f"{path} is not an activation-cache metadata file (expected a JSON object with "
                                "'shards'); use --overwrite to start the cache again")
    check_format_version(meta, path)
    return meta


def file_problem(root: Path, rec: dict[str, Any], check_sha: bool = True) -> str | None:
    """Why a recorded file is not intact (missing, wrong size, wrong sha256), or None."""
    path = root / rec["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != rec["nbytes"]:
        return f"{path} is truncated or damaged ({size} bytes, expected {rec['nbytes']})"
    if check_sha and sha256_bytes(path.read_bytes()) != rec["sha256"]:
        return f"{path} is corrupt (its sha256 does not match the one in {METADATA_FILE})"
    return None
