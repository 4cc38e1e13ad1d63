"""The activation store: image-tower activations on disk in fixed-size shards (`ActivationStore`), and its
writer. (Named apart from TransformerLens' in-memory `ActivationCache`, which `run_with_cache` returns;
`ActivationCache` here is a deprecated alias, kept for one release.)

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
interrupted run resumes at the first unwritten shard. Resuming removes only our own temp files and
never deletes a file it did not write (a stray `shard_00000 (copy).safetensors` stays). Reusing a
complete cache verifies every file's sha256; `repair=True` recomputes only the damaged shards. Statistics are combined from per-shard float64
sums stored in the shards, so a resumed run's metadata equals an uninterrupted run's.

Modules: `format` (constants, errors, fingerprints, the identifying request), `writer`
(`cache_activations`), `reader` (`ActivationStore`), `memmap` (`ShardMaps`: one hook's shards
memory-mapped for the training loader, checked once), `union` (the member data sets of a union's store).
"""

from .format import (
    CACHE_DTYPES,
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    HEAD_HOOKS,
    IDENTITY_FIELDS,
    METADATA_FILE,
    POSITIONS,
    SHARD_PATTERN,
    CacheError,
    CacheMismatchError,
    CorruptCacheError,
    NonFiniteActivationsError,
    Positions,
    dataset_fingerprint,
    describe_mismatch,
    model_fingerprint,
    read_metadata,
    rows_per_image,
    select_positions,
)
from .memmap import ShardMaps
from .reader import ActivationStore
from .writer import cache_activations, damaged_files

__all__ = [
    "CACHE_DTYPES", "DEFAULT_SHARD_SIZE", "FORMAT_VERSION", "HEAD_HOOKS", "IDENTITY_FIELDS", "METADATA_FILE",
    "POSITIONS", "SHARD_PATTERN", "ActivationStore", "CacheError", "CacheMismatchError", "CorruptCacheError",
    "NonFiniteActivationsError", "Positions", "ShardMaps", "cache_activations", "damaged_files", "dataset_fingerprint",
    "describe_mismatch", "model_fingerprint", "read_metadata", "rows_per_image", "select_positions",
]


def __getattr__(name: str):
    if name == "ActivationCache":  # the name before 0.2; TransformerLens has a class of that name too
        import warnings

        warnings.warn("sae_lens_vision_steer.activation_cache.ActivationCache is now ActivationStore; the old name "
                      "goes away in the next release", DeprecationWarning, stacklevel=2)
        return ActivationStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
