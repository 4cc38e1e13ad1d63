"""Streamed image data: cache from WebDataset tar shards (local or on the Hub) or from a Hugging Face
`datasets` stream (`streaming=True`) without downloading the whole data set first.

`StreamedImageDataset` is a forward-only, map-style `ImageDataset`: `dataset[i]` is served from the
stream in increasing order of `i` (skipping ahead reads past the samples in between without decoding
them; going back re-opens the stream and skips). So the cache writer's fixed batch grid, its resume at
an image index and a rank's non-contiguous slice of the images all work unchanged. A reader thread
keeps a small bounded buffer (`read_ahead` samples, decoded and transformed) ahead of the consumer,
so JPEG decoding overlaps the model's forward pass in one process (`num_workers=0`; with DataLoader
workers each worker opens its own stream).

Sources (`stream_sources.py`):

- `WebDatasetSource`: tar shards, members grouped by key (`<key>.jpg` + `<key>.cls`), read with Python's
  `tarfile` in stream mode. Hub shards are opened through `huggingface_hub`'s fsspec file system
  (`hf://datasets/...`), read sequentially, never written to disk; a shard already in the HF cache is
  read from there (so a populated cache works with `HF_HUB_OFFLINE=1`). The length is the number of
  keys in the shards' tar headers (counted once; `limit` avoids the count), resume skips whole shards.
- `HubStreamSource`: `datasets.load_dataset(..., streaming=True)`; resume is `IterableDataset.skip`;
  the length is the split's `num_examples` from the data set's info (or `limit`).

Identity: labels are not known before the stream is read, so a streamed data set's
`dataset_fingerprint` hashes its length and its source files (shard names relative to the data folder,
or the Hub repo and split) instead of file names and labels. A streamed cache and a local-files cache of
the same images therefore hold byte-identical shards but are *different caches*: resuming one with the
other is refused, naming `dataset_fingerprint`.
"""

from __future__ import annotations

import io
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..core.errors import MissingInputError, UsageError
from .base import HUB_DATASETS, BadImageError, ImageDataset, to_rgb
from .resources import classnames_for
from .stream_sources import (
    HubStreamSource,
    RawSample,
    StreamError,
    WebDatasetSource,
    local_shards,
    shard_count,
)

# ---------------------------------------------------------------------------------- the data set
_END, _ITEM, _ERROR = 0, 1, 2


class BadLabelError(BadImageError):
    """A sample whose label is not one of the data set's classes (exit 3; `skip_bad_images=True` skips and
    counts it, as an unreadable image)."""


class _Reader(threading.Thread):
    """Reads samples `start..` into a bounded queue, decoding those at or after `want_from`."""

    def __init__(self, source: Any, start: int, stop: int, decode: Callable[[RawSample], Any], size: int):
        super().__init__(daemon=True)
        self.source, self.start_at, self.stop_at, self.decode = source, start, stop, decode
        self.q: queue.Queue = queue.Queue(maxsize=size)
        self.want_from = start
        self.halt = threading.Event()

    def _put(self, item: tuple) -> bool:
        while not self.halt.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        i = self.start_at
        try:
            for raw in self.source.open(self.start_at):
                if i >= self.stop_at or self.halt.is_set():
                    return
                if i >= self.want_from:  # samples the consumer skipped past are not decoded
                    try:
                        item = (_ITEM, i, self.decode(raw))
                    except BadImageError as e:
                        item = (_ERROR, i, e)
                    if not self._put(item):
                        return
                i += 1
            self._put((_END, i, None))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised there)
            self._put((_ERROR, i, e))

    def close(self) -> None:
        self.halt.set()


