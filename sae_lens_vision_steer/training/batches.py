"""The SAE trainer's data: held-out splits by image and a seeded, shuffled stream of cached activations.

- `holdout_split`: row indices `(train, held-out)`, holding out whole images;
- `activation_batches`: the data provider for SAELens' `SAETrainer`: fixed-size batches gathered from the
  memory-mapped shards (`activation_cache.ShardMaps`, checked once when opened) in a global block shuffle:
  - the selected rows are cut into blocks of `block_rows` consecutive rows (never across shards);
  - each epoch visits the blocks in a random order, `buffer_size` rows at a time;
  - each buffer is read in file order (one gather per shard) and shuffled row by row;
  - the stream is the epochs one after the other; batch `i` is rows `[i b, (i + 1) b)` of it.

  Every draw comes from `np.random.default_rng([seed, epoch(, buffer)])`, so the stream is a function of
  the seed alone, and a resumed run (`skip_batches`) starts at its batch by index arithmetic (nothing is
  read or replayed). Rows are gathered in the stored dtype and made float32 last, on `device` (pinned host
  memory and a non-blocking copy on CUDA). `prefetch=N` produces the stream N batches ahead in SAELens'
  `PrefetchingIterator` (a thread; the default on CUDA).

Batch diversity: a buffer holds `buffer_size / block_rows` blocks from anywhere in the store, so a batch of a
patch cache holds about as many distinct images as a uniform shuffle's (within 10% with the defaults, for
any batch size; tested). Memory is flat in the store size: two buffers of `buffer_size` rows in the stored
dtype (default the larger of 65,536 rows and 80 batches, at most the selected rows) plus per-row index arrays
(~10 bytes per row); mapped pages are dropped from the process after every 1 GiB read (the page cache keeps
them). Inside a batch the rows are in ascending order (the order inside a batch does not matter to training).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..activation_cache import ActivationStore, ShardMaps
from ..core.errors import UsageError

DEFAULT_BLOCK_ROWS = 16
MIN_BUFFER_ROWS = 65536
BUFFER_BATCHES = 80  # with 16-row blocks a buffer holds >= 5 batches' worth of distinct blocks
CALL_SECONDS = 6e-6  # the cost model of `gathers_directly`
COPY_BYTES_PER_SECOND = 0.6e9


class StopRequested(Exception):
    """Raised from the stream's `next()` once its `stop` event is set: between two trainer steps."""


def open_store(cache: str | Path | ActivationStore) -> ActivationStore:
    return cache if isinstance(cache, ActivationStore) else ActivationStore.open(cache)


