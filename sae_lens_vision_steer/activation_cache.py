"""A disk cache of CLIP image-tower activations, written in fixed-size shards, and its reader.

Layout of a cache folder::

    metadata.json              what was cached and how; per-shard row counts and sha256; statistics
    shard_00000.safetensors    `acts/<hook>` [rows, d_in] for every hook, `labels`, `image_index`
    shard_00001.safetensors    (and per-shard float64 sums `stats/<hook>/...` the statistics come from)
    ...
    labels.npy, image_index.npy   int64 [n_rows], copied out of the shards when the cache is complete

Rows are images x positions (`cls`: 1 row per image; `patches`: one per patch token; `all`: every
token), in data-set order. Shard `s` holds rows `s * shard_size .. (s + 1) * shard_size - 1`, so shard
boundaries depend only on the row index. Images are pushed through the model in batches laid on a
fixed grid of image indices (`[0, B)`, `[B, 2B)`, ...), whatever the start, so a resumed run feeds the
model the same batches and writes the same bytes as an uninterrupted one.

Writes are atomic (temp file + `os.replace`); `metadata.json` is rewritten after every shard, so an
interrupted run resumes at the first unwritten shard. Statistics are combined from per-shard float64
sums stored in the shards, so a resumed run's metadata equals an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import safetensors.torch
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import ImageDataset, collate_images
from .hooked_clip import HookedCLIP

Positions = Literal["cls", "patches", "all"]
POSITIONS = ("cls", "patches", "all")
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SHARD_PATTERN = "shard_{:05d}.safetensors"
DEFAULT_SHARD_SIZE = 8192
STATS_BLOCK_ROWS = 1024
HEAD_HOOKS = ("hook_ln_post", "hook_image_embed")  # [B, D]: the pooled CLS only

# Fields of the request that must agree for a cache to be reused or resumed.
IDENTITY_FIELDS = (
    "model_name", "pretrained", "model_fingerprint", "preprocess", "hook_names", "d_in", "positions",
    "rows_per_image", "dtype", "dataset", "split", "n_images", "dataset_fingerprint", "shard_size",
)


class CacheError(ValueError):
    """A cache folder that cannot be used as asked (mismatch, corruption, bad values)."""


class CacheMismatchError(CacheError):
    pass


class CorruptCacheError(CacheError):
    pass


class NonFiniteActivationsError(CacheError):
    pass


# ---------------------------------------------------------------------------------- small helpers
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        tmp = f.name
    os.chmod(tmp, _file_mode())  # temp files are created 0600; give the file the usual permissions
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    # The same as cli.common.write_json_atomic, kept here so the library does not import the CLI.
    _write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def model_fingerprint(model: HookedCLIP) -> str:
    """sha256 over the image tower's weights: tells apart two random-weight models of one name."""
    h = hashlib.sha256()
    for name, t in model.visual.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())  # hashed in place, no copy
    return h.hexdigest()[:16]


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """sha256 over the selected items and their labels (changes with `limit` and with the split)."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    indices = getattr(dataset, "indices", None)
    if indices is not None:
        h.update(np.asarray(indices, dtype=np.int64).tobytes())
    labels = getattr(dataset, "subset_labels", None)
    if labels is not None:
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _stable_repr(obj: Any) -> str:
    """`repr` without memory addresses (a Lambda transform's repr has one), so it compares across runs."""
    import re

    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def rows_per_image(model: HookedCLIP, positions: str) -> int:
    return {"cls": 1, "patches": model.cfg.n_tokens - 1, "all": model.cfg.n_tokens}[positions]


def select_positions(act: torch.Tensor, positions: str) -> torch.Tensor:
    """`[B, T, D]` (or `[B, D]` for head hooks) -> rows `[B * P, D]`, image-major."""
    if act.ndim == 2:
        return act  # head hooks: one pooled CLS vector per image
    if positions == "cls":
        return act[:, 0]
    if positions == "patches":
        return act[:, 1:].reshape(-1, act.shape[-1])
    return act.reshape(-1, act.shape[-1])


def _normalise_hooks(model: HookedCLIP, hook_names: str | Sequence[str], positions: str) -> list[str]:
    names = [hook_names] if isinstance(hook_names, str) else list(dict.fromkeys(hook_names))
    if not names:
        raise ValueError("no hook names given")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    for name in names:
        model.check_hook_name(name)
        if name in HEAD_HOOKS and positions != "cls":
            raise ValueError(f"hook {name!r} holds only the pooled CLS vector; use positions='cls'")
    return names


# ---------------------------------------------------------------------------------- writer
@dataclass
class _ShardBuffer:
    """Preallocated rows for one shard (bounded memory: one shard per hook at a time)."""

    hooks: list[str]
    d_in: dict[str, int]
    size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        self.acts = {h: torch.empty(self.size, self.d_in[h], dtype=self.dtype) for h in self.hooks}
        self.labels = np.empty(self.size, dtype=np.int64)
        self.image_index = np.empty(self.size, dtype=np.int64)
        self.n = 0

    def add(self, acts: dict[str, torch.Tensor], labels: np.ndarray, image_index: np.ndarray, start: int) -> int:
        """Copy rows `start ..` of the given batch into the free space; return how many were taken."""
        take = min(self.size - self.n, len(labels) - start)
        for h in self.hooks:
            self.acts[h][self.n:self.n + take] = acts[h][start:start + take]
        self.labels[self.n:self.n + take] = labels[start:start + take]
        self.image_index[self.n:self.n + take] = image_index[start:start + take]
        self.n += take
        return take


def _shard_tensors(buf: _ShardBuffer) -> dict[str, torch.Tensor]:
    n = buf.n
    tensors: dict[str, torch.Tensor] = {
        "labels": torch.from_numpy(buf.labels[:n].copy()),
        "image_index": torch.from_numpy(buf.image_index[:n].copy()),
    }
    for h in buf.hooks:
        acts = buf.acts[h][:n].contiguous()
        tensors[f"acts/{h}"] = acts
        total = np.zeros(acts.shape[1], dtype=np.float64)
        sum_norm = sum_sq_norm = max_abs = 0.0
        # float64 numpy reductions over fixed row blocks (the same bits whatever torch's thread count),
        # a block at a time so that the float64 copy stays small.
        for block in acts.split(STATS_BLOCK_ROWS):
            x = block.double().numpy()
            sq_norm = np.einsum("ij,ij->i", x, x)
            total += x.sum(axis=0)
            sum_norm += float(np.sqrt(sq_norm).sum())
            sum_sq_norm += float(sq_norm.sum())
            max_abs = max(max_abs, float(np.abs(x).max(initial=0.0)))
        tensors[f"stats/{h}/sum"] = torch.from_numpy(total)
        for key, value in (("sum_norm", sum_norm), ("sum_sq_norm", sum_sq_norm), ("max_abs", max_abs)):
            tensors[f"stats/{h}/{key}"] = torch.tensor([value], dtype=torch.float64)
    return tensors


def _request(model: HookedCLIP, dataset: ImageDataset, hooks: list[str], positions: str, dtype: str,
             shard_size: int) -> dict[str, Any]:
    transform = getattr(dataset, "transform", None)
    preprocess = _stable_repr(transform if transform is not None else model.preprocess)
    if transform is not None and preprocess != _stable_repr(model.preprocess):
        warnings.warn("the data set's transform differs from model.preprocess; caching with the data set's", stacklevel=3)
    return {
        "model_name": model.cfg.model_name,
        "pretrained": model.cfg.pretrained,
        "model_fingerprint": model_fingerprint(model),
        "preprocess": preprocess,
        "hook_names": hooks,
        "d_in": {h: model.hook_width(h) for h in hooks},
        "positions": positions,
        "rows_per_image": rows_per_image(model, positions),
        "dtype": dtype,
        "dataset": getattr(dataset, "dataset_id", type(dataset).__name__),
        "split": getattr(dataset, "split", None),
        "n_images": len(dataset),
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "shard_size": shard_size,
    }


def describe_mismatch(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    diffs = []
    for key in IDENTITY_FIELDS:
        if found.get(key) != wanted.get(key):
            a, b = repr(found.get(key)), repr(wanted.get(key))
            if len(a) + len(b) > 200:  # e.g. preprocessing reprs: say that, not the whole text
                a, b = a[:90] + "...", b[:90] + "..."
            diffs.append(f"{key}: cache has {a}, request has {b}")
    return diffs


def _valid_shard_prefix(root: Path, records: list[dict[str, Any]]) -> int:
    """How many of the recorded shards are present and intact (checked by size and sha256)."""
    for i, rec in enumerate(records):
        path = root / rec["file"]
        if not path.is_file() or path.stat().st_size != rec["nbytes"] or _sha256_bytes(path.read_bytes()) != rec["sha256"]:
            warnings.warn(f"{path} is missing or damaged; re-caching from shard {i}", stacklevel=3)
            return i
    return len(records)


@contextlib.contextmanager
def _exclusive_writer(root: Path) -> Iterator[None]:
    """One writer per cache folder (an advisory `flock` on `.lock`, released when the process ends)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no guard
        yield
        return
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, _file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise CacheError(f"another process (pid {holder}) is writing the cache in {root}; "
                             "wait for it to finish or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_cache_files(root: Path) -> None:
    """Delete what a cache run writes (and nothing else in the folder)."""
    for p in list(root.glob("shard_*.safetensors")) + [root / METADATA_FILE, root / "labels.npy", root / "image_index.npy"]:
        if p.exists():
            p.unlink()
    for p in root.glob(".*.tmp"):
        p.unlink()


def cache_activations(
    model: HookedCLIP,
    dataset: ImageDataset,
    hook_names: str | Sequence[str],
    out_dir: str | Path,
    positions: Positions = "cls",
    dtype: str = "float16",
    batch_size: int = 256,
    num_workers: int = 2,
    shard_size: int = DEFAULT_SHARD_SIZE,
    show_progress: bool = True,
    overwrite: bool = False,
) -> "ActivationCache":
    """Run `dataset` through `model` once and store the activations at `hook_names` in `out_dir`.

    All hooks come from one forward pass that stops after the deepest block needed (head hooks
    `hook_ln_post`/`hook_image_embed` need the full pass). An existing complete cache made with the same
    request is returned as is; an incomplete one is resumed; one made differently is refused (naming
    what differs) unless `overwrite=True`. Memory stays bounded: one shard per hook plus one batch.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {list(CACHE_DTYPES)}, got {dtype!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be positive")
    hooks = _normalise_hooks(model, hook_names, positions)
    n_images = len(dataset)
    if n_images == 0:
        raise ValueError("the data set is empty: nothing to cache")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    request = _request(model, dataset, hooks, positions, dtype, shard_size)
    with _exclusive_writer(root):
        return _cache_locked(model, dataset, hooks, request, root, positions, dtype, batch_size, num_workers,
                             shard_size, show_progress, overwrite)


def _cache_locked(model, dataset, hooks, request, root, positions, dtype, batch_size, num_workers, shard_size,
                  show_progress, overwrite) -> "ActivationCache":
    n_images = len(dataset)
    meta_path = root / METADATA_FILE
    if overwrite:
        _remove_cache_files(root)
    meta: dict[str, Any] | None = None
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        diffs = describe_mismatch(meta.get("request", {}), request)
        if diffs:
            raise CacheMismatchError(
                f"{root} holds a cache made differently from this request ({'; '.join(diffs)}). "
                "Use another folder, or overwrite=True (--overwrite) to replace it."
            )
        if meta.get("complete"):
            return ActivationCache.open(root)
        if meta.get("batch_size") != batch_size:
            warnings.warn(f"resuming with batch_size={batch_size}, the run began with {meta.get('batch_size')}: "
                          "activations may differ from an uninterrupted run in the last bit", stacklevel=2)
    elif any(root.glob("shard_*.safetensors")):
        raise CacheError(f"{root} has shard files but no {METADATA_FILE}; use overwrite=True to start again")

    import sae_lens_vision_steer

    records: list[dict[str, Any]] = list(meta["shards"]) if meta else []
    records = records[:_valid_shard_prefix(root, records)]
    for extra in sorted(root.glob("shard_*.safetensors"))[len(records):]:
        extra.unlink()  # written after the last metadata update: not trusted, redone
    meta = {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "request": request,
        **{k: request[k] for k in ("model_name", "pretrained", "hook_names", "d_in", "positions", "dtype",
                                   "dataset", "split", "n_images")},
        "package_version": sae_lens_vision_steer.__version__,
        "batch_size": batch_size if not meta else meta.get("batch_size", batch_size),
        "shards": records,
    }
    _write_json_atomic(meta_path, meta)

    P = request["rows_per_image"]
    rows_done = sum(r["n_rows"] for r in records)
    start_image, skip_rows = 0, 0
    if records:
        with safetensors.safe_open(root / records[-1]["file"], "pt") as f:
            last_image = int(f.get_slice("image_index")[-1:][0])
        # Every kept image contributes exactly P consecutive rows.
        skip_rows = rows_done % P
        start_image = last_image if skip_rows else last_image + 1

    if start_image < n_images:
        _run_forward_and_write(model, dataset, hooks, request, root, meta, records, positions, dtype,
                               batch_size, num_workers, shard_size, start_image, skip_rows, rows_done, show_progress)
    return _finalise(root, meta)


def _run_forward_and_write(model, dataset, hooks, request, root, meta, records, positions, dtype, batch_size,
                           num_workers, shard_size, start_image, skip_rows, rows_done, show_progress) -> None:
    n_images = len(dataset)
    torch_dtype = CACHE_DTYPES[dtype]
    layers = [model.hook_layer(h) for h in hooks]
    # TransformerLens semantics: stop_at_layer=n runs blocks 0..n-1. Head hooks need the whole tower.
    stop_at = None if max(layers) >= model.cfg.n_layers else max(layers) + 1
    P = request["rows_per_image"]

    # A fixed grid of batches over image indices, so that resuming does not change batch composition.
    first_batch = start_image // batch_size
    grid = [list(range(b * batch_size, min((b + 1) * batch_size, n_images)))
            for b in range(first_batch, (n_images + batch_size - 1) // batch_size)]
    loader = DataLoader(dataset, batch_sampler=grid, num_workers=num_workers, collate_fn=collate_images,
                        prefetch_factor=4 if num_workers > 0 else None)
    buf = _ShardBuffer(hooks, request["d_in"], shard_size, torch_dtype)
    shard_idx = len(records)
    pbar = tqdm(total=n_images, initial=start_image, desc="Caching activations", unit="img", disable=not show_progress)
    model.eval()
    for batch in loader:
        keep = batch.indices >= start_image
        pbar.update(int(keep.sum()) + batch.n_skipped)
        if not keep.any():
            continue
        images, labels, indices = batch.images[keep], batch.labels[keep], batch.indices[keep]
        with torch.inference_mode():
            _, act_cache = model.run_with_cache(images.to(model.device), names_filter=hooks, stop_at_layer=stop_at)
            acts = {h: select_positions(act_cache[h], positions).to("cpu", torch_dtype) for h in hooks}
        del act_cache
        row_labels = labels.numpy().repeat(P)
        row_images = indices.numpy().repeat(P)
        start = 0
        if skip_rows and indices[0].item() == start_image:
            start, skip_rows = skip_rows, 0  # the part of this image the last complete shard already holds
        while start < len(row_labels):
            start += buf.add(acts, row_labels, row_images, start)
            if buf.n == shard_size:
                _flush_shard(root, meta, records, buf, shard_idx, rows_done)
                rows_done += buf.n
                shard_idx += 1
                buf.n = 0
    pbar.close()
    if buf.n:
        _flush_shard(root, meta, records, buf, shard_idx, rows_done)


def _flush_shard(root: Path, meta: dict[str, Any], records: list[dict[str, Any]], buf: _ShardBuffer,
                 shard_idx: int, first_row: int) -> None:
    for h in buf.hooks:
        finite = torch.isfinite(buf.acts[h][:buf.n]).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise NonFiniteActivationsError(
                f"non-finite activations at hook {h!r} in shard {shard_idx} ({SHARD_PATTERN.format(shard_idx)}; "
                f"rows {first_row}..{first_row + buf.n - 1}, first bad row {first_row + bad} = image "
                f"{int(buf.image_index[bad])}). With dtype {meta['dtype']!r} this is often an overflow: "
                "try dtype='float32'. Nothing of this shard was written."
            )
    data = safetensors.torch.save(_shard_tensors(buf))
    name = SHARD_PATTERN.format(shard_idx)
    _write_bytes_atomic(root / name, data)
    records.append({"file": name, "first_row": first_row, "n_rows": buf.n, "nbytes": len(data),
                    "sha256": _sha256_bytes(data)})
    meta["shards"] = records
    _write_json_atomic(root / METADATA_FILE, meta)


def _finalise(root: Path, meta: dict[str, Any]) -> "ActivationCache":
    records = meta["shards"]
    if not records:
        raise CacheError(f"no activations were cached in {root} (every image unreadable?)")
    hooks = meta["hook_names"]
    sums = {h: {k: None for k in ("sum", "sum_norm", "sum_sq_norm", "max_abs")} for h in hooks}
    labels, image_index = [], []
    for rec in records:  # fixed order: identical float64 totals however the run was interrupted
        with safetensors.safe_open(root / rec["file"], "np") as f:
            labels.append(f.get_tensor("labels"))
            image_index.append(f.get_tensor("image_index"))
            for h in hooks:
                for k, acc in sums[h].items():
                    v = f.get_tensor(f"stats/{h}/{k}")
                    sums[h][k] = v if acc is None else (np.maximum(acc, v) if k == "max_abs" else acc + v)
    n_rows = sum(r["n_rows"] for r in records)
    stats = {}
    for h in hooks:
        mean = sums[h]["sum"] / n_rows
        mean_sq_norm = float(sums[h]["sum_sq_norm"][0] / n_rows)
        mean_norm = float(sums[h]["sum_norm"][0] / n_rows)
        stats[h] = {
            "mean": mean.tolist(),
            "mean_norm": mean_norm,
            "mean_sq_norm": mean_sq_norm,
            "norm_std": float(np.sqrt(max(mean_sq_norm - mean_norm**2, 0.0))),
            # E||x - mu||^2: the squared error of the mean-only reconstruction (FVU denominator).
            "mean_sq_dist_to_mean": float(max(mean_sq_norm - float(mean @ mean), 0.0)),
            "max_abs": float(sums[h]["max_abs"][0]),
        }
    extra = {}
    for name, arrays in (("labels", labels), ("image_index", image_index)):
        data = _npy_bytes(np.concatenate(arrays).astype(np.int64))
        _write_bytes_atomic(root / f"{name}.npy", data)
        extra[name] = {"file": f"{name}.npy", "nbytes": len(data), "sha256": _sha256_bytes(data)}
    all_images = np.concatenate(image_index)
    meta.update({
        "complete": True,
        "n_rows": n_rows,
        "n_images_cached": int(len(np.unique(all_images))),
        "n_images_skipped": int(meta["n_images"] - len(np.unique(all_images))),
        "stats": stats,
        "arrays": extra,
    })
    _write_json_atomic(root / METADATA_FILE, meta)
    return ActivationCache.open(root)


# ---------------------------------------------------------------------------------- reader
class ActivationCache:
    """Read access to a complete cache folder. Every shard read checks size and sha256."""

    def __init__(self, root: Path, metadata: dict[str, Any]):
        self.root = root
        self.metadata = metadata
        self._labels: np.ndarray | None = None
        self._image_index: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> "ActivationCache":
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"activation cache folder {root} does not exist")
        meta_path = root / METADATA_FILE
        if not meta_path.is_file():
            hint = " (it is empty)" if not any(root.iterdir()) else ""
            raise FileNotFoundError(f"{root} is not an activation cache: {METADATA_FILE} is missing{hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CorruptCacheError(f"{meta_path} is not valid JSON: {e}") from e
        if not meta.get("complete"):
            raise CacheError(f"the cache in {root} is incomplete ({len(meta.get('shards', []))} shards written); "
                             "run the caching command again to resume it")
        if not meta.get("shards") or not meta.get("n_rows"):
            raise CacheError(f"the cache in {root} is empty")
        cache = cls(root, meta)
        for rec in meta["shards"]:
            cache._check_size(rec)
        return cache

    # ------------------------------------------------------------------ metadata
    @property
    def hook_names(self) -> list[str]:
        return list(self.metadata["hook_names"])

    def resolve_hook(self, hook_name: str | None = None) -> str:
        if hook_name is None:
            return self.hook_names[0]
        if hook_name not in self.metadata["hook_names"]:
            raise KeyError(f"hook {hook_name!r} is not in the cache at {self.root}; it holds {self.hook_names}")
        return hook_name

    def d_in(self, hook_name: str | None = None) -> int:
        return int(self.metadata["d_in"][self.resolve_hook(hook_name)])

    @property
    def n_rows(self) -> int:
        return int(self.metadata["n_rows"])

    @property
    def n_shards(self) -> int:
        return len(self.metadata["shards"])

    @property
    def shard_offsets(self) -> list[tuple[int, int]]:
        """`(first_row, n_rows)` of each shard."""
        return [(r["first_row"], r["n_rows"]) for r in self.metadata["shards"]]

    @property
    def positions(self) -> str:
        return self.metadata["positions"]

    def stats(self, hook_name: str | None = None) -> dict[str, Any]:
        return self.metadata["stats"][self.resolve_hook(hook_name)]

    def mean(self, hook_name: str | None = None) -> torch.Tensor:
        """Mean activation over all rows (computed in float64), as float32 `[d_in]`."""
        return torch.tensor(self.stats(hook_name)["mean"], dtype=torch.float64).float()

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = self._read_array("labels")
        return self._labels

    @property
    def image_index(self) -> np.ndarray:
        if self._image_index is None:
            self._image_index = self._read_array("image_index")
        return self._image_index

    def _read_array(self, name: str) -> np.ndarray:
        import io

        rec = self.metadata["arrays"][name]
        data = self._read_verified(self.root / rec["file"], rec)
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.shape != (self.n_rows,):
            raise CorruptCacheError(f"{self.root / rec['file']} has shape {arr.shape}, expected ({self.n_rows},)")
        return arr

    # ------------------------------------------------------------------ shards
    def _check_size(self, rec: dict[str, Any]) -> None:
        path = self.root / rec["file"]
        if not path.is_file():
            raise CorruptCacheError(f"shard {path} is missing from the cache")
        size = path.stat().st_size
        if size != rec["nbytes"]:
            raise CorruptCacheError(f"shard {path} is truncated or damaged: {size} bytes, expected {rec['nbytes']}")

    @staticmethod
    def _read_verified(path: Path, rec: dict[str, Any]) -> bytes:
        if not path.is_file():
            raise CorruptCacheError(f"{path} is missing from the cache")
        data = path.read_bytes()
        if len(data) != rec["nbytes"]:
            raise CorruptCacheError(f"{path} is truncated or damaged: {len(data)} bytes, expected {rec['nbytes']}")
        if _sha256_bytes(data) != rec["sha256"]:
            raise CorruptCacheError(f"{path} is corrupt: its sha256 does not match the one in {METADATA_FILE}")
        return data

    def read_shard(self, index: int, hook_name: str | None = None,
                   dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """One shard, checked: `{"acts": [n, d_in], "labels": [n], "image_index": [n]}`."""
        hook = self.resolve_hook(hook_name)
        rec = self.metadata["shards"][index]
        path = self.root / rec["file"]
        tensors = safetensors.torch.load(self._read_verified(path, rec))
        acts = tensors[f"acts/{hook}"]
        if acts.shape != (rec["n_rows"], self.d_in(hook)):
            raise CorruptCacheError(f"{path}: acts/{hook} has shape {tuple(acts.shape)}, expected "
                                    f"({rec['n_rows']}, {self.d_in(hook)})")
        if not bool(torch.isfinite(acts).all()):
            raise NonFiniteActivationsError(f"non-finite activations at hook {hook!r} in shard {index} ({path})")
        return {"acts": acts if dtype is None else acts.to(dtype), "labels": tensors["labels"],
                "image_index": tensors["image_index"]}

    def iter_shards(self, hook_name: str | None = None, dtype: torch.dtype | None = torch.float32,
                    order: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """Activations shard by shard (`[n_rows_in_shard, d_in]`), in order or in the given shard order."""
        for i in order if order is not None else range(self.n_shards):
            yield self.read_shard(i, hook_name, dtype)["acts"]

    def load(self, hook_name: str | None = None, rows: np.ndarray | Sequence[int] | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `[n, d_in]` in memory (all of them, or the given row indices in the given order).

        For small caches and evaluation; training streams through `iter_shards`.
        """
        hook = self.resolve_hook(hook_name)
        if rows is None:
            return torch.cat(list(self.iter_shards(hook, dtype)))
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"row indices must lie in [0, {self.n_rows})")
        out = torch.empty(len(rows), self.d_in(hook), dtype=dtype)
        for i, (first, n) in enumerate(self.shard_offsets):
            where = np.nonzero((rows >= first) & (rows < first + n))[0]
            if where.size:
                acts = self.read_shard(i, hook, dtype)["acts"]
                out[torch.from_numpy(where)] = acts[torch.from_numpy(rows[where] - first)]
        return out

    def verify(self) -> None:
        """Check every shard and array file (size, sha256, shapes, finite values); raise on the first problem."""
        for i in range(self.n_shards):
            for h in self.hook_names:
                self.read_shard(i, h, dtype=None)
        self._labels = self._image_index = None
        _ = self.labels, self.image_index

    def __repr__(self) -> str:
        m = self.metadata
        return (f"ActivationCache({str(self.root)!r}, model={m['model_name']}/{m['pretrained']}, hooks={m['hook_names']}, "
                f"positions={m['positions']}, rows={m['n_rows']}, dtype={m['dtype']})")
