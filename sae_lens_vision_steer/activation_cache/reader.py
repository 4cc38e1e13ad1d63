"""Reading a complete activation cache; every shard read is checked by size and sha256."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import safetensors.torch
import torch

from ..core.errors import MissingInputError, UnknownNameError
from ..core.identity import model_label
from .format import (
    METADATA_FILE,
    CacheError,
    CorruptCacheError,
    NonFiniteActivationsError,
    read_metadata,
    sha256_bytes,
)


class ActivationStore:
    """Read access to a complete cache folder. Every shard read checks size and sha256."""

    def __init__(self, root: Path, metadata: dict[str, Any]):
        self.root = root
        self.metadata = metadata
        self._labels: np.ndarray | None = None
        self._image_index: np.ndarray | None = None
        # Set by `cache_activations`: the rows that call wrote (all ranks together); the rest of the cache
        # came from an earlier, interrupted run (or the whole of it, when a complete cache is reused). None
        # for a store opened from disk.
        self.rows_written: int | None = None

    @classmethod
    def open(cls, path: str | Path) -> "ActivationStore":
        root = Path(path)
        if not root.is_dir():
            raise MissingInputError(f"activation cache folder {root} does not exist")
        meta_path = root / METADATA_FILE
        if not meta_path.is_file():
            hint = " (it is empty)" if not any(root.iterdir()) else ""
            raise MissingInputError(f"{root} is not an activation cache: {METADATA_FILE} is missing{hint}")
        meta = read_metadata(meta_path)
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
            raise UnknownNameError(f"hook {hook_name!r} is not in the cache at {self.root}; it holds {self.hook_names}")
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

    def dataset_ids(self) -> np.ndarray:
        """int64 `[n_rows]`: the member data set of each row, an index into `request["members"]` of a union
        cache (`union.py`; from `image_index` and the members' first image indices); all 0 for one data set."""
        members = self.metadata.get("request", {}).get("members")
        if not members:
            return np.zeros(self.n_rows, dtype=np.int64)
        firsts = np.asarray([m["first_image"] for m in members], dtype=np.int64)
        return (np.searchsorted(firsts, self.image_index, side="right") - 1).astype(np.int64)

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
        if sha256_bytes(data) != rec["sha256"]:
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
        return (f"ActivationStore({str(self.root)!r}, model={model_label(m['model_name'], m['pretrained'])}, hooks={m['hook_names']}, "
                f"positions={m['positions']}, rows={m['n_rows']}, dtype={m['dtype']})")
