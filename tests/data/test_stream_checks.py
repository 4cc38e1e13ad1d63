"""Damaged WebDataset shards are refused, never read as fewer or other samples (issue 19, items 8, 9, 10, 16):
a tar cut at a member boundary, a key given twice, labels outside the classes, a non-numeric nshards.txt.
The shards are real tar files (Python's `tarfile`), cut or assembled as a damaged download would be."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from data.test_streaming import HOOK, N_CLASSES, tar_members, tar_samples, write_tar

from sae_lens_vision_steer import load_image_dataset
from sae_lens_vision_steer.activation_cache import cache_activations
from sae_lens_vision_steer.data.streaming import BadLabelError, StreamError


def _stream(wds: Path, **kw):
    return load_image_dataset("webdataset", "train", wds, stream=True, **kw)


def _read_all(ds) -> list[int]:
    labels = [ds[i][1] for i in range(len(ds))]
    ds.close()
    return labels


def _member_ends(path: Path) -> list[tuple[str, int]]:
    """`(member name, byte offset where its data blocks end)`: the member boundaries of a tar file."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE) for m in tar]


@pytest.mark.parametrize("cut_after", ["s0003.cls", "s0006.cls"])  # mid-archive; only the end marker missing
def test_a_tar_cut_at_a_member_boundary_is_a_stream_error(tmp_path, cut_after):
    wds = tmp_path / "wds"
    shard = wds / "train" / "0.tar"
    write_tar(shard, tar_members(tar_samples()[:7]))
    end = dict(_member_ends(shard))[cut_after]
    data = shard.read_bytes()
    if cut_after == "s0006.cls":  # the last member: only the end-of-archive (zero) blocks follow it
        assert len(data) >= end + 1024 and data[end:] == bytes(len(data) - end)
    shard.write_bytes(data[:end])
    with tarfile.open(shard) as tar:  # Python's tarfile itself reads it without a word
        assert tar.getmembers()[-1].name == cut_after
    key = cut_after.split(".")[0]
    # the length from the tar headers: refused, naming the shard and the last key
    with pytest.raises(StreamError, match=rf"tar shard train/0\.tar ends after key '{key}' .*cut short"):
        len(_stream(wds))
    # with --limit the headers are not counted first: reading the stream refuses it at the cut
    ds = _stream(wds, limit=3)
    assert _read_all(ds) == [0, 0, 0]  # the samples before the end are served while the shard is read ...
    ds = _stream(wds, limit=4 if cut_after == "s0003.cls" else 7)
    with pytest.raises(StreamError, match=rf"ends after key '{key}'"):  # ... and the cut is found at its end
        _read_all(ds)


def test_a_header_damaged_after_a_member_is_a_stream_error(tmp_path):
    """Python's tarfile also stops silently at a damaged header after the first member."""
    wds = tmp_path / "wds"
    shard = wds / "train" / "0.tar"
    write_tar(shard, tar_members(tar_samples()[:4]))
    end = dict(_member_ends(shard))["s0001.cls"]
    data = bytearray(shard.read_bytes())
    data[end:end + 512] = b"\x07" * 512
    shard.write_bytes(bytes(data))
    with pytest.raises(StreamError, match=r"tar shard train/0\.tar has a damaged header after key 's0001'"):
        len(_stream(wds))


@pytest.mark.parametrize("kind", ["key comes back", "member twice"])
def test_a_duplicate_key_is_refused_naming_the_shard_and_key(tmp_path, kind):
    samples = tar_samples()[:6]
    members = tar_members(samples)
    if kind == "key comes back":  # s0002's members again, after s0003: webdataset would yield 7 samples
        members = members[:8] + [("s0002.jpg", samples[5][1]), ("s0002.cls", b"2")] + members[8:]
    else:  # a second s0004.jpg right after the first: one sample would silently keep the second image
        members = members[:9] + [("s0004.jpg", samples[5][1])] + members[9:]
    wds = tmp_path / "wds"
    write_tar(wds / "train" / "0.tar", members)
    with pytest.raises(StreamError, match=r"tar shard train/0\.tar has key 's000[24]' twice"):
        len(_stream(wds))  # the declared length
    with pytest.raises(StreamError, match=r"tar shard train/0\.tar has key 's000[24]' twice"):
        _read_all(_stream(wds, limit=6))  # the reader (--limit: no count first), so resume cannot differ


def test_labels_outside_the_classes_are_refused_or_skipped_and_counted(tiny_clip, tmp_path):
    samples = tar_samples()
    members = tar_members(samples)
    members[2 * 4 + 1] = ("s0004.cls", b"999999")
    members[2 * 9 + 1] = ("s0009.cls", b"-3")
    wds = tmp_path / "wds"
    write_tar(wds / "train" / "0.tar", members)
    (wds / "classnames.txt").write_text("\n".join(f"class {c}" for c in range(N_CLASSES)))
    ds = _stream(wds, transform=tiny_clip.preprocess)
    with pytest.raises(BadLabelError, match=r"member s0004\.jpg of tar shard train/0\.tar has label 999999, "
                                            r"outside \[0, 3\)"):
        cache_activations(tiny_clip, ds, HOOK, tmp_path / "strict", batch_size=4, num_workers=0, show_progress=False)
    ds.close()
    ds = _stream(wds, transform=tiny_clip.preprocess, skip_bad_images=True)
    cache = cache_activations(tiny_clip, ds, HOOK, tmp_path / "skipping", batch_size=4, num_workers=0,
                              show_progress=False)
    assert cache.metadata["n_images_skipped"] == 2 and cache.metadata["request"]["n_classes"] == N_CLASSES
    assert sorted(set(range(12)) - set(cache.image_index.tolist())) == [4, 9]
    assert cache.labels.tolist() == [lab for i, (_, _, lab) in enumerate(samples) if i not in (4, 9)]


def test_a_non_numeric_nshards_txt_is_named(tmp_path):
    folder = tmp_path / "wds" / "train"
    write_tar(folder / "0.tar", tar_members(tar_samples()[:2]))
    (folder / "nshards.txt").write_text("two\n")
    with pytest.raises(StreamError, match=r"wds/train/nshards\.txt should hold the number of tar shards, but holds "
                                          r"'two'"):
        _stream(tmp_path / "wds")

