"""Writing an activation cache: one early-stopping forward pass, fixed-size checksummed shards,
resume at the first unwritten shard, and repair of damaged shards in a complete cache."""

from __future__ import annotations

import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import ImageDataset, collate_images
from ..fileio import exclusive_writer, remove_temp_files, write_bytes_atomic, write_json_atomic
from ..hooked_clip import HookedCLIP
from .format import (
    ARRAY_FILES,
    CACHE_DTYPES,
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    METADATA_FILE,
    SHARD_NAME_RE,
    SHARD_PATTERN,
    STATS_BLOCK_ROWS,
    CacheError,
    CacheMismatchError,
    CorruptCacheError,
    NonFiniteActivationsError,
    Positions,
    _normalise_hooks,
    _npy_bytes,
    _request,
    _sha256_bytes,
    describe_mismatch,
    file_problem,
    read_metadata,
    select_positions,
)
from .reader import ActivationCache


@dataclass
@dataclass
class _ShardBuffer:
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


def _shard_tensors(buf: _ShardBuffer) -> dict[str, torch.Tensor]:
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


def _valid_shard_prefix(root: Path, records: list[dict[str, Any]]) -> int:
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


def _remove_cache_files(root: Path) -> None:
    """Delete what a cache run writes: our shard names, metadata, arrays, progress and temp files (nothing else)."""
    for p in root.iterdir():
        if SHARD_NAME_RE.match(p.name) or PROGRESS_RE.match(p.name) or p.name in (METADATA_FILE, *ARRAY_FILES):
            p.unlink()
    remove_temp_files(root)


def initial_metadata(request: dict[str, Any], batch_size: int, previous: dict[str, Any] | None,
                     shards: list[dict[str, Any]]) -> dict[str, Any]:
    """`metadata.json` of an incomplete cache (one process or many ranks write the same fields in the same
    order): the request, the fields read most, and the batch size the run began with."""
    import sae_lens_vision_steer

    return {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "request": request,
        **{k: request[k] for k in ("model_name", "pretrained", "hook_names", "d_in", "positions", "dtype",
                                   "dataset", "split", "n_images")},
        "package_version": sae_lens_vision_steer.__version__,
        "batch_size": batch_size if not previous else previous.get("batch_size", batch_size),
        "shards": shards,
    }


