"""Fraction of variance unexplained (FVU) of an SAE on an activation cache.

- `per_sample_fvu_on_cache` / `fvu_distribution`: per-row FVU `||x - sae(x)||^2 / ||x - mu||^2` and
  its quantiles (thresholds for VS2's gate);
- `evaluate_sae_on_cache`: held-out FVU, L0 and dead latents of a trained SAE (on all rows, or a bounded
  sample of them).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sae_lens import SAE
from tqdm.auto import tqdm

from ..activation_cache import ActivationStore, ShardMaps
from ..core.errors import UsageError
from ..sae.metadata import activation_mean, check_sae_positions, sae_hook_name
from .batches import open_store, rows_mask


def _resolve_sae_hook(sae: SAE, cache: ActivationStore, hook_name: str | None) -> str:
    """The SAE's hook in the cache (its recorded hook; a different `hook_name` is refused), checked
    for width and for the token positions the SAE was trained on."""
    recorded = sae.cfg.metadata.get("hook_name")
    hook = cache.resolve_hook(sae_hook_name(sae, hook_name) if (recorded or hook_name) else None)
    if sae.cfg.d_in != cache.d_in(hook):
        raise UsageError(f"SAE d_in={sae.cfg.d_in} does not match hook {hook!r} of the cache at {cache.root}, "
                         f"whose width is {cache.d_in(hook)}")
    check_sae_positions(sae, cache.positions, f"in the cache at {cache.root}")
    return hook


def _fvu_mean(sae: SAE, cache: ActivationStore, hook: str, mean: torch.Tensor | None) -> torch.Tensor:
    if mean is not None:
        return torch.as_tensor(mean, dtype=torch.float32)
    recorded = sae.cfg.metadata.get("activation_mean")
    return torch.tensor(recorded, dtype=torch.float32) if recorded is not None else cache.mean(hook)


def fvu_of_reconstruction(x: torch.Tensor, rec: torch.Tensor, mean_D: torch.Tensor) -> torch.Tensor:
    """`||x - rec||^2 / ||x - mu||^2` per token (+inf for a token exactly at the mean)."""
    err = (x - rec).pow(2).sum(-1)
    var = (x - mean_D).pow(2).sum(-1)
    # A token exactly at the mean has undefined FVU: make it +inf so the gate never steers it.
    return err / var.clamp_min(torch.finfo(var.dtype).tiny)


def per_sample_fvu(x: torch.Tensor, sae: SAE, mean: torch.Tensor | None = None) -> torch.Tensor:
    """`||x - sae(x)||^2 / ||x - mu||^2` per token of `x` `[..., d_in]`, with mu the SAE's recorded
    training mean (`sae_metadata.activation_mean`; warns and uses `b_dec` when none is recorded)."""
    x_sae = x.to(sae.dtype)
    mu = activation_mean(sae) if mean is None else mean.to(device=x_sae.device, dtype=x_sae.dtype)
    return fvu_of_reconstruction(x_sae, sae(x_sae), mu)


@torch.no_grad()
def per_sample_fvu_on_cache(
    sae: SAE,
    cache: str | Path | ActivationStore,
    hook_name: str | None = None,
    rows: np.ndarray | Sequence[int] | None = None,
    mean: torch.Tensor | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Per-row FVU `||x - sae(x)||^2 / ||x - mu||^2` (float64 `[n]`), in row order, or in the order of `rows`.

    `mu` is `mean`, else the SAE's recorded `activation_mean` (the mean of its training activations,
    which test-time FVU gates use too), else the cache's mean.
    """
    cache = open_store(cache)
    hook = _resolve_sae_hook(sae, cache, hook_name)
    mask = rows_mask(cache, rows)
    mu = _fvu_mean(sae, cache, hook, mean).to(sae.W_dec.device)
    out = []
    for s, (first, count) in enumerate(cache.shard_offsets):
        sel = mask[first:first + count]
        if not sel.any():
            continue
        x_all = cache.read_shard(s, hook)["acts"][torch.from_numpy(sel)]
        for x in x_all.split(batch_size):
            x = x.to(sae.W_dec.device, sae.W_dec.dtype)
            recon = sae.decode(sae.encode(x))
            num = (x - recon).double().pow(2).sum(-1)
            den = (x - mu).double().pow(2).sum(-1)
            out.append((num / den).cpu().numpy())
    fvu = np.concatenate(out) if out else np.zeros(0)
    if rows is not None and np.asarray(rows).dtype != bool:
        # Back to the caller's order: fvu is in ascending row order of the unique selected rows.
        rows = np.asarray(rows, dtype=np.int64)
        fvu = fvu[np.searchsorted(np.nonzero(mask)[0], rows)]
    return fvu