class StreamedImageDataset(ImageDataset):
    """A forward-only map-style view of a sample stream of known length (see the module doc)."""

    def __init__(self, source: Any, n_items: int, dataset_id: str, split: str, classnames: list[str],
                 transform=None, skip_bad_images: bool = False, read_ahead: int = 64, length_from: str = ""):
        super().__init__(transform, skip_bad_images)
        if n_items < 1:
            raise StreamError(f"{dataset_id}: the stream is empty")
        self.source, self.n_items, self.read_ahead, self.length_from = source, n_items, read_ahead, length_from
        self.dataset_id, self.split, self.classnames = dataset_id, split, classnames
        self._reader: _Reader | None = None
        self._next = 0  # the index the reader will hand over next

    # ImageDataset's per-item arrays are not known before the stream is read.
    def _num_items(self) -> int:
        return self.n_items

    @property
    def labels(self) -> np.ndarray:  # type: ignore[override]
        raise AttributeError("a streamed data set's labels are known only once the stream is read")

    @property
    def subset_labels(self) -> None:  # type: ignore[override]
        return None

    @property
    def relative_paths(self) -> list[str]:  # the source files, for `dataset_fingerprint`
        return self.source.identity()

    def subset(self, n: int | None) -> "StreamedImageDataset":
        """The first `n` samples (a stream is read in order; local data sets keep `n` evenly spaced)."""
        if n is not None:
            self.n_items = min(self.n_items, n)
        return self

    def label(self, idx: int) -> int:
        raise AttributeError("a streamed data set's labels are known only once the stream is read")

    def describe(self, i: int) -> str:
        return f"sample {i} of the {self.dataset_id} stream"

    def _decode(self, raw: RawSample) -> tuple[Any, int]:
        n_classes = len(self.classnames)  # -1 is "no label" (as in `datasets`); PASS refuses it, others skip it
        if raw.label < -1 or (n_classes and raw.label >= n_classes):
            known = f"[0, {n_classes}) (the {n_classes} classes)" if n_classes else "[0, number of classes)"
            raise BadLabelError(f"{raw.where} has label {raw.label}, outside {known} and not -1 (no label)")
        if raw.image is None:
            raise BadImageError(f"cannot read image {raw.where}: the sample has no image member")
        try:
            if isinstance(raw.image, Image.Image):
                img = to_rgb(raw.image)
            else:
                with Image.open(io.BytesIO(raw.image)) as im:
                    im.load()
                    img = to_rgb(im)
        except Exception as e:  # PIL raises several types for truncated / unknown data
            raise BadImageError(f"cannot read image {raw.where}: {e}") from e
        return (self.transform(img) if self.transform is not None else img), raw.label

    def _restart(self, start: int) -> None:
        self.close()
        self._reader = _Reader(self.source, start, self.n_items, self._decode, self.read_ahead)
        self._reader.start()
        self._next = start

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __getitem__(self, pos: int):
        idx = int(self.indices[pos]) if self.indices is not None else pos  # a subset by `indices`: its samples
        if not 0 <= idx < self.n_items:
            raise IndexError(f"sample {idx} is outside the stream's {self.n_items} samples")
        if self._reader is None or idx < self._next:
            self._restart(idx)
        reader = self._reader
        reader.want_from = max(reader.want_from, idx)
        while True:
            kind, i, value = reader.q.get()
            if kind == _END:
                self.close()
                raise StreamError(
                    f"the {self.dataset_id} stream ended after {i} samples: sample {idx} was asked for and "
                    f"{self.n_items} were expected ({self.length_from or 'the stated length'}); the cache keeps "
                    "the shards written so far, pass --limit to cache fewer")
            if kind == _ERROR and not isinstance(value, BadImageError):
                self.close()
                raise value
            if i < idx:
                continue
            self._next = i + 1
            if kind == _ERROR:
                if self.skip_bad_images:
                    return None
                raise value
            x, label = value
            return x, label, pos

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: each opens its own stream
        state = dict(self.__dict__)
        state["_reader"], state["_next"] = None, 0
        return state

    def __del__(self) -> None:
        self.close()


