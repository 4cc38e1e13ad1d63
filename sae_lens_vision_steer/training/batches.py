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
any batch size; tested). Memory is flat in the store size: one buffer (default the larger of 65,536 rows and
80 batches, at most the selected rows) plus per-row index arrays (~10 bytes per row); mapped pages are
dropped from the process after each buffer (the page cache keeps them).
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


def _batches_from_buffers(buffers: Iterator[tuple[Any, np.ndarray, int]], batch_size: int,
                          take: Callable[[Any, np.ndarray], Any], cat: Callable[[list[Any]], Any]) -> Iterator[Any]:
    """Cut buffers (each `(data, perm, offset)`) into batches of `batch_size` stream rows; a batch may span
    two buffers (and two epochs); a last incomplete batch is dropped."""
    pending: list[Any] = []
    have = 0
    for data, perm, pos in buffers:
        n = len(perm)
        while pos < n:
            t = min(batch_size - have, n - pos)
            pending.append(take(data, perm[pos:pos + t]))
            have, pos = have + t, pos + t
            if have == batch_size:
                yield pending[0] if len(pending) == 1 else cat(pending)
                pending, have = [], 0


def shuffled_rows(plan: ShufflePlan, batch_size: int, epochs: int | None = None,
                  skip_batches: int = 0) -> Iterator[np.ndarray]:
    """The stream's global row indices, batch by batch: what `activation_batches` gathers."""
    bufs = plan.buffers(epochs, skip_batches * batch_size)
    return _batches_from_buffers(bufs, batch_size, lambda rows, p: rows[p], np.concatenate)


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
    hook's `ShardMaps` already.
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
    gen = _gather(maps, plan, batch_size, epochs, skip_batches, labels, dtype, device, stats, stop,
                  time_waits=not prefetch)
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


def _gather(maps: ShardMaps, plan: ShufflePlan, batch_size: int, epochs: int | None, skip_batches: int,
            labels: torch.Tensor | None, dtype: torch.dtype, device: torch.device, stats: LoaderStats | None,
            stop: threading.Event | None, time_waits: bool) -> Iterator[Any]:
    pin = device.type == "cuda"
    max_rows = int(plan.block_len.max()) * plan.blocks_per_buffer
    buf_np = maps.empty(min(max_rows, plan.n_rows), pin=pin)
    buf = maps.as_torch(buf_np)

    def buffers() -> Iterator[tuple[Any, np.ndarray, int]]:
        for rows, perm, offset in plan.buffers(epochs, skip_batches * batch_size):
            maps.gather(rows, out=buf_np)
            maps.release()
            lab = labels[torch.from_numpy(rows)] if labels is not None else None
            yield (buf[:len(rows)], lab), torch.from_numpy(perm), offset

    def take(data: tuple[torch.Tensor, torch.Tensor | None], idx: torch.Tensor) -> Any:
        acts, lab = data
        part = torch.empty((len(idx), acts.shape[1]), dtype=acts.dtype, pin_memory=pin)
        torch.index_select(acts, 0, idx, out=part)
        return part if lab is None else (part, lab[idx])

    def cat(parts: list[Any]) -> Any:
        if isinstance(parts[0], tuple):
            return torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
        return torch.cat(parts)

    def finish(item: Any) -> Any:  # float32 last, on the device
        acts, lab = item if isinstance(item, tuple) else (item, None)
        acts = acts.to(device, non_blocking=pin).to(dtype)
        return acts if lab is None else (acts, lab.to(device, non_blocking=pin))

    batches = _batches_from_buffers(buffers(), batch_size, take, cat)
    t = time.perf_counter()
    for item in batches:
        if stop is not None and stop.is_set():
            raise StopRequested("stop requested")
        out = finish(item)
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