def cache_activations(
    model: HookedCLIP,
    dataset: ImageDataset,
    hook_names: str | Sequence[str],
    out_dir: str | Path,
    positions: Positions = "cls",
    dtype: str = "float16",
    batch_size: int = 256,
    num_workers: int = 2,
    shard_size: int = DEFAULT_SHARD_SIZE,
    show_progress: bool = True,
    overwrite: bool = False,
    repair: bool = False,
) -> ActivationCache:
    """Run `dataset` through `model` once and store the activations at `hook_names` in `out_dir`.

    All hooks come from one forward pass that stops after the deepest block needed (head hooks
    `hook_ln_post`/`hook_image_embed` need the full pass). An existing complete cache made with the same
    request is verified (sha256 of every file) and returned; a damaged one is refused, or with
    `repair=True` only its damaged shards are recomputed. An incomplete cache is resumed; one made
    differently is refused (naming what differs) unless `overwrite=True`. Memory stays bounded: one
    shard per hook plus one batch.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {list(CACHE_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be positive")
    hooks = _normalise_hooks(model, hook_names, positions)
    if len(dataset) == 0:
        raise ValueError("the data set is empty: nothing to cache")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache folder {root} is a file; give a folder")
    root.mkdir(parents=True, exist_ok=True)
    request = _request(model, dataset, hooks, positions, dtype, shard_size)
    from .. import distributed
    from .sharded import run_sharded

    if distributed.active() and getattr(dataset, "skip_bad_images", False):
        raise ValueError("--skip-bad-images is not supported by distributed caching (skipped images shift every "
                         "later row, so the ranks cannot know where their shards start); cache with one process, "
                         "or remove the unreadable images")
    with ExitStack() as lock:
        # Rank 0 holds the folder's lock until every rank is done: a second launch is refused meanwhile
        # (a ConflictError: exit code 4, "another process is writing it").
        distributed.on_main(lambda: lock.enter_context(exclusive_writer(root, "cache", CacheMismatchError)))
        writer = _Writer(model, dataset, hooks, request, root, batch_size, num_workers, show_progress)
        if distributed.active() or (progress_files(root) and not getattr(dataset, "skip_bad_images", False)):
            return run_sharded(writer, overwrite, repair)  # shard by shard from a plan: any number of ranks
        return writer.run(overwrite, repair)


class _Writer:
    def __init__(self, model, dataset, hooks, request, root, batch_size, num_workers, show_progress):
        self.model, self.dataset, self.hooks, self.request, self.root = model, dataset, hooks, request, root
        self.batch_size, self.num_workers, self.show_progress = batch_size, num_workers, show_progress
        self.meta_path = root / METADATA_FILE

    def run(self, overwrite: bool, repair: bool) -> ActivationCache:
        root, request = self.root, self.request
        if overwrite:
            _remove_cache_files(root)
        remove_temp_files(root)  # a crashed write's leftovers; never a recorded shard
        meta: dict[str, Any] | None = None
        if self.meta_path.is_file():
            meta = read_metadata(self.meta_path)
            diffs = describe_mismatch(meta.get("request", {}), request)
            if diffs:
                raise CacheMismatchError(
                    f"{root} holds a cache made differently from this request ({'; '.join(diffs)}). "
                    "Use another folder, or overwrite=True (--overwrite) to replace it."
                )
            if meta.get("complete"):
                return self._reuse(meta, repair)
            if meta.get("batch_size") != self.batch_size:
                warnings.warn(f"resuming with batch_size={self.batch_size}, the run began with {meta.get('batch_size')}: "
                              "activations may differ from an uninterrupted run in the last bit", stacklevel=3)
        elif any(SHARD_NAME_RE.match(p.name) for p in root.iterdir()):
            raise CacheError(f"{root} has shard files but no {METADATA_FILE}; use overwrite=True (--overwrite) "
                             "to start again")

        records: list[dict[str, Any]] = list(meta["shards"]) if meta else []
        # Shards after the first damaged one are redone; each rewrite replaces its file atomically, so
        # nothing is deleted here (a stray file that merely looks like a shard is never touched).
        records = records[:_valid_shard_prefix(root, records)]
        meta = initial_metadata(request, self.batch_size, meta, records)
        write_json_atomic(self.meta_path, meta)
        self.meta = meta

        def append(rec: dict[str, Any]) -> bool:
            records.append(rec)
            meta["shards"] = records
            write_json_atomic(self.meta_path, meta)
            return True  # keep going

        start_image, skip_rows = self._start_after(records, len(records))
        if start_image < len(self.dataset):
            self._forward(len(records), sum(r["n_rows"] for r in records), start_image, skip_rows, append)
        return _finalise(root, meta)

    def _reuse(self, meta: dict[str, Any], repair: bool) -> ActivationCache:
        bad, problems = damaged_files(self.root, meta)
        if not problems:
            return ActivationCache.open(self.root)
        if not repair:
            raise CorruptCacheError(f"the complete cache in {self.root} is damaged: {'; '.join(problems)}. Run again "
                                    "with repair=True (--repair) to recompute only the damaged shards, or "
                                    "--overwrite to start again")
        self.meta = meta
        records = meta["shards"]
        for i in bad:
            start_image, skip_rows = self._start_after(records, i)
            target = records[i]

            def replace(rec: dict[str, Any], i: int = i, target: dict[str, Any] = target) -> bool:
                if rec["n_rows"] != target["n_rows"] or rec["first_row"] != target["first_row"]:
                    raise CacheError(f"repairing shard {i} gave {rec['n_rows']} rows, expected {target['n_rows']} "
                                     "(the data changed?); use --overwrite to start again")
                if rec["sha256"] != target["sha256"]:
                    warnings.warn(f"repaired shard {i} differs from the recorded one in its bytes "
                                  "(another machine or torch build?); statistics are recomputed", stacklevel=2)
                records[i] = rec
                write_json_atomic(self.meta_path, meta)
                return False  # one shard only

            self._forward(i, target["first_row"], start_image, skip_rows, replace, stop_rows=target["n_rows"])
        return _finalise(self.root, meta)

    def _start_after(self, records: list[dict[str, Any]], n_done: int) -> tuple[int, int]:
        """`(first image, rows of it already stored)` to continue after the first `n_done` shards."""
        if n_done == 0:
            return 0, 0
        P = self.request["rows_per_image"]
        prev = records[n_done - 1]
        problem = file_problem(self.root, prev)
        if problem:
            raise CorruptCacheError(f"{problem}: cannot find where shard {n_done} starts; use --overwrite")
        with safetensors.safe_open(self.root / prev["file"], "pt") as f:
            last_image = int(f.get_slice("image_index")[-1:][0])
        rows_done = prev["first_row"] + prev["n_rows"]
        # Every kept image contributes exactly P consecutive rows.
        skip_rows = rows_done % P
        return (last_image if skip_rows else last_image + 1), skip_rows

    def _forward(self, shard_idx: int, rows_done: int, start_image: int, skip_rows: int,
                 on_shard: Callable[[dict[str, Any]], bool], stop_rows: int | None = None,
                 stop_image: int | None = None) -> None:
        """Feed images from `start_image` on (up to `stop_image`, exclusive) and hand each finished shard to
        `on_shard` (False: stop). Whole grid batches go through the model, also the images before
        `start_image` in the first one, so that every batch is the one an uninterrupted run feeds it
        (the bytes can depend on the batch's composition: matmul blocking)."""
        model, dataset, hooks, request = self.model, self.dataset, self.hooks, self.request
        batch_size, positions = self.batch_size, request["positions"]
        n_prefix = getattr(model.cfg, "n_prefix_tokens", 1)
        shard_size = request["shard_size"] if stop_rows is None else stop_rows
        n_total = len(dataset)
        n_images = n_total if stop_image is None else stop_image
        torch_dtype = CACHE_DTYPES[request["dtype"]]
        layers = [model.hook_layer(h) for h in hooks]
        # TransformerLens semantics: stop_at_layer=n runs blocks 0..n-1. Head hooks need the whole tower.
        stop_at = None if max(layers) >= model.cfg.n_layers else max(layers) + 1
        P = request["rows_per_image"]

        # A fixed grid of batches over image indices, so that resuming does not change batch composition.
        first_batch = start_image // batch_size
        # (a batch reaching past `stop_image` is still fed whole; rows past the last shard are not kept)
        grid = [list(range(b * batch_size, min((b + 1) * batch_size, n_total)))
                for b in range(first_batch, (n_images + batch_size - 1) // batch_size)]
        loader = DataLoader(dataset, batch_sampler=grid, num_workers=self.num_workers, collate_fn=collate_images,
                            prefetch_factor=4 if self.num_workers > 0 else None)
        buf = _ShardBuffer(hooks, request["d_in"], shard_size, torch_dtype)
        pbar = tqdm(total=n_images, initial=grid[0][0] if grid else n_images, desc="Caching activations", unit="img",
                    disable=not self.show_progress)
        model.eval()
        try:
            for batch in loader:
                keep = batch.indices >= start_image
                pbar.update(len(batch.indices) + batch.n_skipped)
                if not keep.any():
                    continue
                labels, indices = batch.labels[keep], batch.indices[keep]
                with torch.inference_mode():
                    _, act_cache = model.run_with_cache(batch.images.to(model.device), names_filter=hooks,
                                                        stop_at_layer=stop_at)
                    acts = {h: select_positions(act_cache[h][keep.to(model.device)], positions,
                                                n_prefix).to("cpu", torch_dtype) for h in hooks}
                del act_cache
                row_labels = labels.numpy().repeat(P)
                row_images = indices.numpy().repeat(P)
                start = 0
                if skip_rows and indices[0].item() == start_image:
                    start, skip_rows = skip_rows, 0  # the part of this image the last complete shard already holds
                while start < len(row_labels):
                    start += buf.add(acts, row_labels, row_images, start)
                    if buf.n == shard_size:
                        more = on_shard(_write_shard(self.root, self.meta, buf, shard_idx, rows_done))
                        rows_done += buf.n
                        shard_idx += 1
                        buf.n = 0
                        if not more:
                            return
            if buf.n:
                on_shard(_write_shard(self.root, self.meta, buf, shard_idx, rows_done))
        finally:
            pbar.close()


def _write_shard(root: Path, meta: dict[str, Any], buf: _ShardBuffer, shard_idx: int,
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
    data = safetensors.torch.save(_shard_tensors(buf))
    name = SHARD_PATTERN.format(shard_idx)
    write_bytes_atomic(root / name, data)
    return {"file": name, "first_row": first_row, "n_rows": buf.n, "nbytes": len(data), "sha256": _sha256_bytes(data)}


def _finalise(root: Path, meta: dict[str, Any]) -> ActivationCache:
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
        data = _npy_bytes(np.concatenate(arrays).astype(np.int64))
        write_bytes_atomic(root / f"{name}.npy", data)
        extra[name] = {"file": f"{name}.npy", "nbytes": len(data), "sha256": _sha256_bytes(data)}
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
    return ActivationCache.open(root)