def holdout_split(cache: str | Path | ActivationStore, fraction: float = 0.1,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices `(train_rows, heldout_rows)`, holding out whole images (all their rows), chosen
    by `seed` only (not the training seed, so SAEs trained with different seeds share a held-out set)."""
    cache = open_store(cache)
    if not 0 <= fraction < 1:
        raise UsageError(f"holdout fraction must be in [0, 1), got {fraction}")
    images = np.unique(cache.image_index)
    n_held = int(round(len(images) * fraction))
    if fraction > 0:
        n_held = min(max(n_held, 1), len(images) - 1)
    held_images = np.random.default_rng(seed).choice(images, size=n_held, replace=False)
    held = np.isin(cache.image_index, held_images)
    return np.nonzero(~held)[0], np.nonzero(held)[0]


def image_subset(cache: str | Path | ActivationStore, rows: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """The rows of `round(fraction * n)` (at least one) of the images of `rows`, whole images, in row order.
    Nested: the images come from one seeded order, so a smaller fraction's images are among a larger one's."""
    cache = open_store(cache)
    if not 0 < fraction <= 1:
        raise UsageError(f"fraction must be in (0, 1], got {fraction}")
    images = np.unique(cache.image_index[rows])
    order = np.random.default_rng([seed, 1]).permutation(images)
    kept = order[:max(1, int(round(len(images) * fraction)))]
    return rows[np.isin(cache.image_index[rows], kept)]


def rows_mask(cache: ActivationStore, rows: np.ndarray | Sequence[int] | None) -> np.ndarray:
    """A boolean `[n_rows]` mask of the selected rows (all of them when `rows` is None)."""
    if rows is None:
        return np.ones(cache.n_rows, dtype=bool)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (cache.n_rows,):
            raise UsageError(f"a boolean row mask must have shape ({cache.n_rows},), got {rows.shape}")
        return rows
    mask = np.zeros(cache.n_rows, dtype=bool)
    mask[rows.astype(np.int64)] = True
    return mask


# ---------------------------------------------------------------------------------- the order
@dataclass(frozen=True)
class ShufflePlan:
    """Where every row of the stream comes from (see the module docstring); builds no data."""

    rows: np.ndarray  # selected global row indices, ascending
    block_start: np.ndarray  # index into `rows` of each block's first row
    block_len: np.ndarray
    blocks_per_buffer: int
    seed: int

    @classmethod
    def build(cls, mask: np.ndarray, shard_starts: Sequence[int], seed: int, block_rows: int = DEFAULT_BLOCK_ROWS,
              buffer_rows: int = MIN_BUFFER_ROWS) -> "ShufflePlan":
        rows = np.flatnonzero(mask)
        shard_of = np.searchsorted(np.asarray(shard_starts), rows, side="right") - 1
        runs = np.concatenate([[0], np.flatnonzero(np.diff(shard_of)) + 1, [len(rows)]])
        counts = -(-np.diff(runs) // block_rows)  # blocks per run of one shard's rows
        starts = np.concatenate([np.arange(a, b, block_rows) for a, b in zip(runs[:-1], runs[1:])]).astype(np.int64)
        ends = np.minimum(starts + block_rows, np.repeat(runs[1:], counts))
        return cls(rows, starts, ends - starts, max(1, buffer_rows // block_rows), seed)

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def epoch_buffers(self, epoch: int) -> list[np.ndarray]:
        """Block ids of each buffer of `epoch`, in stream order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.block_start))
        k = self.blocks_per_buffer
        return [order[i:i + k] for i in range(0, len(order), k)]

    def buffer(self, blocks: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """`(rows, perm)`: the buffer's global rows ascending (the read order) and its shuffle; the buffer's
        part of the stream is `rows[perm]`."""
        starts, lens = self.block_start[blocks], self.block_len[blocks]
        first = np.repeat(starts - (np.cumsum(lens) - lens), lens)
        rows = np.sort(self.rows[first + np.arange(int(lens.sum()))])
        return rows, np.random.default_rng([self.seed, epoch, index]).permutation(len(rows))

    def locate(self, position: int) -> tuple[int, int, int]:
        """`(epoch, buffer, offset)` of a stream position (where a resumed run starts)."""
        epoch, r = divmod(position, self.n_rows)
        for b, blocks in enumerate(self.epoch_buffers(epoch)):
            n = int(self.block_len[blocks].sum())
            if r < n:
                return epoch, b, r
            r -= n
        raise AssertionError("a position inside an epoch lies in one of its buffers")

    def buffers(self, epochs: int | None, position: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """`(rows, perm, offset)` of each buffer from stream `position` on; `offset` > 0 only for the first."""
        epoch, first, offset = self.locate(position)
        while epochs is None or epoch < epochs:
            for b, blocks in enumerate(self.epoch_buffers(epoch)):
                if b >= first:
                    rows, perm = self.buffer(blocks, epoch, b)
                    yield rows, perm, offset
                    offset = 0
            epoch, first = epoch + 1, 0


def _batch_sorted(order: np.ndarray, have: int, batch_size: int) -> tuple[np.ndarray, int]:
    """`order` (a buffer's stream positions) with each batch's part sorted (ascending rows: the pages in order;
    the order inside a batch does not matter to training), and the length of its first part, which completes
    a batch of which `have` rows came from the buffer before."""
    first = min((batch_size - have) % batch_size, len(order))
    segment = np.zeros(len(order), dtype=np.int64)
    segment[first:] = 1 + np.arange(len(order) - first) // batch_size
    return order[np.lexsort((order, segment))], first


def _stream(plan: ShufflePlan, batch_size: int, epochs: int | None, skip_batches: int,
            fill: Callable[[np.ndarray, np.ndarray], tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Batches of `batch_size` stream rows. `fill(rows, order)` returns the buffer's rows in stream order: a
    tuple of arrays whose last holds the row indices (arrays that may be reused for the next buffer: a piece
    kept across buffers is copied). A batch may span two buffers (and two epochs); its rows are then sorted
    too. A last incomplete batch is dropped."""
    pending: list[tuple[Any, ...]] = []
    have = 0
    for rows, perm, offset in plan.buffers(epochs, skip_batches * batch_size):
        order, first = _batch_sorted(perm[offset:], have, batch_size)
        data = fill(rows, order)
        n, pos = len(order), 0
        if have:  # complete the batch begun in the buffer before
            pending.append(tuple(a[:first] for a in data))
            have, pos = have + first, first
            if have == batch_size:  # (rows ascending, as in every batch: sorted by the row ids, the last array)
                joined = [_cat([p[k] for p in pending]) for k in range(len(data))]
                ascending = np.argsort(joined[-1], kind="stable")
                yield tuple(a[torch.from_numpy(ascending)] if isinstance(a, torch.Tensor) else a[ascending]
                            for a in joined)
                pending, have = [], 0
            else:
                pending[-1] = tuple(_copy(a) for a in pending[-1])  # outlives this buffer
        while pos + batch_size <= n:
            yield tuple(a[pos:pos + batch_size] for a in data)
            pos += batch_size
        if pos < n:
            pending.append(tuple(_copy(a[pos:n]) for a in data))
            have += n - pos


def _copy(a: Any) -> Any:
    return a.clone() if isinstance(a, torch.Tensor) else np.array(a)


def _cat(parts: list[Any]) -> Any:
    return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else np.concatenate(parts)


def shuffled_rows(plan: ShufflePlan, batch_size: int, epochs: int | None = None,
                  skip_batches: int = 0) -> Iterator[np.ndarray]:
    """The stream's global row indices, batch by batch, in the order `activation_batches` gathers them."""
    for (rows,) in _stream(plan, batch_size, epochs, skip_batches, lambda rows, order: (rows[order],)):
        yield rows


# ---------------------------------------------------------------------------------- the data
@dataclass
class LoaderStats:
    """What `activation_batches` measured: samples handed over, the seconds spent producing them (in the
    consumer's thread, or in the prefetching thread) and the seconds the consumer waited for a batch (all of
    the producing time without prefetching)."""

    samples: int = 0
    produce_seconds: float = 0.0
    wait_seconds: float = 0.0
    open_seconds: float = 0.0  # mapping and checking the shards once (sha256, finite values)

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.produce_seconds if self.produce_seconds > 0 else None


def default_buffer_rows(batch_size: int, n_selected: int) -> int:
    return max(batch_size, min(max(MIN_BUFFER_ROWS, BUFFER_BATCHES * batch_size), n_selected))


def activation_batches(
    cache: str | Path | ActivationStore | ShardMaps,
    hook_name: str | None = None,
    batch_size: int = 256,
    *,
    rows: np.ndarray | Sequence[int] | None = None,
    seed: int = 0,
    epochs: int | None = None,
    buffer_size: int | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    with_labels: bool = False,
    skip_batches: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prefetch: int | None = None,
    stats: LoaderStats | None = None,
    stop: threading.Event | None = None,
    staged: bool | None = None,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches `[batch_size, d_in]` (`dtype`, on `device`) of cached activations for `SAETrainer` (a
    `DataProvider`), in the global block shuffle of the module docstring.

    `rows`: the rows to draw from (indices or a boolean mask; default all). `epochs=None` streams forever
    (SAETrainer stops at its sample count); only full batches are yielded, a batch may span two epochs.
    `with_labels=True` yields `(acts_BD, labels_B)` (int64, -1 where unknown). `skip_batches` starts at that
    batch (a resumed run). `prefetch`: batches produced ahead in a thread (default: 4 on CUDA, none on the
    CPU, where producing a batch costs next to nothing beside a training step). `stop`: once set, the next
    `next()` raises `StopRequested` (between two trainer steps: a consistent point to save a checkpoint).
    The shards are mapped and checked (sha256, finite values) before the first batch, unless `cache` is the
    hook's `ShardMaps` already. `staged`: read each buffer into memory first, or (False) gather each batch
    straight from the maps; default: the cheaper (`gathers_directly`). The batches are the same either way.
    """
    if batch_size < 1 or block_rows < 1 or skip_batches < 0:
        raise UsageError("batch_size and block_rows must be positive and skip_batches >= 0")
    t0 = time.perf_counter()
    maps = shard_maps(cache, hook_name)
    cache = maps.cache
    mask = rows_mask(cache, rows)
    n_sel = int(mask.sum())
    if n_sel == 0:
        raise UsageError("no rows selected: nothing to train on")
    buffer_rows = default_buffer_rows(batch_size, n_sel) if buffer_size is None else buffer_size
    if buffer_rows < 1:
        raise UsageError(f"buffer_size must be positive, got {buffer_size}")
    device = torch.device(device)
    if prefetch is None:
        prefetch = 4 if device.type == "cuda" else 0
    labels = torch.from_numpy(np.asarray(cache.labels, dtype=np.int64)) if with_labels else None
    plan = ShufflePlan.build(mask, [f for f, _ in cache.shard_offsets], seed, block_rows, buffer_rows)
    if stats is not None:
        stats.open_seconds += time.perf_counter() - t0
    direct = gathers_directly(maps, batch_size) if staged is None else not staged
    gen = _gather(maps, plan, batch_size, epochs, skip_batches, labels, dtype, device, stats, stop,
                  time_waits=not prefetch, direct=direct)
    if prefetch:
        return _prefetching(gen, prefetch, stats)
    return gen


def _prefetching(gen: Iterator[Any], depth: int, stats: LoaderStats | None) -> Iterator[Any]:
    """SAELens' `PrefetchingIterator` (a producer thread); with `stats`, the consumer's waits are timed."""
    from sae_lens.training.prefetch import PrefetchingIterator

    if stats is None:
        return PrefetchingIterator(gen, prefetch=depth)

    class Timed(PrefetchingIterator):
        def __next__(self) -> Any:
            t = time.perf_counter()
            try:
                return super().__next__()
            finally:
                stats.wait_seconds += time.perf_counter() - t

    return Timed(gen, prefetch=depth)


def gathers_directly(maps: ShardMaps, batch_size: int) -> bool:
    """Whether to gather each batch straight from the maps (one call per shard the batch touches) rather than
    stage each buffer in memory first (one call per shard per buffer, and a second copy of every row): the
    cheaper of the two by a rough cost model (a call ~6 us, a copy ~0.6 GB/s on a small shared CPU)."""
    touched = min(len(maps.shards), batch_size)
    row_bytes = maps.d_in * np.dtype(maps.np_dtype).itemsize
    return touched * CALL_SECONDS < batch_size * row_bytes / COPY_BYTES_PER_SECOND


def _gather(maps: ShardMaps, plan: ShufflePlan, batch_size: int, epochs: int | None, skip_batches: int,
            labels: torch.Tensor | None, dtype: torch.dtype, device: torch.device, stats: LoaderStats | None,
            stop: threading.Event | None, time_waits: bool, direct: bool) -> Iterator[Any]:
    pin = device.type == "cuda"
    size = min(int(plan.block_len.max()) * plan.blocks_per_buffer, plan.n_rows)
    # Staged: two buffers in the stored dtype, the buffer's rows in file order (one gather per shard, from the
    # maps), then in stream order (one gather); each batch is a slice of the second. Direct: each batch is
    # gathered from the maps into a staging array. On CUDA the arrays copied to the device are page-locked and
    # the copies do not block; an array is refilled once its copy is done.
    read = None if direct else maps.empty(size)
    ordered = maps.empty(batch_size if direct else size, pin=pin)
    ordered_t = maps.as_torch(ordered)  # (made once: a torch view of the same memory)
    lab_np = labels.numpy() if labels is not None else None
    copied = None  # CUDA: an event after the last copy out of `ordered`

    def fill(rows: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, ...]:
        if direct:
            return (rows[order],)
        if copied is not None:
            copied.synchronize()
        maps.gather(rows, out=read)
        maps.release()
        np.take(read, order, axis=0, out=ordered[:len(order)], mode="clip")
        return ordered_t[:len(order)], rows[order]

    t = time.perf_counter()
    for item in _stream(plan, batch_size, epochs, skip_batches, fill):
        if stop is not None and stop.is_set():
            raise StopRequested("stop requested")
        rows = item[-1]
        if direct:
            if copied is not None:
                copied.synchronize()
            maps.gather(rows, out=ordered)
            maps.release()
            x = ordered_t
        else:
            x = item[0]
        if pin:  # float32 last, on the device
            x = (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True).to(dtype)
            copied = torch.cuda.Event()
            copied.record()
        else:  # a copy: `ordered` is refilled
            x = x.to(dtype, copy=True)
        out = x if lab_np is None else (x, torch.from_numpy(lab_np[rows]).to(device, non_blocking=pin))
        if stats is not None:
            now = time.perf_counter()
            stats.produce_seconds += now - t
            stats.samples += batch_size
            if time_waits:  # in the consumer's thread: it waits for all of it
                stats.wait_seconds += now - t
        yield out
        t = time.perf_counter()


def shard_maps(cache: str | Path | ActivationStore | ShardMaps, hook_name: str | None = None) -> ShardMaps:
    """The hook's memory-mapped shards (checked once); `cache` may be them already (same hook)."""
    if isinstance(cache, ShardMaps):
        if hook_name is not None and cache.cache.resolve_hook(hook_name) != cache.hook:
            raise UsageError(f"these shard maps are of hook {cache.hook!r}, not {hook_name!r}")
        return cache
    return ShardMaps(open_store(cache), hook_name)


def mean_of_rows(cache: ActivationStore | ShardMaps, hook: str, mask: np.ndarray,
                 chunk_rows: int = 65536) -> torch.Tensor:
    """float64 mean of the selected rows (from the memory-mapped shards, a chunk at a time)."""
    maps = cache if isinstance(cache, ShardMaps) else ShardMaps(cache, hook, verify=False)
    rows = np.flatnonzero(mask)
    total = torch.zeros(maps.d_in, dtype=torch.float64)
    out = maps.empty(min(chunk_rows, max(len(rows), 1)))
    for i in range(0, len(rows), chunk_rows):
        part = rows[i:i + chunk_rows]
        total += maps.as_torch(maps.gather(part, out=out)).double().sum(0)
        maps.release()
    return total / max(len(rows), 1)
