"""Streamed data (streaming.py): caching from WebDataset tar shards and from a `datasets` stream gives the
same shard bytes as caching the same images from local files; resume at a sample index; bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sae_lens_vision_steer import load_image_dataset
from sae_lens_vision_steer.activation_cache import (
    METADATA_FILE,
    cache_activations,
    dataset_fingerprint,
)
from sae_lens_vision_steer.data.base import BadImageError
from sae_lens_vision_steer.data.streaming import StreamError, load_streamed_dataset

N_CLASSES, PER_CLASS = 3, 4
HOOK = "blocks.1.hook_resid_post"


def _jpeg(rng: np.random.Generator, c: int) -> bytes:
    arr = (rng.random((40, 40, 3)) * 60 + c * 60).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tar_samples(seed: int = 0) -> list[tuple[str, bytes, int]]:
    """(key, jpeg bytes, label), class-major: the order ImageFolderDataset reads `class_c/<key>.jpg` in."""
    rng = np.random.default_rng(seed)
    return [(f"s{c * PER_CLASS + j:04d}", _jpeg(rng, c), c) for c in range(N_CLASSES) for j in range(PER_CLASS)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def tar_members(samples) -> list[tuple[str, bytes]]:
    return [m for key, data, label in samples for m in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode()))]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """The same 12 JPEGs as WebDataset shards (`wds/train/{0,1}.tar`) and as an image folder."""
    root = tmp_path_factory.mktemp("replicas")
    samples = tar_samples()
    write_tar(root / "wds" / "train" / "0.tar", tar_members(samples[:7]))
    write_tar(root / "wds" / "train" / "1.tar", tar_members(samples[7:]))
    (root / "wds" / "classnames.txt").write_text("\n".join(f"class {c}" for c in range(N_CLASSES)))
    for key, data, label in samples:
        d = root / "folder" / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.jpg").write_bytes(data)
    return root


def _shard_bytes(root: Path) -> list[bytes]:
    meta = json.loads((root / METADATA_FILE).read_text())
    return [(root / r["file"]).read_bytes() for r in meta["shards"]]


def _cache(model, ds, out: Path, **kw):
    return cache_activations(model, ds, HOOK, out, positions="all", batch_size=4, num_workers=0, shard_size=50,
                             show_progress=False, **kw)


@pytest.fixture(scope="module")
def local_cache(tiny_clip, replicas, tmp_path_factory):
    ds = load_image_dataset("imagefolder", "all", replicas / "folder", transform=tiny_clip.preprocess)
    return _cache(tiny_clip, ds, tmp_path_factory.mktemp("local") / "cache")


def test_webdataset_stream_gives_the_local_files_cache_bytes(tiny_clip, replicas, local_cache, tmp_path):
    ds = load_image_dataset("webdataset", "train", replicas / "wds", transform=tiny_clip.preprocess, stream=True)
    assert len(ds) == N_CLASSES * PER_CLASS and ds.classnames[1] == "class 1"  # length from the tar headers
    cache = _cache(tiny_clip, ds, tmp_path / "streamed")
    assert cache.n_shards == local_cache.n_shards > 1
    assert _shard_bytes(cache.root) == _shard_bytes(local_cache.root)
    np.testing.assert_array_equal(cache.labels, np.repeat(np.arange(N_CLASSES), PER_CLASS * 17))
    # The identity: different caches (the fingerprint hashes the source shards, not files and labels) ...
    assert cache.metadata["request"]["dataset_fingerprint"] != local_cache.metadata["request"]["dataset_fingerprint"]
    assert cache.metadata["dataset"] == "webdataset:wds"
    # ... and the fingerprint follows the selection: the first 10 samples are another request.
    first10 = load_image_dataset("webdataset", "train", replicas / "wds", transform=tiny_clip.preprocess,
                                 stream=True, limit=10)
    assert len(first10) == 10 and dataset_fingerprint(first10) != dataset_fingerprint(ds)


def test_items_out_of_order_and_in_a_worker(tiny_clip, replicas):
    """Skipping ahead and going back (a rank's slices, a resume) give the same items as local files."""
    local = load_image_dataset("imagefolder", "all", replicas / "folder", transform=tiny_clip.preprocess)
    ds = load_streamed_dataset("webdataset", "train", replicas / "wds", transform=tiny_clip.preprocess, read_ahead=2)
    for i in (0, 1, 9, 10, 3, 11, 2):
        x, label, idx = ds[i]
        x0, label0, _ = local[i]
        assert idx == i and label == label0 and torch.equal(x, x0)
    with pytest.raises(IndexError):
        ds[12]
    ds.indices = np.array([1, 5, 9])  # a subset by indices (as a slicing helper sets it): those samples
    assert len(ds) == 3 and ds[1][2] == 1 and torch.equal(ds[1][0], local[5][0]) and ds[2][1] == local[9][1]
    ds.indices = None
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=1)  # the worker opens its own stream
    got = torch.cat([b[1] for b in loader])
    assert got.tolist() == [int(local.labels[i]) for i in range(len(local))]


