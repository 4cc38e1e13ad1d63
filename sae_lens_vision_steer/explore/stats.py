"""Per-latent statistics of an SAE over an activation cache, from one pass over the cache.

The pass encodes every shard once and keeps only the nonzero entries of the codes, image by image:
`(image, latent, value)` triples (for a top-k SAE at most k per image, e.g. 20,000 x 64 entries =
15 MB). For caches of patch or all tokens, an image's activation of a latent is its maximum over the
image's tokens. Everything on the pages (firing frequency, mean activation, histograms, top images,
per-class means) is then computed exactly from the triples, latent by latent, without reading the
cache again; there is never one pass per latent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from ..activation_cache import ActivationStore
from ..core.errors import UsageError

HIST_BINS = 24


@dataclass
class LatentStats:
    """Image-level statistics of every latent (`S` = d_sae, `N` = images, `C` = classes)."""

    n_images: int
    d_sae: int
    freq_S: np.ndarray  # fraction of images on which the latent fires
    mean_act_S: np.ndarray  # mean activation over the images where it fires (0 when dead)
    max_act_S: np.ndarray
    top_images_SK: np.ndarray  # image numbers (cache order), highest activation first; -1 = none
    top_values_SK: np.ndarray
    class_means_SC: np.ndarray | None  # mean activation over each class's images (zeros included)
    class_freq_SC: np.ndarray | None  # fraction of each class's images on which the latent fires
    class_sem_SC: np.ndarray | None  # standard error of class_means_SC (sample sd / sqrt(n); NaN for n < 2)
    class_counts_C: np.ndarray | None
    labels_N: np.ndarray | None
    image_index_N: np.ndarray | None  # data-set item of each cache image
    hist_counts_SB: np.ndarray = field(repr=False, default=None)  # histogram of nonzero activations
    hist_edges_SB1: np.ndarray = field(repr=False, default=None)  # [S, B + 1], 0 .. max per latent
    missing: dict[str, str] = field(default_factory=dict)  # what could not be computed, and why

    @property
    def dead(self) -> np.ndarray:
        return np.nonzero(self.freq_S == 0)[0]

    @property
    def alive(self) -> np.ndarray:
        return np.nonzero(self.freq_S > 0)[0]


def _image_rows(cache: ActivationStore) -> int:
    return int(cache.metadata.get("request", {}).get("rows_per_image") or {"cls": 1}.get(cache.positions, 0)) or 1


def _per_image_labels(cache: ActivationStore, rows_per_image: int, missing: dict[str, str]):
    """Labels and data-set indices, one per image; None (with the reason in `missing`) when absent."""
    out = []
    for name, why in (("labels", "per-class means"), ("image_index", "top-image thumbnails and heatmaps")):
        try:
            arr = getattr(cache, name)[::rows_per_image].astype(np.int64)
        except (KeyError, FileNotFoundError, ValueError) as e:
            missing[name] = f"the cache has no usable {name} ({e}); {why} are left out"
            arr = None
        if name == "labels" and arr is not None and (arr < 0).any():
            missing[name] = "the cache's images are unlabelled (label -1); per-class means are left out"
            arr = None
        out.append(arr)
    return out


@torch.no_grad()
def latent_stats(cache: ActivationStore, sae: SAE, hook_name: str, top_k: int = 16, batch_size: int = 4096,
                 n_classes: int | None = None, show_progress: bool = True) -> LatentStats:
    """One pass over `cache` at `hook_name`: every image's SAE code, kept sparse; then per-latent stats."""
    P = _image_rows(cache)
    n_images = cache.n_rows // P
    S = sae.cfg.d_sae
    device = sae.W_enc.device
    img_parts, lat_parts, val_parts = [], [], []
    step = max(P, batch_size - batch_size % P)  # whole images per batch
    bar = tqdm(total=cache.n_rows, desc="SAE codes over the cache", unit="row", disable=not show_progress)
    for shard, (first, n) in zip(cache.iter_shards(hook_name), cache.shard_offsets):
        if first % P or n % P:
            raise UsageError(f"shard starting at row {first} splits an image's {P} rows; the cache is not image-aligned")
        for i in range(0, n, step):
            x = shard[i:i + step].to(device, sae.W_enc.dtype)
            codes = sae.encode(x)
            if P > 1:
                codes = codes.reshape(-1, P, S).amax(dim=1)
            img, lat = torch.nonzero(codes > 0, as_tuple=True)
            img_parts.append((img + (first + i) // P).cpu().numpy().astype(np.int64))
            lat_parts.append(lat.cpu().numpy().astype(np.int64))
            val_parts.append(codes[img, lat].float().cpu().numpy())
            bar.update(len(x))
    bar.close()
    img = np.concatenate(img_parts) if img_parts else np.zeros(0, np.int64)
    lat = np.concatenate(lat_parts) if lat_parts else np.zeros(0, np.int64)
    val = np.concatenate(val_parts) if val_parts else np.zeros(0, np.float32)

    missing: dict[str, str] = {}
    labels, image_index = _per_image_labels(cache, P, missing)
    return _summarise(img, lat, val, n_images, S, top_k, labels, image_index, n_classes, missing)


def _summarise(img, lat, val, n_images, S, top_k, labels, image_index, n_classes, missing) -> LatentStats:
    count = np.bincount(lat, minlength=S)
    total = np.bincount(lat, weights=val, minlength=S)
    freq = count / max(1, n_images)
    mean_act = np.divide(total, count, out=np.zeros(S), where=count > 0)
    max_act = np.zeros(S)
    np.maximum.at(max_act, lat, val)

    order = np.lexsort((-val, lat))  # by latent, then by activation, highest first
    starts = np.concatenate([[0], np.cumsum(count)])
    top_images = np.full((S, top_k), -1, dtype=np.int64)
    top_values = np.zeros((S, top_k), dtype=np.float32)
    hist = np.zeros((S, HIST_BINS), dtype=np.int64)
    edges = np.zeros((S, HIST_BINS + 1))
    for s in np.nonzero(count)[0]:
        seg = order[starts[s]:starts[s + 1]]
        k = min(top_k, len(seg))
        top_images[s, :k], top_values[s, :k] = img[seg[:k]], val[seg[:k]]
        hist[s], edges[s] = np.histogram(val[seg], bins=HIST_BINS, range=(0.0, float(max_act[s])))

    class_means = class_freq = class_counts = class_sem = None
    if labels is not None:
        C = int(max(labels.max() + 1, n_classes or 0))
        class_counts = np.bincount(labels, minlength=C)
        flat = lat * C + labels[img]
        sums = np.bincount(flat, weights=val, minlength=S * C).reshape(S, C)
        fires = np.bincount(flat, minlength=S * C).reshape(S, C)
        squares = np.bincount(flat, weights=val.astype(np.float64) ** 2, minlength=S * C).reshape(S, C)
        denom = np.maximum(class_counts, 1)[None, :]
        class_means, class_freq = sums / denom, fires / denom
        n = class_counts[None, :].astype(np.float64)
        var = np.divide(squares - n * class_means ** 2, n - 1, out=np.full((S, C), np.nan), where=n > 1)
        class_sem = np.sqrt(np.clip(var, 0, None) / denom)
    return LatentStats(n_images=n_images, d_sae=S, freq_S=freq, mean_act_S=mean_act, max_act_S=max_act,
                       top_images_SK=top_images, top_values_SK=top_values, class_means_SC=class_means,
                       class_freq_SC=class_freq, class_sem_SC=class_sem, class_counts_C=class_counts, labels_N=labels,
                       image_index_N=image_index, hist_counts_SB=hist, hist_edges_SB1=edges, missing=missing)
