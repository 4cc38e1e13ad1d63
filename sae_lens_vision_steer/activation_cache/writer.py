"""Writing an activation cache: one early-stopping forward pass, fixed-size checksummed shards,
resume at the first unwritten shard, and repair of damaged shards in a complete cache."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import safetensors
import safetensors.torch
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.errors import UsageError
from ..core.fileio import remove_temp_files, write_json_atomic
from ..data.base import ImageDataset, collate_images
from ..sae.splice import HookedCLIP
from .format import (
    CACHE_DTYPES,
    DEFAULT_SHARD_SIZE,
    METADATA_FILE,
    SHARD_NAME_RE,
    CacheError,
    CacheMismatchError,
    CorruptCacheError,
    Positions,
    cache_request,
    describe_mismatch,
    file_problem,
    normalise_hooks,
    read_metadata,
    select_positions,
)
from .reader import ActivationStore
from .shards import (
    ShardBuffer,
    damaged_files,
    finalise,
    initial_metadata,
    progress_files,
    remove_cache_files,
    valid_shard_prefix,
    write_shard,
)


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
) -> ActivationStore:
    """Run `dataset` through `model` once and store the activations at `hook_names` in `out_dir`.

    All hooks come from one forward pass that stops after the deepest block needed (head hooks
    `hook_ln_post`/`hook_image_embed` need the full pass). An existing complete cache made with the same
    request is verified (sha256 of every file) and returned; a damaged one is refused, or with
    `repair=True` only its damaged shards are recomputed. An incomplete cache is resumed; one made
    differently is refused (naming what differs) unless `overwrite=True`. Memory stays bounded: one
    shard per hook plus one batch.
    """
    if dtype not in CACHE_DTYPES:
        raise UsageError(f"dtype must be one of {list(CACHE_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise UsageError("shard_size and batch_size must be positive")
    hooks = normalise_hooks(model, hook_names, positions)
    if len(dataset) == 0:
        raise UsageError("the data set is empty: nothing to cache")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache folder {root} is a file; give a folder")
    request = cache_request(model, dataset, hooks, positions, dtype, shard_size)
    from ..core import distributed
    from .sharded import run_sharded

    if distributed.active() and getattr(dataset, "skip_bad_images", False):
        raise UsageError("--skip-bad-images is not supported by distributed caching (skipped images shift every "
                         "later row, so the ranks cannot know where their shards start); cache with one process, "
                         "or remove the unreadable images")
    # Every rank names the same folder, rank 0 creates it and holds its lock until every rank is done (a
    # second launch is refused meanwhile: a ConflictError, exit code 4, "another process is writing it"),
    # and every rank sees that lock, before any rank reads the folder's metadata or writes a shard.
    with distributed.exclusive_folder(root, "cache", CacheMismatchError):
        writer = _Writer(model, dataset, hooks, request, root, batch_size, num_workers, show_progress)
        if distributed.active() or (progress_files(root) and not getattr(dataset, "skip_bad_images", False)):
            store = run_sharded(writer, overwrite, repair)  # shard by shard from a plan: any number of ranks
        else:
            store = writer.run(overwrite, repair)
        store.rows_written = writer.rows_written
        return store


class _Writer:
    def __init__(self, model, dataset, hooks, request, root, batch_size, num_workers, show_progress):
        self.model, self.dataset, self.hooks, self.request, self.root = model, dataset, hooks, request, root
        self.batch_size, self.num_workers, self.show_progress = batch_size, num_workers, show_progress
        self.meta_path = root / METADATA_FILE
        self.rows_written = 0  # rows this call wrote into shards (all ranks together once run_sharded is done)

    def run(self, overwrite: bool, repair: bool) -> ActivationStore:
        root, request = self.root, self.request
        if overwrite:
            remove_cache_files(root)
        remove_temp_files(root)  # a crashed write's leftovers; never a recorded shard
        meta: dict[str, Any] | None = None
        if self.meta_path.is_file():
            meta = read_metadata(self.meta_path)
            diffs = describe_mismatch(meta.get("request", {}), request)
            if diffs:
                raise CacheMismatchError(
                    f"{root} holds a cache made differently from this request ({'; '.join(diffs)}). "
                    "Use another folder, or overwrite=True to replace it.", arguments=("overwrite",)
                )
            if meta.get("complete"):
                return self.reuse(meta, repair)
            if meta.get("batch_size") != self.batch_size:
                warnings.warn(f"resuming with batch_size={self.batch_size}, the run began with {meta.get('batch_size')}: "
                              "activations may differ from an uninterrupted run in the last bit", stacklevel=3)
        elif any(SHARD_NAME_RE.match(p.name) for p in root.iterdir()):
            raise CacheError(f"{root} has shard files but no {METADATA_FILE}; use overwrite=True to start again",
                             arguments=("overwrite",))

        records: list[dict[str, Any]] = list(meta["shards"]) if meta else []
        # Shards after the first damaged one are redone; each rewrite replaces its file atomically, so
        # nothing is deleted here (a stray file that merely looks like a shard is never touched).
        records = records[:valid_shard_prefix(root, records)]
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
            self.forward_range(len(records), sum(r["n_rows"] for r in records), start_image, skip_rows, append)
        return finalise(root, meta)

    def reuse(self, meta: dict[str, Any], repair: bool) -> ActivationStore:
        bad, problems = damaged_files(self.root, meta)
        if not problems:
            return ActivationStore.open(self.root)
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

            self.forward_range(i, target["first_row"], start_image, skip_rows, replace, stop_rows=target["n_rows"])
        return finalise(self.root, meta)

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

    def _write(self, buf: ShardBuffer, shard_idx: int, first_row: int) -> dict[str, Any]:
        rec = write_shard(self.root, self.meta, buf, shard_idx, first_row)
        self.rows_written += rec["n_rows"]
        return rec

    def forward_range(self, shard_idx: int, rows_done: int, start_image: int, skip_rows: int,
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
        on_cuda = model.device.type == "cuda"  # page-locked batches, copied without blocking
        loader = DataLoader(dataset, batch_sampler=grid, num_workers=self.num_workers, collate_fn=collate_images,
                            prefetch_factor=4 if self.num_workers > 0 else None, pin_memory=on_cuda)
        buf = ShardBuffer(hooks, request["d_in"], shard_size, torch_dtype)
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
                    _, act_cache = model.run_with_cache(batch.images.to(model.device, non_blocking=on_cuda), names_filter=hooks,
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
                        more = on_shard(self._write(buf, shard_idx, rows_done))
                        rows_done += buf.n
                        shard_idx += 1
                        buf.n = 0
                        if not more:
                            return
            if buf.n:
                on_shard(self._write(buf, shard_idx, rows_done))
        finally:
            pbar.close()