# ---------------------------------------------------------------------------------- entry point
def load_streamed_dataset(name: str, split: str, data_dir: str | Path | None = None, transform=None,
                          limit: int | None = None, skip_bad_images: bool = False,
                          read_ahead: int = 64) -> StreamedImageDataset:
    """The streamed counterpart of `load_image_dataset` (see `data.load_image_dataset(stream=True)`):

    - `name="webdataset"`, `data_dir=DIR`: local tar shards `DIR/<split>/` (or `DIR/test/` for `val`, or
      `DIR/` itself), with `DIR/classnames.txt` when present;
    - an OOD name (`food101`, ...): CLIP-benchmark's `wds_*` repo's tar shards, streamed from the Hub;
    - `cifar100`, `tiny-imagenet`, `cub200`, an `owner/repo` or a local data set folder: a `datasets` stream.
    `limit` keeps the first `limit` samples (and spares counting a tar stream's length).
    """
    from .ood import OOD_DATASETS, SPLITS, clip_benchmark_templates, resolve_ood_name

    templates = None
    if data_dir is not None:
        if name != "webdataset":
            raise UsageError(f"--stream with --data-dir reads local WebDataset tar shards: use --dataset webdataset "
                             f"(got {name!r})")
        root = Path(data_dir).resolve()
        folder = next((d for d in (root / split, root / SPLITS.get(split, split)) if d.is_dir()), root)
        shards = local_shards(folder)
        source: Any = WebDatasetSource([str(p) for p in shards], [p.relative_to(root).as_posix() for p in shards])
        names_file = root / "classnames.txt"
        classnames = names_file.read_text().splitlines() if names_file.is_file() else None
        dataset_id, hub_repo = f"webdataset:{root.name}", None
    elif resolve_ood_name(name):
        name = resolve_ood_name(name)
        hub_repo = OOD_DATASETS[name]
        hub_split = SPLITS.get(split, split)
        n_shards = shard_count(_hub_text(hub_repo, f"{hub_split}/nshards.txt"), f"{hub_repo}/{hub_split}/nshards.txt")
        files = [f"{hub_split}/{i}.tar" for i in range(n_shards)]
        source = WebDatasetSource([_hub_shard(hub_repo, f) for f in files], [f"{hub_repo}/{f}" for f in files])
        classnames = [c.strip() for c in _hub_text(hub_repo, "classnames.txt").splitlines() if c.strip()]
        templates = clip_benchmark_templates(
            [t.strip() for t in _hub_text(hub_repo, "zeroshot_classification_templates.txt").splitlines() if t.strip()])
        dataset_id = name
    else:
        spec = HUB_DATASETS.get(name)
        hub_repo = spec["repo"] if spec else name
        source = HubStreamSource(hub_repo, spec["splits"].get(split, split) if spec else split,
                                 spec["image"] if spec else None, spec["label"] if spec else None)
        if spec and name == "tiny-imagenet":  # zh-plus/tiny-imagenet's ClassLabel names are wnids
            table = classnames_for("tiny-imagenet")
            classnames = [table[w] for w in source.label_names]
        elif spec:
            classnames = classnames_for(name)
        else:
            classnames = [n.replace("_", " ") for n in source.label_names] if source.label_names else None
        dataset_id = name
    if limit is not None:
        n, length_from = limit, f"--limit {limit}"
        if isinstance(source, HubStreamSource) and source.n_examples is not None:
            n = min(limit, source.n_examples)
    else:
        n = len(source)
        length_from = "the tar headers" if isinstance(source, WebDatasetSource) else "the data set's split info"
    ds = StreamedImageDataset(source, n, dataset_id, split, classnames or [], transform, skip_bad_images,
                              read_ahead, length_from)
    ds.hub_repo = hub_repo
    if data_dir is not None:
        ds.data_dir = Path(data_dir).resolve()
    if templates:
        ds.prompt_templates = templates
    return ds


def _hub_text(repo: str, filename: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset")).read_text()
    except Exception as e:  # offline without a cache, network errors, a missing file
        raise MissingInputError(f"cannot get {filename} of {repo} from the Hugging Face Hub or the HF cache "
                                f"({type(e).__name__})") from None


def _hub_shard(repo: str, filename: str) -> str:
    """The shard's file in the HF cache when it is there, else its `hf://` URL (streamed, not downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename, repo_type="dataset")
    return cached if isinstance(cached, str) else f"hf://datasets/{repo}/{filename}"


__all__ = ["BadLabelError", "HubStreamSource", "RawSample", "StreamError", "StreamedImageDataset", "WebDatasetSource",
           "load_streamed_dataset", "local_shards"]
