"""The shards of an activation store on disk: the row buffer, writing one checksummed shard, finding damaged
ones, the per-rank progress records of a distributed run, and finalising a complete store (statistics,
label arrays). Used by the one writer (`writer.py`) in both of its schedules."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .._version import __version__
from ..core.fileio import remove_temp_files, write_bytes_atomic, write_json_atomic
from .format import (
    ARRAY_FILES,
    FORMAT_VERSION,
    METADATA_FILE,
    SHARD_NAME_RE,
    SHARD_PATTERN,
    STATS_BLOCK_ROWS,
    CacheError,
    NonFiniteActivationsError,
    file_problem,
    npy_bytes,
    sha256_bytes,
)
from .reader import ActivationStore


@dataclass
class ShardBuffer:
    """Preallocated rows for one shard (bounded memory: one shard per hook at a time)."""

    hooks: list[str]
    d_in: dict[str, int]
    size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.acts = {h: torch.empty(self.size, self.d_in[h], dtype=self.dtype) for h in self.hooks}
        self.labels = np.empty(self.size, dtype=np.int64)
        self.image_index = np.empty(self.size, dtype=np.int64)
        self.n = 0

    def add(self, acts: dict[str, torch.Tensor], labels: np.ndarray, image_index: np.ndarray, start: int) -> int:
        """Copy rows `start ..` of the given batch into the free space; return how many were taken."""
        take = min(self.size - self.n, len(labels) - start)
        for h in self.hooks:
            self.acts[h][self.n:self.n + take] = acts[h][start:start + take]
        self.labels[self.n:self.n + take] = labels[start:start + take]
        self.image_index[self.n:self.n + take] = image_index[start:start + take]
        self.n += take
        return take


def shard_tensors(buf: ShardBuffer) -> dict[str, torch.Tensor]:
    n = buf.n
    tensors: dict[str, torch.Tensor] = {
        "labels": torch.from_numpy(buf.labels[:n].copy()),
        "image_index": torch.from_numpy(buf.image_index[:n].copy()),
    }
    for h in buf.hooks:
        acts = buf.acts[h][:n].contiguous()
        tensors[f"acts/{h}"] = acts
        total = np.zeros(acts.shape[1], dtype=np.float64)
        sum_norm = sum_sq_norm = max_abs = 0.0
        # float64 numpy reductions over fixed row blocks (the same bits whatever torch's thread count),
        # a block at a time so that the float64 copy stays small.
        for block in acts.split(STATS_BLOCK_ROWS):
            x = block.double().numpy()
            sq_norm = np.einsum("ij,ij->i", x, x)
            total += x.sum(axis=0)
            sum_norm += float(np.sqrt(sq_norm).sum())
            sum_sq_norm += float(sq_norm.sum())
            max_abs = max(max_abs, float(np.abs(x).max(initial=0.0)))
        tensors[f"stats/{h}/sum"] = torch.from_numpy(total)
        for key, value in (("sum_norm", sum_norm), ("sum_sq_norm", sum_sq_norm), ("max_abs", max_abs)):
            tensors[f"stats/{h}/{key}"] = torch.tensor([value], dtype=torch.float64)
    return tensors


def valid_shard_prefix(root: Path, records: list[dict[str, Any]]) -> int:
    """How many of the recorded shards are present and intact (checked by size and sha256)."""
    for i, rec in enumerate(records):
        problem = file_problem(root, rec)
        if problem:
            warnings.warn(f"{problem}; re-caching from shard {i}", stacklevel=4)
            return i
    return len(records)


def damaged_files(root: Path, meta: dict[str, Any]) -> tuple[list[int], list[str]]:
    """`(bad shard indices, problems)` of a complete cache: every shard and array file checked by sha256."""
    bad, problems = [], []
    for i, rec in enumerate(meta["shards"]):
        problem = file_problem(root, rec)
        if problem:
            bad.append(i)
            problems.append(problem)
    for rec in (meta.get("arrays") or {}).values():
        problem = file_problem(root, rec)
        if problem:
            problems.append(problem)
    return bad, problems


# Per-rank records of the shards a distributed run wrote (activation_cache/sharded.py); gone once complete.
PROGRESS_PATTERN = "progress_rank{:05d}.json"
PROGRESS_RE = re.compile(r"^progress_rank\d{5}\.json$")


def progress_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if PROGRESS_RE.match(p.name))


def remove_cache_files(root: Path) -> None:
    """Delete what a cache run writes: our shard names, metadata, arrays, progress and temp files (nothing else)."""
    for p in root.iterdir():
        if SHARD_NAME_RE.match(p.name) or PROGRESS_RE.match(p.name) or p.name in (METADATA_FILE, *ARRAY_FILES):
            p.unlink()
    remove_temp_files(root)


def initial_metadata(request: dict[str, Any], batch_size: int, previous: dict[str, Any] | None,
                     shards: list[dict[str, Any]]) -> dict[str, Any]:
    """`metadata.json` of an incomplete cache (one process or many ranks write the same fields in the same
    order): the request, the fields read most, and the batch size the run began with."""
    return {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "request": request,
        **{k: request[k] for k in ("model_name", "pretrained", "hook_names", "d_in", "positions", "dtype",
                                   "dataset", "split", "n_images")},
        "package_version": __version__,
        "batch_size": batch_size if not previous else previous.get("batch_size", batch_size),
        "shards": shards,
    }


def write_shard(root: Path, meta: dict[str, Any], buf: ShardBuffer, shard_idx: int,
                 first_row: int) -> dict[str, Any]:
    for h in buf.hooks:
        finite = torch.isfinite(buf.acts[h][:buf.n]).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise NonFiniteActivationsError(
                f"non-finite activations at hook {h!r} in shard {shard_idx} ({SHARD_PATTERN.format(shard_idx)}; "
                f"rows {first_row}..{first_row + buf.n - 1}, first bad row {first_row + bad} = image "
                f"{int(buf.image_index[bad])}). With dtype {meta['dtype']!r} this is often an overflow: "
                "try dtype='float32'. Nothing of this shard was written."
            )
    data = safetensors.torch.save(shard_tensors(buf))
    name = SHARD_PATTERN.format(shard_idx)
    write_bytes_atomic(root / name, data)
    return {"file": name, "first_row": first_row, "n_rows": buf.n, "nbytes": len(data), "sha256": sha256_bytes(data)}


def finalise(root: Path, meta: dict[str, Any]) -> ActivationStore:
    records = meta["shards"]
    if not records:
        raise CacheError(f"no activations were cached in {root} (every image unreadable?)")
    hooks = meta["hook_names"]
    sums = {h: {k: None for k in ("sum", "sum_norm", "sum_sq_norm", "max_abs")} for h in hooks}
    labels, image_index = [], []
    for rec in records:  # fixed order: identical float64 totals however the run was interrupted
        with safetensors.safe_open(root / rec["file"], "np") as f:
            labels.append(f.get_tensor("labels"))
            image_index.append(f.get_tensor("image_index"))
            for h in hooks:
                for k, acc in sums[h].items():
                    v = f.get_tensor(f"stats/{h}/{k}")
                    sums[h][k] = v if acc is None else (np.maximum(acc, v) if k == "max_abs" else acc + v)
    n_rows = sum(r["n_rows"] for r in records)
    stats = {}
    for h in hooks:
        mean = sums[h]["sum"] / n_rows
        mean_sq_norm = float(sums[h]["sum_sq_norm"][0] / n_rows)
        mean_norm = float(sums[h]["sum_norm"][0] / n_rows)
        stats[h] = {
            "mean": mean.tolist(),
            "mean_norm": mean_norm,
            "mean_sq_norm": mean_sq_norm,
            "norm_std": float(np.sqrt(max(mean_sq_norm - mean_norm**2, 0.0))),
            # E||x - mu||^2: the squared error of the mean-only reconstruction (FVU denominator).
            "mean_sq_dist_to_mean": float(max(mean_sq_norm - float(mean @ mean), 0.0)),
            "max_abs": float(sums[h]["max_abs"][0]),
        }
    extra = {}
    for name, arrays in (("labels", labels), ("image_index", image_index)):
        data = npy_bytes(np.concatenate(arrays).astype(np.int64))
        write_bytes_atomic(root / f"{name}.npy", data)
        extra[name] = {"file": f"{name}.npy", "nbytes": len(data), "sha256": sha256_bytes(data)}
    all_images = np.concatenate(image_index)
    meta.update({
        "complete": True,
        "n_rows": n_rows,
        "n_images_cached": int(len(np.unique(all_images))),
        "n_images_skipped": int(meta["n_images"] - len(np.unique(all_images))),
        "stats": stats,
        "arrays": extra,
    })
    write_json_atomic(root / METADATA_FILE, meta)
    for p in progress_files(root):  # their shards are all in metadata.json now
        p.unlink()
    return ActivationStore.open(root)
