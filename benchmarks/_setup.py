"""What the benchmarks measure on: the model, a random SAE, the shared Tiny-ImageNet data, caches.

Random weights everywhere (no downloads). The model is built exactly as `vision-steer ... --random-weights
--seed S` builds it (`torch.manual_seed(S)` then `HookedCLIP.from_pretrained(name, pretrained=None)`), so
caches made here and by the CLI with the same seed are interchangeable.

`tower="narrow"` is a one-block, 768-wide CLIP tower on 32 px images (2 tokens): the same activation
width as ViT-B-32, with a forward pass that costs next to nothing. It is used where the model's cost
does not matter to the figure (memory scaling of the cache writer and the trainer; building an on-disk
cache to train from) so that those figures can be taken at their full sizes on a small CPU.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import numpy as np

from _timing import DEFAULT_WORK_DIR, TINY_IMAGENET_DIR

TOWERS: dict[str, dict[str, Any]] = {
    "vit-b-32": {},
    "narrow": dict(
        embed_dim=512,
        vision_cfg=dict(image_size=32, patch_size=32, width=768, layers=1, head_width=64),
        text_cfg=dict(context_length=77, width=64, heads=2, layers=1),
    ),
}


def add_common_args(p: argparse.ArgumentParser, reps: int, warmup: int = 1) -> None:
    p.add_argument("--reps", type=int, default=reps, help="timed rounds per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls of each variant first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads, the same for every variant (default: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and data")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                   help="scratch space for caches and runs (outside the repo)")
    p.add_argument("--json-out", type=Path, default=None,
                   help="also append each figure as one JSON line to this file")


def build_model(tower: str = "vit-b-32", seed: int = 0, device: str = "cpu"):
    import torch

    from sae_lens_vision_steer import HookedCLIP

    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; use one of {sorted(TOWERS)}")
    torch.manual_seed(seed)
    model = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, device=device, **TOWERS[tower])
    return model.eval().requires_grad_(False)


def final_hook(model) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def build_topk_sae(d_in: int = 768, d_sae: int = 3072, k: int = 64, hook_name: str | None = None,
                   seed: int = 0, device: str = "cpu", activation_mean: Any = None):
    """A SAELens `TopKSAE` (inference class) with random weights and our metadata keys set."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device)
    if hook_name is not None:
        cfg.metadata.hook_name = hook_name
    mean = torch.zeros(d_in) if activation_mean is None else torch.as_tensor(activation_mean).float()
    cfg.metadata.activation_mean = mean.tolist()
    return TopKSAE(cfg).eval().requires_grad_(False)


def tiny_imagenet(split: str, n_images: int | None, transform, data_dir: Path = TINY_IMAGENET_DIR):
    """The shared Tiny-ImageNet split (`limit` keeps `n_images` evenly spaced, all classes present)."""
    from sae_lens_vision_steer import load_image_dataset

    if not (Path(data_dir) / "wnids.txt").is_file():
        raise SystemExit(f"Tiny-ImageNet not found at {data_dir} (--data-dir)")
    return load_image_dataset("tiny-imagenet", split, data_dir=data_dir, transform=transform, limit=n_images)


def split_dataset(ds, n_chunks: int) -> list:
    """`n_chunks` contiguous pieces of a data set (shallow copies with their own `indices`)."""
    base = ds.indices if ds.indices is not None else np.arange(len(ds), dtype=np.int64)
    pieces = [p for p in np.array_split(base, n_chunks) if len(p)]
    out = []
    for p in pieces:
        c = copy.copy(ds)
        c.indices = np.asarray(p, dtype=np.int64)
        out.append(c)
    return out


def head(ds, n: int):
    """The first `n` items of a data set (a shallow copy)."""
    base = ds.indices if ds.indices is not None else np.arange(len(ds), dtype=np.int64)
    c = copy.copy(ds)
    c.indices = np.asarray(base[:n], dtype=np.int64)
    return c


def ensure_cache(model, ds, hook: str, out_dir: Path, batch_size: int = 256, num_workers: int = 2,
                 dtype: str = "float16"):
    """`cache_activations` into `out_dir`, reusing a complete cache of the same request (resuming an
    interrupted one): the caches the training benchmarks read are built once."""
    from sae_lens_vision_steer.activation_cache import cache_activations

    return cache_activations(model, ds, hook, out_dir, batch_size=batch_size, num_workers=num_workers,
                             dtype=dtype, show_progress=False)
