"""Patch-scale training data (training_data.py): the prefetching shuffled loader yields every row of a
patch-token cache exactly once per epoch, deterministically per seed, resumable, and reports its rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from sae_lens_vision_steer.activation_cache import cache_activations
from sae_lens_vision_steer.data.base import ImageFolderDataset
from sae_lens_vision_steer.training.batches import LoaderStats, activation_batches
from sae_lens_vision_steer.training.trainer import train_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def patch_cache(tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("patch")
    ds = ImageFolderDataset(write_image_folder(root / "images", n_classes=3, per_class=4), "all",
                            tiny_clip.preprocess)
    # 12 images x 16 patch tokens = 192 rows in 5 shards of 40 (the last one 32).
    return cache_activations(tiny_clip, ds, HOOK, root / "cache", positions="patches", shard_size=40,
                             num_workers=0, show_progress=False)


def _rows(t: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, t.tolist()))


def test_every_row_once_per_epoch_deterministic_and_resumable(patch_cache):
    assert patch_cache.n_rows == 192 and patch_cache.n_shards == 5
    direct = torch.cat([patch_cache.read_shard(s, HOOK)["acts"] for s in range(patch_cache.n_shards)])
    stats = LoaderStats()
    epoch = list(activation_batches(patch_cache, HOOK, 16, seed=3, epochs=1, buffer_size=64, prefetch=2, stats=stats))
    assert len(epoch) == 12 and all(b.shape == (16, 64) for b in epoch)
    got = torch.cat(epoch)
    assert _rows(got) == _rows(direct)  # each row exactly once (rows are distinct, so the sets say it)
    assert not torch.equal(got, direct)  # shuffled
    assert stats.samples == 192 and stats.samples_per_second > 0 and stats.wait_seconds >= 0
    # The worker's stream is the in-process one, batch for batch; a seed gives one order.
    same = list(activation_batches(patch_cache, HOOK, 16, seed=3, epochs=1, buffer_size=64))
    assert all(torch.equal(a, b) for a, b in zip(epoch, same, strict=True))
    other = torch.cat(list(activation_batches(patch_cache, HOOK, 16, seed=4, epochs=1, buffer_size=64, prefetch=2)))
    assert not torch.equal(other, got) and _rows(other) == _rows(direct)
    # Resume: skipping 5 batches gives the rest of the stream (two epochs, across the epoch boundary).
    two = list(activation_batches(patch_cache, HOOK, 16, seed=3, epochs=2, buffer_size=64, prefetch=2))
    tail = list(activation_batches(patch_cache, HOOK, 16, seed=3, epochs=2, buffer_size=64, prefetch=2,
                                   skip_batches=5))
    assert len(two) == 24 and all(torch.equal(a, b) for a, b in zip(two[5:], tail, strict=True))
    # Two epochs hold every row exactly twice (the mixing buffer carries rows across the epoch boundary).
    assert _rows(torch.cat(two)) == sorted(_rows(direct) * 2)


def test_row_selection_and_labels_through_the_worker(patch_cache):
    rows = np.arange(0, 192, 2)
    batches = list(activation_batches(patch_cache, HOOK, 16, rows=rows, seed=0, epochs=1, buffer_size=32,
                                      with_labels=True, prefetch=1))
    acts = torch.cat([a for a, _ in batches])
    labels = torch.cat([y for _, y in batches])
    direct = patch_cache.load(HOOK, rows=rows)
    assert _rows(acts) == _rows(direct)
    # Each row's label travels with it: look every served row up in the cache.
    index = {tuple(r): int(patch_cache.labels[i]) for i, r in zip(rows, direct.tolist())}
    assert [index[tuple(r)] for r in acts.tolist()] == labels.tolist()


def test_train_sae_reports_the_loader_rate(patch_cache, tmp_path):
    res = train_sae(patch_cache, HOOK, k=4, expansion_factor=2, batch_size=16, total_training_samples=320,
                    out_dir=tmp_path / "sae", n_checkpoints=0, show_progress=False, buffer_size=64)
    m = res.metrics
    assert m["loader_samples_per_second"] > 0 and 0 <= m["loader_wait_seconds"] <= m["fit_seconds"]
    assert m["n_training_samples"] == 320