class _Transform:
    """The model's preprocessing (same repr, so the same cache request), counting its calls; Ctrl-C at call `stop`."""

    def __init__(self, preprocess, stop: int | None = None):
        self.preprocess, self.stop, self.calls = preprocess, stop, 0

    def __call__(self, img):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.preprocess(img)

    def __repr__(self) -> str:
        return repr(self.preprocess)


def test_resume_after_an_interruption_at_a_sample_index(tiny_clip, replicas, local_cache, tmp_path):
    out = tmp_path / "cache"
    ds = load_image_dataset("webdataset", "train", replicas / "wds", transform=_Transform(tiny_clip.preprocess, 10),
                            stream=True)
    with pytest.raises(KeyboardInterrupt):  # while sample 9 is read: batches [0, 4) and [4, 8) are done
        _cache(tiny_clip, ds, out)
    ds.close()
    meta = json.loads((out / METADATA_FILE).read_text())
    assert not meta["complete"] and len(meta["shards"]) == 2  # 100 rows: images 0..4 and 15 rows of image 5
    counting = _Transform(tiny_clip.preprocess)
    again = load_image_dataset("webdataset", "train", replicas / "wds", transform=counting, stream=True)
    cache = _cache(tiny_clip, again, out)
    assert _shard_bytes(cache.root) == _shard_bytes(local_cache.root)
    assert counting.calls == 8  # the stream was skipped to image 4 (the batch [4, 8) holding image 5), not decoded


def test_a_stream_that_ends_early(tiny_clip, replicas, tmp_path):
    ds = load_image_dataset("webdataset", "train", replicas / "wds", transform=tiny_clip.preprocess, stream=True,
                            limit=20)
    assert len(ds) == 20  # the user's --limit, more than the shards hold
    out = tmp_path / "cache"
    with pytest.raises(StreamError, match=r"ended after 12 samples: sample 12 was asked for and 20 were expected "
                                          r"\(--limit 20\)"):
        _cache(tiny_clip, ds, out)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert not meta["complete"] and len(meta["shards"]) == 4  # what was cached before stays


