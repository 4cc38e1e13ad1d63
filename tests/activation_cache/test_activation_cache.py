"""Activation cache: contents against independent forward passes, resume to identical bytes, refusals."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import TINY_CLIP_KWARGS, make_tiny_clip

from sae_lens_vision_steer import __version__
from sae_lens_vision_steer.activation_cache import (
    ActivationStore,
    CacheError,
    CacheMismatchError,
    CorruptCacheError,
    NonFiniteActivationsError,
    cache_activations,
)
from sae_lens_vision_steer.cli.common import EXIT_CONFLICT, EXIT_INPUT, EXIT_USAGE  # noqa: F401
from sae_lens_vision_steer.data import load_image_dataset

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_mid"]


@pytest.fixture(scope="module")
def train2000(tiny_clip, tiny_imagenet_dir):
    return load_image_dataset("tiny-imagenet", "train", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=2000)


@pytest.fixture(scope="module")
def cache2000(tiny_clip, train2000, tmp_path_factory) -> ActivationStore:
    out = tmp_path_factory.mktemp("cache2000")
    return cache_activations(tiny_clip, train2000, HOOKS, out, batch_size=128, num_workers=0, shard_size=512,
                             show_progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_shapes_labels_metadata(cache2000, train2000, tiny_clip):
    c = cache2000
    assert c.n_rows == 2000 and c.n_shards == 4 and c.hook_names == HOOKS
    assert [n for _, n in c.shard_offsets] == [512, 512, 512, 464]
    assert c.d_in(HOOKS[0]) == c.d_in(HOOKS[1]) == 64
    np.testing.assert_array_equal(c.labels, train2000.subset_labels)
    assert c.labels.dtype == np.int64 and len(np.unique(c.labels)) == 200
    np.testing.assert_array_equal(c.image_index, np.arange(2000))
    m = c.metadata
    assert (m["model_name"], m["pretrained"], m["positions"], m["dtype"]) == ("ViT-B-32", None, "cls", "float16")
    assert (m["dataset"], m["split"], m["n_images"], m["n_images_cached"]) == ("tiny-imagenet", "train", 2000, 2000)
    assert m["request"]["preprocess"] == repr(tiny_clip.preprocess)
    assert m["package_version"] == __version__
    for rec in m["shards"]:  # recorded checksums are those of the files
        data = (c.root / rec["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["nbytes"]
    for h in HOOKS:  # statistics against a float64 computation over the stored rows
        x = c.load(h).double()
        assert c.load(h, dtype=torch.float16).dtype == torch.float16
        mu = x.mean(0)
        s = c.stats(h)
        torch.testing.assert_close(c.mean(h).double(), mu, rtol=0, atol=1e-6)
        assert s["mean_norm"] == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-12)
        assert s["mean_sq_dist_to_mean"] == pytest.approx(float((x - mu).pow(2).sum(1).mean()), rel=1e-9)
        assert s["max_abs"] == float(x.abs().max())


def test_cached_activations_equal_run_with_cache(cache2000, train2000, tiny_clip):
    rows = np.array([0, 1, 511, 512, 1023, 1500, 1999])
    images = torch.stack([train2000[int(i)][0] for i in rows])
    with torch.no_grad():
        _, ref = tiny_clip.run_with_cache(images, names_filter=HOOKS)
    for h in HOOKS:
        got = cache2000.load(h, rows=rows)
        expect = ref[h][:, 0].half().float()  # the CLS token, rounded as stored
        torch.testing.assert_close(got, expect, rtol=2e-3, atol=2e-3)
        assert not torch.equal(got[0], got[1])


def test_iter_shards_and_load_agree(cache2000):
    h = HOOKS[0]
    full = torch.cat(list(cache2000.iter_shards(h)))
    torch.testing.assert_close(full, cache2000.load(h), rtol=0, atol=0)
    rows = np.array([1999, 3, 700])
    torch.testing.assert_close(cache2000.load(h, rows=rows), full[rows], rtol=0, atol=0)
    with pytest.raises(KeyError, match="not in the cache"):
        cache2000.load("blocks.0.hook_mlp_out")


@pytest.mark.parametrize("positions", ["patches", "all"])
def test_token_positions(tiny_clip, tiny_imagenet_dir, tmp_path, positions):
    ds = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=12)
    c = cache_activations(tiny_clip, ds, "blocks.0.hook_resid_post", tmp_path, positions=positions, dtype="float32",
                          batch_size=5, num_workers=0, shard_size=40, show_progress=False)
    T = tiny_clip.cfg.n_tokens
    P = T - 1 if positions == "patches" else T
    assert c.n_rows == 12 * P
    np.testing.assert_array_equal(c.image_index, np.arange(12).repeat(P))
    np.testing.assert_array_equal(c.labels, ds.subset_labels.repeat(P))
    with torch.no_grad():
        _, ref = tiny_clip.run_with_cache(torch.stack([ds[i][0] for i in range(12)]), names_filter="blocks.0.hook_resid_post")
    tokens = ref["blocks.0.hook_resid_post"]
    expect = (tokens[:, 1:] if positions == "patches" else tokens).reshape(-1, tokens.shape[-1])
    torch.testing.assert_close(c.load(), expect, rtol=1e-5, atol=1e-5)


def test_head_hooks_need_cls_and_match_encode_image(tiny_clip, tiny_imagenet_dir, tmp_path):
    ds = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=10)
    with pytest.raises(ValueError, match="positions='cls'"):
        cache_activations(tiny_clip, ds, "hook_image_embed", tmp_path / "a", positions="patches", show_progress=False)
    c = cache_activations(tiny_clip, ds, ["hook_image_embed", "blocks.0.hook_resid_pre"], tmp_path / "b",
                          dtype="float32", num_workers=0, show_progress=False)
    assert c.d_in("hook_image_embed") == tiny_clip.cfg.embed_dim
    with torch.no_grad():
        expect = tiny_clip.encode_image(torch.stack([ds[i][0] for i in range(10)]))
    torch.testing.assert_close(c.load("hook_image_embed"), expect, rtol=1e-5, atol=1e-5)


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("positions,limit,shard_size,crash_at", [("cls", 600, 128, 333), ("patches", 60, 100, 41)])
def test_interrupted_cache_resumes_to_identical_bytes(tiny_clip, tiny_imagenet_dir, tmp_path, positions, limit,
                                                      shard_size, crash_at):
    kw = dict(positions=positions, batch_size=50 if positions == "cls" else 7, num_workers=0, shard_size=shard_size,
              show_progress=False)

    def dataset():
        return load_image_dataset("tiny-imagenet", "train", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=limit)

    whole = cache_activations(tiny_clip, dataset(), HOOKS, tmp_path / "whole", **kw)

    crashing = dataset()
    original = crashing.load_image
    crash_item = int(crashing.indices[crash_at])

    def load_or_crash(i):
        if i == crash_item:
            raise _Crash("simulated interruption")
        return original(i)

    crashing.load_image = load_or_crash
    with pytest.raises(_Crash):
        cache_activations(tiny_clip, crashing, HOOKS, tmp_path / "resumed", **kw)
    meta = json.loads((tmp_path / "resumed" / "metadata.json").read_text())
    P = 1 if positions == "cls" else tiny_clip.cfg.n_tokens - 1
    rows_before_crash = crash_at // kw["batch_size"] * kw["batch_size"] * P  # the crashing batch is lost
    assert not meta["complete"] and len(meta["shards"]) == rows_before_crash // shard_size > 0
    written = {r["file"]: (tmp_path / "resumed" / r["file"]).stat().st_mtime_ns for r in meta["shards"]}

    resumed = cache_activations(tiny_clip, dataset(), HOOKS, tmp_path / "resumed", **kw)
    assert {f: (tmp_path / "resumed" / f).stat().st_mtime_ns for f in written} == written  # not redone
    assert _files(resumed.root) == _files(whole.root)


def test_complete_cache_is_reused_and_mismatches_refused(cache2000, tiny_clip, train2000, tiny_imagenet_dir, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(cache2000.root, root)
    before = _files(root)
    kw = dict(batch_size=128, num_workers=0, shard_size=512, show_progress=False)
    again = cache_activations(tiny_clip, train2000, HOOKS, root, **kw)
    assert again.n_rows == 2000 and _files(root) == before

    with pytest.raises(CacheMismatchError, match=r"dtype: cache has 'float16', request has 'float32'"):
        cache_activations(tiny_clip, train2000, HOOKS, root, dtype="float32", **kw)
    with pytest.raises(CacheMismatchError, match="hook_names"):
        cache_activations(tiny_clip, train2000, HOOKS[:1], root, **kw)
    with pytest.raises(CacheMismatchError, match="positions"):
        cache_activations(tiny_clip, train2000, HOOKS, root, positions="all", **kw)
    with pytest.raises(CacheMismatchError, match="model_fingerprint"):
        cache_activations(make_tiny_clip(seed=1), train2000, HOOKS, root, **kw)
    fewer = load_image_dataset("tiny-imagenet", "train", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=1000)
    with pytest.raises(CacheMismatchError, match="n_images: cache has 2000, request has 1000"):
        cache_activations(tiny_clip, fewer, HOOKS, root, **kw)
    other_split = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=2000)
    with pytest.raises(CacheMismatchError, match="split: cache has 'train', request has 'val'"):
        cache_activations(tiny_clip, other_split, HOOKS, root, **kw)
    assert _files(root) == before  # refusals lose nothing


def test_corrupt_and_truncated_shards_are_detected(cache2000, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(cache2000.root, root)
    shard1 = root / "shard_00001.safetensors"
    data = bytearray(shard1.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the activations
    shard1.write_bytes(bytes(data))
    c = ActivationStore.open(root)  # same size: found on read
    c.read_shard(0)
    with pytest.raises(CorruptCacheError, match="shard_00001.safetensors is corrupt"):
        c.read_shard(1)
    with pytest.raises(CorruptCacheError, match="shard_00001"):
        c.verify()
    with pytest.raises(CorruptCacheError):
        c.load()

    shard2 = root / "shard_00002.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:1000])
    with pytest.raises(CorruptCacheError, match="shard_00002.safetensors is truncated"):
        ActivationStore.open(root)


class _NaNAt(torch.utils.data.Dataset):
    """Images from a real data set, one of them NaN."""

    def __init__(self, base, bad: int):
        self.base, self.bad = base, bad
        self.dataset_id, self.split, self.transform = "nan-test", "train", base.transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, idx = self.base[i]
        return (x * float("nan") if i == self.bad else x), y, idx


def test_non_finite_activations_name_the_shard(tiny_clip, tiny_imagenet_dir, tmp_path):
    base = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=100)
    with pytest.raises(NonFiniteActivationsError, match=r"shard 2 \(shard_00002.safetensors; rows 64\.\.95, first bad row 70"):
        cache_activations(tiny_clip, _NaNAt(base, 70), HOOKS[0], tmp_path / "w", batch_size=16, num_workers=0,
                          shard_size=32, show_progress=False)
    assert not (tmp_path / "w" / "shard_00002.safetensors").exists()

    # On read: a shard whose stored values are not finite (checksums made to match) is named too.
    c = cache_activations(tiny_clip, base, HOOKS[0], tmp_path / "r", batch_size=16, num_workers=0, shard_size=32,
                          show_progress=False)
    meta = json.loads((c.root / "metadata.json").read_text())
    path = c.root / "shard_00001.safetensors"
    tensors = safetensors.torch.load(path.read_bytes())
    tensors[f"acts/{HOOKS[0]}"][5, 3] = float("inf")
    data = safetensors.torch.save(tensors)
    path.write_bytes(data)
    meta["shards"][1].update(nbytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (c.root / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(NonFiniteActivationsError, match="shard 1"):
        ActivationStore.open(c.root).load()


def test_empty_missing_and_incomplete_caches_are_refused(tmp_path, tiny_clip, tiny_imagenet_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationStore.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.json is missing .it is empty"):
        ActivationStore.open(tmp_path / "empty")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "metadata.json").write_text(json.dumps({"complete": False, "shards": []}))
    with pytest.raises(CacheError, match="incomplete"):
        ActivationStore.open(tmp_path / "partial")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "shard_00000.safetensors").write_bytes(b"x")
    ds = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=4)
    with pytest.raises(CacheError, match="no metadata.json"):
        cache_activations(tiny_clip, ds, HOOKS[0], tmp_path / "stray", show_progress=False)
    with pytest.raises(KeyError, match="unknown hook name"):
        cache_activations(tiny_clip, ds, "blocks.9.hook_resid_post", tmp_path / "x", show_progress=False)


def test_cli_cache(tmp_path, tiny_imagenet_dir, capsys):
    from sae_lens_vision_steer.cli import main

    argv = ["cache", "--model", "ViT-B-32", "--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS),
            "--device", "cpu", "--dataset", "tiny-imagenet", "--data-dir", str(tiny_imagenet_dir), "--limit", "40",
            "--batch-size", "16", "--num-workers", "0", "--hook", "blocks.1.hook_resid_post", "--hook",
            "blocks.0.hook_resid_post", "--shard-size", "16", "--out", str(tmp_path / "c"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "40 images (0 skipped), 40 rows (cls, stored as float16, computed in fp32) in 3 shards" in out
    assert "peak RSS" in out
    c = ActivationStore.open(tmp_path / "c")
    assert c.hook_names == ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]
    # Same command again: reused. Another dtype: refused with one clear line.
    assert main(argv) == 0
    assert main(argv + ["--dtype", "float32"]) == EXIT_CONFLICT
    assert "dtype: cache has 'float16', request has 'float32'" in capsys.readouterr().err


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_tiny_clip, TINY_IMAGENET
    from sae_lens_vision_steer.data import load_image_dataset
    from sae_lens_vision_steer.activation_cache import cache_activations
    from sae_lens_vision_steer.cli.common import peak_rss_mib
    torch.set_num_threads(1)
    m = make_tiny_clip()
    ds = load_image_dataset("tiny-imagenet", "train", TINY_IMAGENET, transform=m.preprocess, limit=int(sys.argv[1]))
    hooks = ["blocks.1.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.0.hook_resid_post"]
    cache_activations(m, ds, hooks, sys.argv[2], positions="all", dtype="float32", batch_size=64,
                      num_workers=0, shard_size=4096, show_progress=False)
    print(json.dumps({{"peak_rss_mib": peak_rss_mib()}}))
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_images(tmp_path):
    """All tokens of 1,000 vs 8,000 images at 3 hooks (17,000 vs 136,000 rows of 3 x 64 float32): peak RSS
    stays flat, where holding the activations would add ~90 MiB."""
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT.format(tests=str(Path(__file__).parents[1])))
    peaks = {}
    for n in (1000, 8000):
        res = subprocess.run([sys.executable, str(script), str(n), str(tmp_path / f"c{n}")], capture_output=True,
                             text=True, check=True)
        peaks[n] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mib"]
    print(peaks)
    assert peaks[8000] < peaks[1000] + 30


def test_preprocess_identity_has_no_memory_addresses():
    from torchvision.transforms import Compose

    from sae_lens_vision_steer.core.identity import stable_repr

    t = Compose([lambda x: x])  # a plain function in a Compose shows its address
    assert " at 0x" in repr(t) and " at 0x" not in stable_repr(t)


def test_cache_files_get_the_usual_permissions(cache2000):
    import os

    umask = os.umask(0)
    os.umask(umask)
    for p in cache2000.root.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_second_writer_is_refused(tiny_clip, tiny_imagenet_dir, tmp_path):
    import fcntl
    import os

    ds = load_image_dataset("tiny-imagenet", "val", tiny_imagenet_dir, transform=tiny_clip.preprocess, limit=8)
    root = tmp_path / "c"
    root.mkdir()
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another process writing this cache would
        os.pwrite(fd, b"4242", 0)
        with pytest.raises(CacheError, match=r"another process \(pid 4242\) is writing the cache"):
            cache_activations(tiny_clip, ds, HOOKS[0], root, num_workers=0, show_progress=False)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert cache_activations(tiny_clip, ds, HOOKS[0], root, num_workers=0, show_progress=False).n_rows == 8
    assert (root / ".lock").read_bytes() == b""  # released
