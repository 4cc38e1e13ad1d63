"""Sample sources for streamed data sets (`streaming.py`): WebDataset tar shards (local paths or `hf://`
URLs, read with Python's `tarfile` in stream mode, members grouped by key) and Hugging Face `datasets`
streams (`streaming=True`). Each has `open(start)` (samples `start, start + 1, ...`), `len()` and
`identity()` (what a cache's `dataset_fingerprint` hashes).
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from ..core.errors import InputError, MissingInputError, UsageError
from .files import open_regular_file

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


class StreamError(InputError):
    """A stream that cannot be read as asked: it ended early, a shard is damaged, its length is unknown."""


@dataclass
class RawSample:
    where: str  # names the shard and member (or the Hub item), for error messages
    image: bytes | Image.Image | None
    label: int


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---------------------------------------------------------------------------------- WebDataset tars
class WebDatasetSource:
    """WebDataset tar shards (local paths or `hf://` URLs), in the given order."""

    def __init__(self, shards: Sequence[str], names: Sequence[str] | None = None, label_ext: str = "cls"):
        if not shards:
            raise StreamError("no tar shards given")
        self.shards = [str(s) for s in shards]
        self.names = list(names) if names is not None else [Path(s).name for s in self.shards]
        self.label_ext = label_ext
        self._counts: list[int] | None = None

    def _open_file(self, shard: str):
        if shard.startswith("hf://"):
            from huggingface_hub import HfFileSystem

            return HfFileSystem().open(shard, "rb", block_size=2**20)  # sequential ranged reads, not a download
        return open(shard, "rb")

    def shard_counts(self) -> list[int]:
        """Samples in each shard, from the tar headers (seeks past the data). A shard without its
        end-of-archive marker, or with a key that appears twice, is refused (`StreamError`)."""
        if self._counts is None:
            counts = []
            for shard, name in zip(self.shards, self.names):
                keys = _Keys(name)
                try:
                    with self._open_file(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                        for m in tar:
                            if m.isfile():
                                keys.add(m.name)
                        _check_end(f, tar, name, keys.last)
                except (tarfile.TarError, EOFError, OSError) as e:
                    raise StreamError(f"tar shard {name} cannot be read ({type(e).__name__}: {e})") from None
                counts.append(keys.n_samples)
            self._counts = counts
        return self._counts

    def __len__(self) -> int:
        return sum(self.shard_counts())

    def identity(self) -> list[str]:
        return list(self.names)

    def open(self, start: int = 0) -> Iterator[RawSample]:
        """Samples `start, start + 1, ...`: whole shards before `start` are skipped when their counts are
        known, the rest are read past (no decoding)."""
        first_shard, skip = 0, start
        if self._counts is not None:
            while first_shard < len(self.shards) and skip >= self._counts[first_shard]:
                skip -= self._counts[first_shard]
                first_shard += 1
        for s in range(first_shard, len(self.shards)):
            for sample in self._read_shard(s):
                if skip:
                    skip -= 1
                    continue
                yield sample

    def _read_shard(self, s: int) -> Iterator[RawSample]:
        name, label_ext = self.names[s], self.label_ext
        key, parts = None, {}

        def emit() -> RawSample:
            where = f"sample {key!r} of tar shard {name}"
            image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
            if label_ext not in parts:
                raise StreamError(f"{where} has no .{label_ext} member (it has {sorted(parts)})")
            try:
                label = int(parts[label_ext].decode().strip())
            except ValueError:
                raise StreamError(f"{where}: .{label_ext} is not a whole number: {parts[label_ext][:20]!r}") from None
            return RawSample(f"member {key}.{image_ext or '?'} of tar shard {name}",
                             parts[image_ext] if image_ext else None, label)

        keys = _Keys(name)
        try:
            with self._open_file(self.shards[s]) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    k, ext, new = keys.add(m.name)
                    if new and key is not None:
                        yield emit()
                        parts = {}
                    key = k
                    parts[ext] = tar.extractfile(m).read()
                _check_end(f, tar, name, key)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise StreamError(f"tar shard {name} is damaged after key {key!r} ({type(e).__name__}: {e}); "
                              "download it again or leave it out") from None
        if key is not None:
            yield emit()


class _Keys:
    """WebDataset's grouping of a shard's members into samples (consecutive members with one key), with
    the checks that keep the samples read equal to the samples counted: a key that comes back after
    another key, or a member name given twice, is refused naming the shard and the key."""

    def __init__(self, shard: str):
        self.shard, self.done, self.last, self.exts = shard, set(), None, set()
        self.n_samples = 0

    def add(self, member: str) -> tuple[str, str, bool]:
        """`(key, extension (lower case), whether it starts a new sample)` of a file member."""
        key, ext = _split_name(member)
        ext = ext.lower()
        if key != self.last:
            if key in self.done:
                raise StreamError(f"tar shard {self.shard} has key {key!r} twice (member {member} comes after other "
                                  "keys): each sample's members must be stored together, under a key of its own")
            if self.last is not None:
                self.done.add(self.last)
            self.last, self.exts = key, set()
            self.n_samples += 1
            new = True
        else:
            new = False
        if ext in self.exts:
            raise StreamError(f"tar shard {self.shard} has key {key!r} twice (a second .{ext} member {member}): "
                              "each sample needs a key of its own")
        self.exts.add(ext)
        return key, ext, new


def _check_end(f: Any, tar: tarfile.TarFile, name: str, last_key: str | None) -> None:
    """A tar ends with zero blocks; `tarfile` also stops, silently, where the file ends at a member boundary
    (or in a damaged header). Then samples were lost: refused, naming the shard and the last key read."""
    f.seek(tar.offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        where = f"after key {last_key!r}" if last_key is not None else "at its start"
        problem = "ends" if not block else "has a damaged header"
        raise StreamError(f"tar shard {name} {problem} {where} (byte {tar.offset}) without the tar end-of-archive "
                          "marker: it was cut short (samples are missing); download it again or leave it out")


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def shard_count(text: bytes | str, where: str) -> int:
    """The number in an `nshards.txt` (`where` names the file in the error)."""
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    try:
        n = int(raw.strip())
    except ValueError:
        raise StreamError(f"{where} should hold the number of tar shards, but holds {raw.strip()[:40]!r}") from None
    if n < 1:
        raise StreamError(f"{where} says there are {n} tar shards; it should be at least 1")
    return n


def local_shards(folder: Path) -> list[Path]:
    """`folder/nshards.txt` (CLIP-benchmark: `0.tar .. n-1.tar`) or every `*.tar`, in natural order."""
    n_file = folder / "nshards.txt"
    if n_file.is_file():
        shards = [folder / f"{i}.tar" for i in range(shard_count(n_file.read_bytes(), str(n_file)))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise MissingInputError(f"{folder}: shards {missing[:3]} listed by nshards.txt are missing")
        return shards
    shards = sorted(folder.glob("*.tar"), key=lambda p: _natural_key(p.name))
    if not shards:
        raise MissingInputError(f"no .tar shards in {folder}")
    return shards


# ---------------------------------------------------------------------------------- HF datasets streams
class HubStreamSource:
    """A `datasets` split loaded with `streaming=True` (a Hub repo id or a local data set folder)."""

    def __init__(self, path: str, split: str, image_column: str | None = None, label_column: str | None = None,
                 **load_kwargs: Any):
        import datasets

        try:
            ds = datasets.load_dataset(path, split=split, streaming=True, **load_kwargs)
        except ValueError as e:  # an unknown split
            raise UsageError(f"{path}: cannot stream split {split!r}: {e}") from e
        features = ds.features or {}
        self.image_column = image_column or _find(features, "Image", path)
        self.label_column = label_column or _find(features, "ClassLabel", path)
        # Raw bytes: we decode ourselves, so that an undecodable item is named (and can be skipped).
        self.ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.path, self.split = path, split
        self.label_names = getattr(features.get(self.label_column), "names", None)
        splits = getattr(ds.info, "splits", None) or {}
        info = splits.get(split) if hasattr(splits, "get") else None
        self.n_examples = int(info.num_examples) if info is not None and info.num_examples else None

    def __len__(self) -> int:
        if self.n_examples is None:
            raise StreamError(f"{self.path} does not say how many examples split {self.split!r} has; pass --limit N")
        return self.n_examples

    def identity(self) -> list[str]:
        return [f"datasets-stream:{self.path}:{self.split}"]

    def open(self, start: int = 0) -> Iterator[RawSample]:
        ds = self.ds.skip(start) if start else self.ds
        for i, row in enumerate(ds, start):
            img = row[self.image_column]
            data = img.get("bytes") if isinstance(img, dict) else img
            if data is None and isinstance(img, dict) and img.get("path"):
                with open_regular_file(img["path"]) as f:  # a FIFO: refused naming it, not waited on
                    data = f.read()
            yield RawSample(f"item {i} of {self.path}/{self.split}", data, int(row[self.label_column]))


def _find(features: Any, kind: str, path: str) -> str:
    for name, feat in features.items():
        if type(feat).__name__ == kind:
            return name
    raise UsageError(f"{path}: no {kind} column among {list(features)}; name it explicitly")


__all__ = ["HubStreamSource", "RawSample", "StreamError", "WebDatasetSource", "local_shards", "shard_count"]
