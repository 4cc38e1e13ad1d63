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


def test_batches_are_the_plans_rows(patch_cache):
    """Batch i holds rows [20 i, 20 i + 20) of the seed's order (the plan's own row stream), labels with them,
    across buffer and epoch boundaries (buffers of 48 rows: a batch spans two of them now and then), whether
    batches are gathered from the maps or staged through a buffer."""
    from sae_lens_vision_steer.training.batches import ShufflePlan, rows_mask, shuffled_rows

    got = list(activation_batches(patch_cache, HOOK, 20, seed=5, epochs=3, buffer_size=48, with_labels=True))
    direct = list(activation_batches(patch_cache, HOOK, 20, seed=5, epochs=3, buffer_size=48, with_labels=True,
                                     staged=False))
    staged = list(activation_batches(patch_cache, HOOK, 20, seed=5, epochs=3, buffer_size=48, with_labels=True,
                                     staged=True))
    for (a, y), (b, z), (c, w) in zip(got, direct, staged, strict=True):  # the two ways give the same batches
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(y, z) and torch.equal(y, w)
    plan = ShufflePlan.build(rows_mask(patch_cache, None), [f for f, _ in patch_cache.shard_offsets], 5,
                             buffer_rows=48)
    every = torch.cat([patch_cache.read_shard(s, HOOK)["acts"] for s in range(patch_cache.n_shards)])
    expected = list(shuffled_rows(plan, 20, epochs=3))
    assert len(got) == len(expected) == 3 * 192 // 20
    for rows, (a, y) in zip(expected, got, strict=True):
        assert torch.equal(a, every[torch.from_numpy(rows)])
        assert y.tolist() == patch_cache.labels[rows].tolist()


def test_batches_hold_as_many_images_as_a_uniform_shuffle(patch_cache):
    """The block shuffle's batch diversity: distinct images per batch within 10% of a uniform permutation's."""
    from sae_lens_vision_steer.training.batches import ShufflePlan, rows_mask, shuffled_rows

    img = patch_cache.image_index  # 12 images x 16 patch rows, blocks of 16 rows = one image each
    plan = ShufflePlan.build(rows_mask(patch_cache, None), [f for f, _ in patch_cache.shard_offsets], 0,
                             block_rows=4, buffer_rows=192)
    ours = [len(np.unique(img[r])) for r in shuffled_rows(plan, 16, epochs=20)]
    rng = np.random.default_rng(0)
    uniform = [len(np.unique(img[rng.permutation(192)[:16]])) for _ in range(len(ours))]
    assert np.mean(ours) >= 0.9 * np.mean(uniform)
    # Blocks as large as an image, in a buffer of three images, cannot do that: the check can fail.
    narrow = ShufflePlan.build(rows_mask(patch_cache, None), [f for f, _ in patch_cache.shard_offsets], 0,
                               block_rows=16, buffer_rows=48)
    few = [len(np.unique(img[r])) for r in shuffled_rows(narrow, 16, epochs=20)]
    assert np.mean(few) < 0.9 * np.mean(uniform)


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
