"""VS2++ retrieval with a second image backbone (e.g. DINOv2, as in the paper): the pool's and the queries'
embeddings are computed once with that backbone and cached on disk, keyed by the backbone's weight
fingerprint and by the exact images.

    backbone = load_retrieval_backbone("dinov2-base")           # any HookedCLIP.from_pretrained name
    pool = pool_retrieval_embeddings(backbone, "runs/cache_train")        # rows = the pool cache's rows
    queries = query_retrieval_embeddings(backbone, eval_data, pool.cache_dir)

Cache layout (default: `<pool cache>.retrieval/<backbone>/`, next to the activation cache)::

    metadata.json        the backbone (name, tag, weight fingerprint, preprocessing, width) and one entry
                         per image set: data set id, split, data-set fingerprint, sha256 of the image
                         positions, rows, width, file sha256
    pool.npy             float32 [pool rows, E], row i = row i of the pool cache
    query-<key>.npy      float32 [images, E], one file per evaluated image set (data set, split, images)

Writes are atomic (temp file + `os.replace`, one writer per folder); a reused file is checked by sha256.
The folder serves one backbone and one pool: another backbone (other weights: fingerprint) or a pool
cache rebuilt on other images is refused, with the difference named. Query sets accumulate (one file
each). CLIP-embedding retrieval stays the default; this module is used only when a backbone is named.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..core.errors import ConflictError, InputError, UsageError
from ..core.fileio import (
    check_writable_dir,
    exclusive_writer,
    write_bytes_atomic,
    write_json_atomic,
)
from ..core.identity import dataset_fingerprint, model_fingerprint, stable_repr
from ..core.requests import describe_differences, request_differences

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
POOL_FILE = "pool.npy"
# Short names for the retrieval backbones the paper's VS2++ uses (transformers DINOv2; giant is refused:
# its SwiGLU MLP is not supported).
BACKBONE_ALIASES = {
    "dinov2-small": "hf:facebook/dinov2-small",
    "dinov2-base": "hf:facebook/dinov2-base",
    "dinov2-large": "hf:facebook/dinov2-large",
}
BACKBONE_FIELDS = ("model_name", "pretrained", "model_fingerprint", "preprocess", "embed_dim")
IMAGE_FIELDS = ("dataset", "split", "n_images", "dataset_fingerprint", "n_rows", "positions_sha256")


class RetrievalCacheError(ConflictError, ValueError):
    """A retrieval-embedding cache made with another backbone or on other images."""


class CorruptRetrievalCacheError(InputError, ValueError):
    pass


# ---------------------------------------------------------------------------------- the backbone
def resolve_backbone_name(name: str) -> str:
    """`dinov2-base` -> `hf:facebook/dinov2-base`; other names unchanged."""
    return BACKBONE_ALIASES.get(name.lower(), name) if name else name


def load_retrieval_backbone(name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                            random_weights: bool = False, seed: int = 0, model_kwargs: dict | None = None):
    """A `HookedCLIP` for retrieval embeddings: any name `HookedCLIP.from_pretrained` takes, or an alias.

    `pretrained`: the open_clip tag (required for plain open_clip names), a transformers revision
    (`hf:`), or a timm tag/checkpoint (`timm:` names load timm's pretrained weights by default).
    `random_weights=True` builds seeded random weights (offline smoke runs only).
    """
    from ..core.identity import weights_from_name
    from ..models.kwargs import check_kwarg_names
    from ..sae.splice import HookedCLIP

    resolved = resolve_backbone_name(name)
    kwargs = check_kwarg_names(dict(model_kwargs or {}))
    if random_weights:
        if pretrained:
            raise UsageError("give --retrieval-pretrained or --retrieval-random-weights, not both")
        torch.manual_seed(seed)
        if resolved.startswith("hf:"):
            raise UsageError(f"--retrieval-random-weights is not available for transformers names ({resolved})")
        if weights_from_name(resolved):
            kwargs["load_weights"] = False
        pretrained = None
    elif pretrained is None and resolved.startswith("timm:"):
        pretrained = "timm"  # timm's own pretrained weights (any tag means pretrained=True)
    elif pretrained is None and not (resolved.startswith("hf:") or weights_from_name(resolved)):
        raise UsageError(f"retrieval backbone {resolved}: give its weights with --retrieval-pretrained (an open_clip "
                         "tag or checkpoint), or --retrieval-random-weights for a smoke run")
    return HookedCLIP.from_pretrained(resolved, pretrained=pretrained, device=device, **kwargs).eval()


def backbone_fingerprint(model) -> str:
    """The project's weight fingerprint (`activation_cache.model_fingerprint`: the image tower of any family)."""
    return model_fingerprint(model)


def backbone_identity(model) -> dict[str, Any]:
    return {"model_name": model.cfg.model_name, "pretrained": model.cfg.pretrained,
            "model_fingerprint": backbone_fingerprint(model), "preprocess": stable_repr(model.preprocess),
            "embed_dim": int(model.cfg.embed_dim) if getattr(model.cfg, "embed_dim", None) else None}


def backbone_slug(model) -> str:
    text = f"{model.cfg.model_name}" + (f"_{model.cfg.pretrained}" if model.cfg.pretrained else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "backbone"


def default_cache_dir(pool_cache: str | Path, model) -> Path:
    """`<pool cache>.retrieval/<backbone>/`: next to the pool's activation cache."""
    p = Path(pool_cache).resolve()
    return p.parent / f"{p.name}.retrieval" / backbone_slug(model)


# ---------------------------------------------------------------------------------- images
@torch.no_grad()
def embed_images(model, dataset, positions: Sequence[int] | None = None, batch_size: int = 256,
                 num_workers: int = 2, show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`model.encode_image` (unnormalised) of the data set's images at `positions` (all when None), read
    with the backbone's own `preprocess`. Returns `(embeds [n, E] float32, positions kept)`; unreadable
    images are skipped only when the data set says so (`skip_bad_images`)."""
    from ..data.base import collate_images

    ds = copy.copy(dataset)
    ds.transform = model.preprocess
    source = ds if positions is None else Subset(ds, [int(i) for i in positions])
    loader = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_images)
    out, kept = [], []
    for batch in tqdm(loader, desc=f"retrieval features ({model.cfg.model_name})", disable=not show_progress,
                      unit="batch"):
        if len(batch.labels) == 0:
            continue
        out.append(model.encode_image(batch.images.to(model.device)).float().cpu())
        kept.append(batch.indices)
    if not out:
        raise UsageError(f"no readable images to embed in {dataset.dataset_id}/{dataset.split}")
    return torch.cat(out).numpy(), torch.cat(kept).numpy().astype(np.int64)


def reload_pool_dataset(cache) -> Any:
    """The pool cache's images, read again from its recorded data set (checked by data-set fingerprint)."""
    from ..data import load_image_dataset

    req = cache.metadata.get("request", {})
    dataset_id, split, data_dir = req.get("dataset"), req.get("split"), req.get("data_dir")
    if not dataset_id:
        raise CorruptRetrievalCacheError(f"the pool cache {cache.root} does not record its data set")
    name = "imagefolder" if str(dataset_id).startswith("imagefolder:") else dataset_id
    try:
        ds = load_image_dataset(name, split=split, data_dir=data_dir, limit=req.get("n_images"))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"the pool cache's images ({dataset_id}/{split}"
                         + (f" in {data_dir}" if data_dir else "") + f") cannot be read again: {e}") from None
    if req.get("dataset_fingerprint") and dataset_fingerprint(ds) != req["dataset_fingerprint"]:
        raise RetrievalCacheError(f"the pool cache {cache.root} was made from other images than {dataset_id}/{split}"
                                  + (f" in {data_dir}" if data_dir else "") + " holds now (data-set fingerprint "
                                  f"{req['dataset_fingerprint']} vs {dataset_fingerprint(ds)})")
    return ds


# ---------------------------------------------------------------------------------- the cache folder
@dataclass
class RetrievalEmbeds:
    embeds: np.ndarray  # [rows, E] float32, unnormalised
    positions: np.ndarray  # data-set positions of the rows
    cache_dir: Path
    file: Path
    cached: bool  # True: read from the cache; False: computed now
    seconds: float  # feature time (computing, or reading and verifying)
    identity: dict[str, Any] = field(default_factory=dict)


class RetrievalEmbeddingCache:
    """One folder of retrieval embeddings for one backbone and one pool (see the module docstring)."""

    def __init__(self, root: str | Path, backbone: dict[str, Any]):
        self.root, self.backbone = Path(root), backbone

    def _meta(self) -> dict[str, Any]:
        path = self.root / METADATA_FILE
        if not path.is_file():
            return {"format_version": FORMAT_VERSION, "backbone": self.backbone, "sets": {}}
        try:
            meta = json.loads(path.read_text())
            assert isinstance(meta, dict) and isinstance(meta.get("sets"), dict)
        except (ValueError, AssertionError, UnicodeDecodeError):
            raise CorruptRetrievalCacheError(f"{path} is not a retrieval-embedding metadata file; delete {self.root}")
        diffs = _diffs(meta.get("backbone") or {}, self.backbone, BACKBONE_FIELDS)
        if diffs:
            raise RetrievalCacheError(f"the retrieval cache {self.root} was built with another backbone ({'; '.join(diffs)})"
                                      "; delete it or give another --retrieval-cache")
        return meta

    def check(self, key: str, identity: dict[str, Any]) -> None:
        """Refuse a folder of another backbone, or whose pool entry was built on other images."""
        found = self._meta()["sets"].get(key)
        if key == "pool" and found is not None:
            diffs = _diffs(found, identity, IMAGE_FIELDS)
            if diffs:
                raise RetrievalCacheError(f"the retrieval cache {self.root} was built on other pool images "
                                          f"({'; '.join(diffs)}); delete it or give another --retrieval-cache")

    def get(self, key: str, identity: dict[str, Any], compute) -> RetrievalEmbeds:
        """The embeddings of one image set: read and verified when cached, else `compute()` and stored.
        Under torchrun rank 0 reads or computes and writes them (the folder's lock admits one writer) and
        the other ranks receive them."""
        from ..core import distributed

        return distributed.on_main(lambda: self._get(key, identity, compute))

    def _get(self, key: str, identity: dict[str, Any], compute) -> RetrievalEmbeds:
        t0 = time.perf_counter()
        self.check(key, identity)
        rec = self._meta()["sets"].get(key)
        if rec is not None:
            path = self.root / rec["file"]
            if not path.is_file():
                raise CorruptRetrievalCacheError(f"{path} is missing; delete {self.root} to compute it again")
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != rec["sha256"]:
                raise CorruptRetrievalCacheError(f"{path} is corrupt (sha256 differs from {METADATA_FILE}); delete it "
                                                 "and its folder to compute it again")
            arr = np.load(path, allow_pickle=False)
            return RetrievalEmbeds(arr, np.asarray(rec["positions"], np.int64), self.root, path, True,
                                   time.perf_counter() - t0, identity)
        embeds, positions = compute()
        identity = {**identity, "n_rows": int(len(positions)),
                    "positions_sha256": hashlib.sha256(np.asarray(positions, np.int64).tobytes()).hexdigest()[:16]}
        seconds = time.perf_counter() - t0
        check_writable_dir(self.root, "retrieval cache folder")
        with exclusive_writer(self.root, "retrieval embeddings", RetrievalCacheError):
            meta = self._meta()  # again, under the lock
            self.check(key, identity)
            name = POOL_FILE if key == "pool" else f"query-{key}.npy"
            import io

            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(embeds, np.float32), allow_pickle=False)
            write_bytes_atomic(self.root / name, buf.getvalue())
            meta["sets"][key] = {**identity, "file": name, "dim": int(embeds.shape[1]),
                                 "sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "seconds": seconds,
                                 "positions": [int(i) for i in positions]}
            write_json_atomic(self.root / METADATA_FILE, meta)
        return RetrievalEmbeds(np.ascontiguousarray(embeds, np.float32), np.asarray(positions, np.int64), self.root,
                               self.root / name, False, seconds, identity)


def _diffs(found: dict[str, Any], wanted: dict[str, Any], keys: Sequence[str]) -> list[str]:
    return describe_differences(request_differences(found, wanted, keys, only_wanted=True), "cache",
                                max_len=160, keep=70)


# ---------------------------------------------------------------------------------- entry points
def _pool_identity(cache) -> dict[str, Any]:
    req = cache.metadata.get("request", {})
    pos = np.asarray(cache.image_index, dtype=np.int64)
    return {"dataset": req.get("dataset"), "split": req.get("split"), "n_images": req.get("n_images"),
            "dataset_fingerprint": req.get("dataset_fingerprint"), "n_rows": int(len(pos)),
            "positions_sha256": hashlib.sha256(pos.tobytes()).hexdigest()[:16]}


def open_retrieval_cache(model, pool_cache: str | Path, cache_dir: str | Path | None = None) -> RetrievalEmbeddingCache:
    """The retrieval cache folder for `model` next to `pool_cache`, checked against both (cheap: no images
    are read), so that a mismatch is refused before any backbone pass."""
    from ..activation_cache import ActivationStore

    cache = ActivationStore.open(pool_cache)
    folder = RetrievalEmbeddingCache(cache_dir or default_cache_dir(pool_cache, model), backbone_identity(model))
    folder.check("pool", _pool_identity(cache))
    return folder


def pool_retrieval_embeddings(model, pool_cache: str | Path, cache_dir: str | Path | None = None,
                              batch_size: int = 256, num_workers: int = 2, show_progress: bool = False,
                              folder: RetrievalEmbeddingCache | None = None) -> RetrievalEmbeds:
    """Embeddings of the pool cache's images, one row per cache row (read from the cache folder if there)."""
    from ..activation_cache import ActivationStore

    cache = ActivationStore.open(pool_cache)
    if cache.positions != "cls":
        raise UsageError(f"the pool cache {pool_cache} holds positions={cache.positions!r}; VS2++ needs one row per image")
    folder = folder or open_retrieval_cache(model, pool_cache, cache_dir)
    positions = np.asarray(cache.image_index, dtype=np.int64)
    return folder.get("pool", _pool_identity(cache), lambda: _embed_exact(model, reload_pool_dataset(cache), positions,
                                                                         batch_size, num_workers, show_progress))


def _embed_exact(model, dataset, positions, batch_size, num_workers, show_progress):
    embeds, kept = embed_images(model, dataset, positions, batch_size, num_workers, show_progress)
    if len(kept) != len(positions) or not np.array_equal(kept, positions):
        raise InputError(f"{len(positions) - len(kept)} pool images of {dataset.dataset_id}/{dataset.split} could not "
                         "be read again; the retrieval embeddings would not align with the pool cache")
    return embeds, kept


def query_retrieval_embeddings(model, dataset, cache_dir: str | Path | RetrievalEmbeddingCache, batch_size: int = 256,
                               num_workers: int = 2, show_progress: bool = False) -> RetrievalEmbeds:
    """Embeddings of an evaluation set (every readable image, in order), cached under a key made of its
    data set id, split and data-set fingerprint (which images). `cache_dir`: a folder, e.g. the pool's
    `RetrievalEmbeds.cache_dir`, or an open `RetrievalEmbeddingCache`."""

    ident = {"dataset": dataset.dataset_id, "split": dataset.split, "n_images": len(dataset),
             "dataset_fingerprint": dataset_fingerprint(dataset)}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir if isinstance(cache_dir, RetrievalEmbeddingCache) else RetrievalEmbeddingCache(
        cache_dir, backbone_identity(model))
    return folder.get(key, ident, lambda: embed_images(model, dataset, None, batch_size, num_workers, show_progress))


__all__ = [
    "BACKBONE_ALIASES", "CorruptRetrievalCacheError", "RetrievalCacheError", "RetrievalEmbeddingCache",
    "RetrievalEmbeds", "backbone_fingerprint", "backbone_identity", "default_cache_dir", "embed_images",
    "load_retrieval_backbone", "open_retrieval_cache", "pool_retrieval_embeddings",
    "query_retrieval_embeddings", "reload_pool_dataset",
]
