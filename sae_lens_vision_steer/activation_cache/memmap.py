"""Memory-mapped, read-only access to one hook of a complete cache: the training loader's fast path.

Each shard's `acts/<hook>` tensor is mapped in place (safetensors: an 8-byte little-endian header length,
a JSON header giving each tensor's dtype, shape and byte range, then the raw little-endian data), so rows
are gathered straight from the page cache, in the stored dtype, with no per-read checks. The checks run
once, when the maps are made: size, sha256 against `metadata.json` and finite values, shard by shard (a few threads:
hashing and numpy release the GIL). bfloat16 rows are mapped as uint16 and viewed as `torch.bfloat16`
after the gather (numpy has no bfloat16).

Memory: the mapped pages are file-backed; `release()` drops them from the process (`MADV_DONTNEED`) after every
`RELEASE_BYTES` (1 GiB) gathered, the page cache keeps them: resident memory stays flat in the store size.
Finite values are checked on the stored bits (exponent all ones = inf or NaN), without converting.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .format import METADATA_FILE, CorruptCacheError, NonFiniteActivationsError
from .reader import ActivationStore

# safetensors dtype -> (numpy dtype of the mapped array, torch dtype of the rows)
_DTYPES = {"F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16), "F32": (np.float32, torch.float32)}
# The exponent bits of each stored type (as an unsigned integer): all set <=> inf or NaN.
_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.uint16): (np.uint16, 0x7F80),
             np.dtype(np.float32): (np.uint32, 0x7F800000)}
_HASH_CHUNK = 1 << 24
_CHECK_ROWS = 65536
# Mapped pages are dropped from the process once this many bytes were gathered since the last drop: the
# resident size stays bounded (a store smaller than this stays mapped, as a plain memmap would).
RELEASE_BYTES = 1 << 30


@dataclass(frozen=True)
class _Shard:
    first_row: int
    n_rows: int
    mm: mmap.mmap
    rows: np.ndarray  # [n_rows, d_in] view of the mapped bytes


def _tensor_range(path: Path, mm: mmap.mmap, name: str) -> tuple[str, list[int], int, int]:
    """`(dtype, shape, start, end)` of one tensor of a safetensors file, byte offsets into the file."""
    if len(mm) < 8:
        raise CorruptCacheError(f"{path} is not a safetensors file (too short)")
    n = int.from_bytes(mm[:8], "little")
    try:
        header = json.loads(mm[8:8 + n])
        info = header[name]
        begin, end = (int(v) for v in info["data_offsets"])
    except (ValueError, KeyError, TypeError):
        raise CorruptCacheError(f"{path} has no readable safetensors entry {name!r}") from None
    return info["dtype"], list(info["shape"]), 8 + n + begin, 8 + n + end


class ShardMaps:
    """One hook of a complete cache as memory-mapped shards; `gather` copies rows by global row index."""

    def __init__(self, cache: ActivationStore, hook_name: str | None = None, verify: bool = True,
                 threads: int | None = None):
        self.cache = cache
        self.hook = cache.resolve_hook(hook_name)
        self.d_in = cache.d_in(self.hook)
        # (the maps close when the arrays viewing them are collected)
        mapped = [self._map(rec) for rec in cache.metadata["shards"]]
        kinds = {k for k, _ in mapped}
        if len(kinds) != 1:
            raise CorruptCacheError(f"the shards of {cache.root} store {self.hook!r} in different dtypes {sorted(kinds)}")
        self.np_dtype, self.torch_dtype = _DTYPES[kinds.pop()]
        self.shards = [s for _, s in mapped]
        self._gathered = 0
        if verify:
            with ThreadPoolExecutor(threads or max(1, min(4, os.cpu_count() or 1))) as pool:
                list(pool.map(self._check, range(len(self.shards))))
        self.starts = np.asarray([s.first_row for s in self.shards] + [cache.n_rows], dtype=np.int64)
        self._row_bytes = self.d_in * np.dtype(self.np_dtype).itemsize

    def _map(self, rec: dict) -> tuple[str, _Shard]:
        path = self.cache.root / rec["file"]
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(mm) != rec["nbytes"]:
            raise CorruptCacheError(f"shard {path} is truncated or damaged: {len(mm)} bytes, expected {rec['nbytes']}")
        dtype, shape, start, end = _tensor_range(path, mm, f"acts/{self.hook}")
        if dtype not in _DTYPES or shape != [rec["n_rows"], self.d_in]:
            raise CorruptCacheError(f"{path}: acts/{self.hook} is {dtype} {shape}, expected "
                                    f"[{rec['n_rows']}, {self.d_in}] in float16, bfloat16 or float32")
        n_bytes = rec["n_rows"] * self.d_in * np.dtype(_DTYPES[dtype][0]).itemsize
        if end - start != n_bytes or end > len(mm):
            raise CorruptCacheError(f"{path}: acts/{self.hook} byte range does not match its shape")
        rows = np.frombuffer(mm, dtype=_DTYPES[dtype][0], count=rec["n_rows"] * self.d_in, offset=start)
        return dtype, _Shard(rec["first_row"], rec["n_rows"], mm, rows.reshape(rec["n_rows"], self.d_in))

    def _check(self, index: int) -> None:
        s, rec = self.shards[index], self.cache.metadata["shards"][index]
        h = hashlib.sha256()
        view = memoryview(s.mm)
        for i in range(0, len(s.mm), _HASH_CHUNK):
            h.update(view[i:i + _HASH_CHUNK])
        del view
        if h.hexdigest() != rec["sha256"]:
            raise CorruptCacheError(f"{self.cache.root / rec['file']} is corrupt: its sha256 does not match the one "
                                    f"in {METADATA_FILE}")
        uint, mask = _EXPONENT[s.rows.dtype]
        for i in range(0, s.n_rows, _CHECK_ROWS):
            if int(np.bitwise_and(s.rows[i:i + _CHECK_ROWS].view(uint), mask).max(initial=0)) == mask:
                raise NonFiniteActivationsError(f"non-finite activations at hook {self.hook!r} in shard {index} "
                                                f"({self.cache.root / rec['file']})")
        self._gathered += s.rows.nbytes  # (hashing mapped these pages: they count towards the next release)

    def empty(self, n: int, pin: bool = False) -> np.ndarray:
        """An uninitialised `[n, d_in]` buffer in the stored dtype (pinned host memory when `pin`)."""
        t = torch.empty((n, self.d_in), dtype=torch.from_numpy(np.empty(0, self.np_dtype)).dtype, pin_memory=pin)
        return t.numpy()

    def gather(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `[len(rows), d_in]` (stored dtype; bfloat16 as uint16) for *sorted* global row indices."""
        out = np.empty((len(rows), self.d_in), self.np_dtype) if out is None else out[:len(rows)]
        bounds = np.searchsorted(rows, self.starts).tolist()
        for s, shard in enumerate(self.shards):
            lo, hi = bounds[s], bounds[s + 1]
            if lo == hi:  # no rows in this shard
                continue
            # mode="clip": no buffered copy of `out` (indices are in range by construction)
            np.take(shard.rows, rows[lo:hi] - shard.first_row, axis=0, out=out[lo:hi], mode="clip")
        self._gathered += len(rows) * self._row_bytes
        return out

    def as_torch(self, arr: np.ndarray) -> torch.Tensor:
        """A gathered buffer as a torch tensor of the stored dtype (no copy)."""
        return torch.from_numpy(arr).view(self.torch_dtype)

    def release(self, force: bool = False) -> None:
        """Drop the mapped pages from this process (the page cache keeps them) once `RELEASE_BYTES` were
        gathered since the last time (or now, with `force`)."""
        if force or self._gathered >= RELEASE_BYTES:
            for s in self.shards:
                s.mm.madvise(mmap.MADV_DONTNEED)
            self._gathered = 0  # checked: drop the pages from this process until they are gathered