def test_a_corrupt_member(tiny_clip, replicas, local_cache, tmp_path):
    samples = tar_samples()
    members = tar_members(samples[:7])
    members[2 * 5] = ("s0005.jpg", b"not a jpeg" * 10)
    wds = tmp_path / "wds"
    write_tar(wds / "train" / "0.tar", members)
    write_tar(wds / "train" / "1.tar", tar_members(samples[7:]))
    ds = load_image_dataset("webdataset", "train", wds, transform=tiny_clip.preprocess, stream=True)
    with pytest.raises(BadImageError, match=r"member s0005\.jpg of tar shard train/0\.tar"):
        _cache(tiny_clip, ds, tmp_path / "strict")
    ds = load_image_dataset("webdataset", "train", wds, transform=tiny_clip.preprocess, stream=True,
                            skip_bad_images=True)
    cache = _cache(tiny_clip, ds, tmp_path / "skipping")
    assert cache.metadata["n_images_skipped"] == 1
    assert 5 not in set(cache.image_index.tolist())
    kept = np.nonzero(local_cache.image_index != 5)[0]
    torch.testing.assert_close(cache.load(HOOK), local_cache.load(HOOK, rows=kept), rtol=0, atol=0)
    # A damaged tar file (cut in the middle of a member) names the shard.
    data = (wds / "train" / "1.tar").read_bytes()
    (wds / "train" / "1.tar").write_bytes(data[:len(data) // 2 + 100])
    ds = load_image_dataset("webdataset", "train", wds, transform=tiny_clip.preprocess, stream=True, limit=12,
                            skip_bad_images=True)
    with pytest.raises(StreamError, match=r"tar shard train/1\.tar is damaged"):
        _cache(tiny_clip, ds, tmp_path / "damaged")


def _write_hub_replica(root: Path, samples) -> Path:
    """A `datasets` repo layout: `data/train-00000-of-00001.parquet` + README.md with the split info."""
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    hf = datasets.Dataset.from_dict({"image": [{"bytes": d, "path": None} for _, d, _ in samples],
                                     "label": [lab for _, _, lab in samples]}, features=feats)
    (root / "data").mkdir(parents=True)
    hf.to_parquet(root / "data" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\ndataset_info:\n  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n"
        "      class_label:\n        names:\n          '0': a\n          '1': b\n          '2': c\n"
        f"  splits:\n  - name: train\n    num_bytes: {sum(len(d) for _, d, _ in samples)}\n"
        f"    num_examples: {len(samples)}\n"
        "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n")
    return root


def test_datasets_stream_gives_the_local_files_cache_bytes(tiny_clip, local_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    repo = _write_hub_replica(tmp_path / "repo", tar_samples())
    ds = load_image_dataset(str(repo), "train", transform=tiny_clip.preprocess, stream=True)
    assert len(ds) == 12 and ds.classnames == ["a", "b", "c"]  # length from the split info
    cache = _cache(tiny_clip, ds, tmp_path / "cache")
    assert _shard_bytes(cache.root) == _shard_bytes(local_cache.root)
    short = load_image_dataset(str(repo), "train", transform=tiny_clip.preprocess, stream=True, limit=5)
    assert len(short) == 5 and torch.equal(short[4][0], ds[4][0])


def test_cli_stream_bad_inputs(replicas, tmp_path, capsys):
    """`vision-steer cache --stream`: a corrupt member and an early end are one line each with exit code 3;
    --skip-bad-images caches the rest and counts the skipped image."""
    from conftest import TINY_CLIP_KWARGS

    from sae_lens_vision_steer.cli import main
    from sae_lens_vision_steer.cli.common import EXIT_INPUT

    samples = tar_samples()
    members = tar_members(samples)
    members[2 * 3] = ("s0003.jpg", b"\xff\xd8 truncated")
    wds = tmp_path / "wds"
    write_tar(wds / "train" / "0.tar", members)

    def cache(out, *extra):
        return main(["cache", "--random-weights", "--seed", "0", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS),
                     "--device", "cpu", "--stream", "--dataset", "webdataset", "--data-dir", str(wds), "--split",
                     "train", "--hook", HOOK, "--batch-size", "4", "--no-progress", "--out", str(tmp_path / out),
                     *extra])

    assert cache("a") == EXIT_INPUT
    err = capsys.readouterr().err
    assert "member s0003.jpg of tar shard train/0.tar" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert cache("b", "--skip-bad-images") == 0
    assert "11 images (1 skipped)" in capsys.readouterr().out
    assert cache("c", "--skip-bad-images", "--limit", "15") == EXIT_INPUT
    err = capsys.readouterr().err
    assert "ended after 12 samples" in err and "15 were expected (--limit 15)" in err and "Traceback" not in err


def test_hub_webdataset_shards_from_the_hf_cache(tmp_path, monkeypatch):
    """An OOD data set's CLIP-benchmark shards (clip-benchmark/wds_food101 replica, offline): the stream
    reads the shards the HF cache holds, with the repo's class names and templates; length from the headers."""
    import huggingface_hub.constants as hf_constants
    from data.test_ood_datasets import write_replica

    cache = tmp_path / "hub"
    names = [f"food {c}" for c in range(4)]
    write_replica(cache, "clip-benchmark/wds_food101", names, ["a photo of {c}, a type of food."],
                  {"test": [[3, 0, 2], [1]]})
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    ds = load_image_dataset("food101", "val", stream=True)
    assert (ds.dataset_id, ds.hub_repo, len(ds), ds.classnames) == ("food101", "clip-benchmark/wds_food101", 4, names)
    assert ds.prompt_templates == ["a photo of {}, a type of food."]
    assert ds.relative_paths == ["clip-benchmark/wds_food101/test/0.tar", "clip-benchmark/wds_food101/test/1.tar"]
    items = [ds[i] for i in range(4)]
    assert [y for _, y, _ in items] == [3, 0, 2, 1]
    assert [img.getpixel((0, 0)) for img, _, _ in items] == [(20 * y + 10,) * 3 for y in (3, 0, 2, 1)]