def fvu_distribution(
    sae: SAE,
    cache: str | Path | ActivationStore,
    hook_name: str | None = None,
    quantiles: Sequence[float] = (0.5, 0.9, 0.95, 0.99, 0.995),
    rows: np.ndarray | Sequence[int] | None = None,
    mean: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Quantiles of per-sample FVU over the cache's rows (all, or `rows`), e.g. thresholds for a VS2 FVU gate.

    Returns `{"hook_name", "n_rows", "mean", "quantiles": {q: value}}`.
    """
    cache = open_store(cache)
    hook = _resolve_sae_hook(sae, cache, hook_name)
    fvu = per_sample_fvu_on_cache(sae, cache, hook, rows=rows, mean=mean)
    if fvu.size == 0:
        raise UsageError("no rows selected")
    return {
        "hook_name": hook,
        "n_rows": int(fvu.size),
        "mean": float(fvu.mean()),
        "quantiles": {float(q): float(np.quantile(fvu, q)) for q in quantiles},
    }


def sample_rows(mask: np.ndarray, max_rows: int | None, seed: int) -> np.ndarray:
    """The selected rows, ascending; at most `max_rows` of them, drawn without replacement by `seed`."""
    rows = np.flatnonzero(mask)
    if max_rows is not None and len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))
    return rows


@torch.no_grad()
def evaluate_sae_on_cache(sae: SAE, cache: ActivationStore | ShardMaps, hook: str, train_mask: np.ndarray,
                          heldout_mask: np.ndarray, batch_size: int = 4096, show_progress: bool = False,
                          max_rows: int | None = None, seed: int = 0, target_hook: str | None = None) -> dict[str, Any]:
    """Held-out FVU (`1 - explained variance` = sum ||x - x_rec||^2 / sum ||x - mean_heldout||^2), held-out
    mean L0, train FVU, and latent firing frequencies over the training rows (dead = never fires).
    `target_hook` (a transcoder): the SAE reads `hook` and is scored against the same rows of `target_hook`.

    `max_rows`: evaluate at most that many training rows and that many held-out rows, drawn by `seed`
    (`train_sae` uses 50,000: the closing evaluation then costs the same whatever the store's size); the
    `evaluation` entry of the result says how many rows of how many each figure comes from. `cache` may be
    the hook's `ShardMaps` (already checked); rows are gathered from the memory-mapped shards.
    """
    maps = cache if isinstance(cache, ShardMaps) else ShardMaps(cache, hook)
    target = target_hook or hook
    out_maps = maps if target == maps.hook else ShardMaps(maps.cache, target)
    d_sae = sae.cfg.d_sae
    fires = torch.zeros(d_sae, dtype=torch.float64)
    acc = {name: {"sse": 0.0, "sum": torch.zeros(out_maps.d_in, dtype=torch.float64), "sumsq": 0.0, "n": 0, "l0": 0.0}
           for name in ("train", "heldout")}
    dev = sae.W_dec.device
    chosen = {"train": sample_rows(train_mask, max_rows, seed), "heldout": sample_rows(heldout_mask, max_rows, seed + 1)}
    size = min(batch_size, max(1, max(len(r) for r in chosen.values())))
    buf, out_buf = maps.empty(size), (out_maps.empty(size) if out_maps is not maps else None)
    total = sum(-(-len(r) // batch_size) for r in chosen.values())
    with tqdm(total=total, desc="Evaluating SAE", disable=not show_progress) as bar:
        for name, rows in chosen.items():
            a = acc[name]
            for i in range(0, len(rows), batch_size):
                part = rows[i:i + batch_size]
                x = maps.as_torch(maps.gather(part, out=buf)).to(dev).to(sae.W_dec.dtype)
                y = x if out_buf is None else out_maps.as_torch(out_maps.gather(part, out=out_buf))
                codes = sae.encode(x)
                recon = sae.decode(codes)
                x = y.to(dev, sae.W_dec.dtype)  # what the decoder should reproduce
                x64 = x.double()
                a["sse"] += float((x - recon).double().pow(2).sum())
                a["sum"] += x64.sum(0).cpu()
                a["sumsq"] += float(x64.pow(2).sum())
                a["n"] += x.shape[0]
                active = (codes != 0)
                a["l0"] += float(active.sum())
                if name == "train":
                    fires += active.sum(0).double().cpu()
                bar.update()
            maps.release()
    out: dict[str, Any] = {}
    for name, a in acc.items():
        if a["n"] == 0:
            out[f"{name}_fvu"] = out[f"{name}_mean_l0"] = None
            continue
        m = a["sum"] / a["n"]
        total_var = a["sumsq"] - a["n"] * float(m @ m)
        if a["n"] < 2 or not total_var > 0:  # one row, or identical rows: FVU is undefined
            warnings.warn(f"FVU on the {name} rows is undefined: {a['n']} row(s) with no variance", stacklevel=2)
            out[f"{name}_fvu"] = None
        else:
            out[f"{name}_fvu"] = a["sse"] / total_var
        out[f"{name}_mean_l0"] = a["l0"] / a["n"]
        out[f"n_{name}_rows"] = a["n"]
    n_train = max(acc["train"]["n"], 1)
    freq = fires / n_train
    out["dead_fraction"] = float((fires == 0).double().mean())
    out["log_feature_sparsity"] = torch.log10(freq + 1e-10).float()  # SAELens' sparsity.safetensors convention
    out["evaluation"] = {
        "max_rows": max_rows, "seed": seed,
        "train_rows": len(chosen["train"]), "train_rows_total": int(train_mask.sum()),
        "heldout_rows": len(chosen["heldout"]), "heldout_rows_total": int(heldout_mask.sum()),
        "dead_fraction_from": ("the saved SAE on all training rows" if len(chosen["train"]) == int(train_mask.sum())
                               else f"the saved SAE on {len(chosen['train'])} training rows drawn at random "
                                    "(a latent firing more rarely than that may count as dead)"),
    }
    return out
