"""The SAE trainer's data: held-out splits by image and a seeded, shuffling stream of cached activations.

- `holdout_split`: row indices `(train, held-out)`, holding out whole images;
- `activation_batches`: the data provider for SAELens' `SAETrainer`: fixed-size batches shuffled
  across shards in a bounded buffer (SAELens' `mixing_buffer`), deterministic for a seed, optionally
  with class labels; `skip_batches` replays the stream to where a resumed run stopped. With
  `prefetch=N` the stream is produced in one DataLoader worker process, N batches ahead of the
  trainer (the same batches in the same order), and `LoaderStats` reports its throughput.

Memory is flat in the cache size: one shard is read at a time (checked by sha256 as it is read) plus
the mixing buffer; only per-row index arrays (`image_index`, the row masks: ~10 bytes per row) grow
with the cache.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from sae_lens.training.mixing_buffer import mixing_buffer
from torch.utils.data import DataLoader, IterableDataset

from ..activation_cache import ActivationStore
from ..core.errors import UsageError


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


def _shard_rows(cache: ActivationStore, hook: str, mask: np.ndarray, seed: int, epochs: int | None,
                with_labels: bool) -> Iterator[torch.Tensor]:
    """Selected rows shard by shard: shard order and within-shard order drawn per (seed, epoch)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        for s in np.random.default_rng([seed, epoch]).permutation(cache.n_shards):
            first, n = cache.shard_offsets[s]
            sel = mask[first:first + n]
            if not sel.any():
                continue
            shard = cache.read_shard(int(s), hook)
            perm = torch.from_numpy(np.random.default_rng([seed, epoch, int(s)]).permutation(int(sel.sum())))
            sel_t = torch.from_numpy(sel)
            acts = shard["acts"][sel_t][perm]
            if with_labels:
                # Packed as one extra column so that one shuffle moves activations and labels together,
                # as SAELens' multi_hook_concat_split_iter does for several hooks.
                acts = torch.cat([acts, shard["labels"][sel_t][perm].to(acts.dtype)[:, None]], dim=1)
            yield acts
        epoch += 1


