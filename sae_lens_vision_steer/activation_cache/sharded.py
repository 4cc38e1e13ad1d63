"""Writing a cache from a plan known before any image is read, with any number of ranks (torchrun).

Shard `k` holds global rows `[k S, (k + 1) S)` (`S` = shard_size; image `i` gives rows
`[i P, (i + 1) P)`, so a shard may start mid-image). Rank 0 takes the folder's lock, checks the request
and finds the shards already written (recorded in `metadata.json` or in any rank's progress file, from a
run with any world size, each checked by size and sha256); the missing ones are cut into one contiguous
run per rank. Each rank feeds whole batches of the same fixed grid `[0, B), [B, 2B), ...` as one process
does (a batch at a run's edge is computed by both neighbours), writes its shard files atomically and
records each in its own `progress_rankNNNNN.json`. Rank 0 then finalises exactly as one process does
(statistics from the per-shard float64 sums in shard order), so the cache is the single-process cache,
byte for byte. A rank that dies leaves only complete, recorded shards; a rerun resumes, redistributing
what is missing over the ranks it has.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from ..core import distributed
from ..core.fileio import remove_temp_files, write_json_atomic
from .format import (
    METADATA_FILE,
    SHARD_NAME_RE,
    SHARD_PATTERN,
    CacheError,
    CacheMismatchError,
    describe_mismatch,
    file_problem,
    read_metadata,
)
from .reader import ActivationStore
from .shards import (
    PROGRESS_PATTERN,
    finalise,
    initial_metadata,
    progress_files,
    remove_cache_files,
)


def shard_plan(request: dict[str, Any]) -> list[tuple[int, int]]:
    """`(first_row, n_rows)` of every shard of the complete cache."""
    total, size = request["n_images"] * request["rows_per_image"], request["shard_size"]
    return [(first, min(size, total - first)) for first in range(0, total, size)]


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs `(first, last)` of sorted shard indices."""
    runs: list[tuple[int, int]] = []
    for k in indices:
        if runs and runs[-1][1] == k - 1:
            runs[-1] = (runs[-1][0], k)
        else:
            runs.append((k, k))
    return runs


def _recorded(root: Path, meta: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    """Shard records from metadata.json and every progress file, keyed by shard index."""
    found: dict[int, dict[str, Any]] = {}
    size = meta["request"]["shard_size"] if meta else 1
    for rec in (meta or {}).get("shards", []):
        found[rec["first_row"] // size] = rec
    for path in progress_files(root):
        try:
            recs = json.loads(path.read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            warnings.warn(f"{path} is unreadable; the shards it recorded are cached again", stacklevel=4)
            continue
        for rec in recs:
            found[rec["first_row"] // size] = rec
    return found


def _setup(writer: Any, overwrite: bool, repair: bool) -> tuple[dict[str, Any], list[int]] | None:
    """Rank 0: check the folder, find the intact shards, write the metadata. None: the cache is complete."""
    root, request = writer.root, writer.request
    if overwrite:
        remove_cache_files(root)
    remove_temp_files(root)
    meta: dict[str, Any] | None = None
    if writer.meta_path.is_file():
        meta = read_metadata(writer.meta_path)
        diffs = describe_mismatch(meta.get("request", {}), request)
        if diffs:
            raise CacheMismatchError(f"{root} holds a cache made differently from this request ({'; '.join(diffs)}). "
                                     "Use another folder, or overwrite=True to replace it.", arguments=("overwrite",))
        if meta.get("complete"):
            writer.reuse(meta, repair)
            for p in progress_files(root):
                p.unlink()
            return None
        if meta.get("batch_size") != writer.batch_size:
            warnings.warn(f"resuming with batch_size={writer.batch_size}, the run began with {meta.get('batch_size')}: "
                          "activations may differ from an uninterrupted run in the last bit", stacklevel=4)
    elif any(SHARD_NAME_RE.match(p.name) for p in root.iterdir()) or progress_files(root):
        raise CacheError(f"{root} has shard or progress files but no {METADATA_FILE}; use overwrite=True "
                         "to start again", arguments=("overwrite",))
    plan = shard_plan(request)
    done: dict[int, dict[str, Any]] = {}
    for k, rec in sorted(_recorded(root, meta).items()):
        if k >= len(plan) or (rec.get("first_row"), rec.get("n_rows")) != plan[k] \
                or rec.get("file") != SHARD_PATTERN.format(k):
            warnings.warn(f"the record of shard {k} does not fit this cache's plan; caching it again", stacklevel=4)
            continue
        problem = file_problem(root, rec)
        if problem:
            warnings.warn(f"{problem}; caching shard {k} again", stacklevel=4)
            continue
        done[k] = rec
    prefix = 0
    while prefix in done:
        prefix += 1

    meta = initial_metadata(request, writer.batch_size, meta, [done[k] for k in range(prefix)])
    write_json_atomic(writer.meta_path, meta)
    # Every intact shard goes into rank 0's progress file before the older files are removed: a crash
    # between the two steps loses no record.
    write_json_atomic(root / PROGRESS_PATTERN.format(0), {"shards": [done[k] for k in sorted(done)]})
    for p in progress_files(root):
        if p.name != PROGRESS_PATTERN.format(0):
            p.unlink()
    return meta, sorted(done)


def run_sharded(writer: Any, overwrite: bool, repair: bool) -> ActivationStore:
    """Cache the shards missing from `writer.root`, split over the ranks (any number, one included)."""
    root, request = writer.root, writer.request
    distributed.check_same("cache request", {**request, "batch_size": writer.batch_size})
    status = distributed.on_main(lambda: _setup(writer, overwrite, repair))
    if status is None:  # complete (rank 0 may have repaired shards)
        writer.rows_written = distributed.sum_int(writer.rows_written)
        return ActivationStore.open(root)
    meta, done = status
    writer.meta = meta
    plan = shard_plan(request)
    todo = [k for k in range(len(plan)) if k not in set(done)]
    mine = distributed.split_contiguous(todo, distributed.world_size())[distributed.rank()]
    progress_path = root / PROGRESS_PATTERN.format(distributed.rank())
    # Rank 0's file already lists the shards found intact; theirs stay listed with its own new ones.
    records = json.loads(progress_path.read_text())["shards"] if distributed.is_main() else []
    P, S = request["rows_per_image"], request["shard_size"]
    for first, last in _runs(mine):
        end_row = plan[last][0] + plan[last][1]
        start_image = first * S // P

        def record(rec: dict[str, Any], last: int = last) -> bool:
            records.append(rec)
            write_json_atomic(progress_path, {"world_size": distributed.world_size(), "shards": records})
            return rec["first_row"] // S < last

        writer.forward_range(first, first * S, start_image, first * S - start_image * P, record,
                        stop_image=-(-end_row // P))
    gathered = distributed.all_gather_object(records)  # every rank is done here
    writer.rows_written = distributed.sum_int(writer.rows_written)

    def finish() -> None:
        by_index = {r["first_row"] // S: r for recs in gathered for r in recs}
        missing = [k for k in range(len(plan)) if k not in by_index]
        if missing:
            raise CacheError(f"shards {missing[:10]} of {root} were not written; run the command again to resume")
        meta["shards"] = [by_index[k] for k in range(len(plan))]
        write_json_atomic(writer.meta_path, meta)
        finalise(root, meta)

    distributed.on_main(finish)
    return ActivationStore.open(root)