def _with_private_torch_rng(it: Iterator[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """Run `it` under its own seeded torch RNG state.

    SAELens' `mixing_buffer` shuffles with torch's global generator; this keeps its permutations a
    function of `seed` alone (independent of whatever else draws random numbers), so a resumed run can
    replay the stream exactly.
    """
    state = torch.Generator().manual_seed(seed).get_state()
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            try:
                item = next(it)
            except StopIteration:
                return
            state = torch.get_rng_state()
        yield item


@dataclass
class LoaderStats:
    """What a prefetching `activation_batches` measured: samples handed over, the seconds the loader
    spent producing them (in its own process, sharing the CPU with the trainer) and the seconds the
    consumer waited for a batch (0 when the loader keeps the trainer fed)."""

    samples: int = 0
    produce_seconds: float = 0.0
    wait_seconds: float = 0.0

    @property
    def samples_per_second(self) -> float | None:
        return self.samples / self.produce_seconds if self.produce_seconds > 0 else None


class _TimedBatches(IterableDataset):
    """The batch stream as an IterableDataset for one DataLoader worker; each batch comes with the
    seconds it took to produce."""

    def __init__(self, make: Callable[[], Iterator[Any]]):
        self.make = make

    def __iter__(self) -> Iterator[tuple[Any, float]]:
        it = self.make()
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            # A copy: the mixing buffer yields views of one large tensor, which would travel (and stay
            # alive) whole in shared memory otherwise.
            item = tuple(t.clone() for t in item) if isinstance(item, tuple) else item.clone()
            yield item, time.perf_counter() - t0


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C is the trainer's to handle (it saves a checkpoint between two steps); the worker must not
    die of it first. (SIGTERM is left alone: the DataLoader stops its workers with it.)"""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _prefetched(make: Callable[[], Iterator[Any]], depth: int, stats: LoaderStats | None) -> Iterator[Any]:
    # A DataLoader worker rather than a thread: SAELens' mixing buffer shuffles with torch's global RNG
    # (kept private by `_with_private_torch_rng`), which a thread would share with the trainer.
    loader = DataLoader(_TimedBatches(make), batch_size=None, num_workers=1, prefetch_factor=depth,
                        persistent_workers=False, worker_init_fn=_ignore_interrupts)
    it = iter(loader)
    try:
        while True:
            t0 = time.perf_counter()
            try:
                item, produce = next(it)
            except StopIteration:
                return
            if stats is not None:
                stats.wait_seconds += time.perf_counter() - t0
                stats.produce_seconds += produce
                stats.samples += len(item[0] if isinstance(item, tuple) else item)
            yield item
    finally:
        del it  # stops the worker


def activation_batches(
    cache: str | Path | ActivationStore,
    hook_name: str | None = None,
    batch_size: int = 256,
    *,
    rows: np.ndarray | Sequence[int] | None = None,
    seed: int = 0,
    epochs: int | None = None,
    buffer_size: int | None = None,
    mix_fraction: float = 0.5,
    with_labels: bool = False,
    skip_batches: int = 0,
    dtype: torch.dtype = torch.float32,
    prefetch: int = 0,
    stats: LoaderStats | None = None,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches `[batch_size, d_in]` of cached activations for `SAETrainer` (a `DataProvider`).

    Shards are visited in a per-epoch random order, rows shuffled within each shard and mixed across
    shards in SAELens' `mixing_buffer` of `buffer_size` rows (default: the largest of 32768 rows, two
    shards and four batches, but no more than the selected rows or four batches, whichever is larger). `epochs=None` streams forever (SAETrainer stops at its sample count). Only full batches are
    yielded; rows left over at the end of an epoch carry into the next. The stream is a function of
    `seed` only. `with_labels=True` yields `(acts_BD, labels_B)` (int64, -1 where unknown) instead.
    `skip_batches` drops that many batches first (used to resume a run where it stopped).
    `prefetch=N` (N >= 1): the same stream produced in a DataLoader worker process, up to N batches ahead;
    `stats` (a `LoaderStats`) then collects the loader's throughput and the consumer's waiting time.
    """
    if prefetch:
        cache = open_store(cache)
        make = functools.partial(activation_batches, cache, hook_name, batch_size, rows=rows, seed=seed, epochs=epochs,
                                 buffer_size=buffer_size, mix_fraction=mix_fraction, with_labels=with_labels,
                                 skip_batches=skip_batches, dtype=dtype)
        yield from _prefetched(make, prefetch, stats)
        return
    cache = open_store(cache)
    hook = cache.resolve_hook(hook_name)
    mask = rows_mask(cache, rows)
    if not mask.any():
        raise UsageError("no rows selected: nothing to train on")
    if with_labels and np.abs(cache.labels).max(initial=0) >= 2**24:
        raise UsageError("labels must be below 2**24 to travel through the float32 mixing buffer")
    if buffer_size is None:
        # Never more than the selected rows (a tiny cache would be re-read many times just to fill it).
        default = max(4 * batch_size, 2 * cache.metadata["request"]["shard_size"], 32768)
        buffer_size = max(4 * batch_size, min(default, int(mask.sum())))
    d = cache.d_in(hook)
    rows_iter = (x.to(dtype) for x in _shard_rows(cache, hook, mask, seed, epochs, with_labels))
    batches = _with_private_torch_rng(mixing_buffer(buffer_size, batch_size, rows_iter, mix_fraction), seed)
    for i, batch in enumerate(batches):
        if i < skip_batches:
            continue
        if with_labels:
            yield batch[:, :d], batch[:, d].round().long()
        else:
            yield batch


def mean_of_rows(cache: ActivationStore, hook: str, mask: np.ndarray) -> torch.Tensor:
    """float64 mean of the selected rows (streamed shard by shard)."""
    total, n = torch.zeros(cache.d_in(hook), dtype=torch.float64), 0
    for s, (first, count) in enumerate(cache.shard_offsets):
        sel = mask[first:first + count]
        if sel.any():
            total += cache.read_shard(s, hook, torch.float64)["acts"][torch.from_numpy(sel)].sum(0)
            n += int(sel.sum())
    return total / max(n, 1)
