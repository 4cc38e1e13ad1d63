"""Top-k SAE training on an activation cache, with SAELens' `SAETrainer`, and FVU evaluation.

- `activation_batches`: the data provider: fixed-size batches shuffled across shards in a bounded
  buffer (SAELens' `mixing_buffer`), deterministic for a seed, optionally with class labels.
- `train_sae`: builds a SAELens training SAE by architecture name (`topk` by default; other
  registered training classes, such as a PASS SAE, plug in through `architecture=` and
  `sae_cfg_kwargs=`), trains it with `SAETrainer`, evaluates it on held-out images and saves it with
  `save_inference_model` so that `sae_lens.SAE.load_from_disk` loads it on its own.
- `per_sample_fvu_on_cache` / `fvu_distribution`: per-row FVU `||x - sae(x)||^2 / ||x - mu||^2`.

Resume: `train_sae(..., resume=True)` continues from the newest complete checkpoint in
`out_dir/checkpoints` (SAELens' own checkpoint files: SAE weights, optimizer, LR scheduler and
dead-latent counters). The data stream is replayed to the same batch, so a resumed run ends with the
same weights as an uninterrupted one (same machine and torch build). A finished run is returned as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from sae_lens import SAE, SAETrainer
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from sae_lens.training.mixing_buffer import mixing_buffer
from tqdm.auto import tqdm

from .activation_cache import ActivationCache, _file_mode, _write_json_atomic


# ---------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SAEPreset:
    expansion_factor: int
    k: int
    note: str = ""


# The paper's SAEs (final block hook_resid_post, CLS token). Epochs and batch size are not given there.
PAPER_PRESETS: dict[str, SAEPreset] = {
    "ViT-B-32": SAEPreset(expansion_factor=4, k=64),
    "ViT-B-16": SAEPreset(expansion_factor=4, k=256, note="one appendix of the paper says k=128"),
    "ViT-L-14": SAEPreset(expansion_factor=10, k=128),
}

# The paper counts dead latents with a threshold of 100; SAELens counts training steps since a latent fired.
DEFAULT_DEAD_FEATURE_WINDOW = 100
RUN_FILE = "training_run.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_DONE = "checkpoint_complete.json"


def default_hook_name(n_layers: int) -> str:
    return f"blocks.{n_layers - 1}.hook_resid_post"


# ---------------------------------------------------------------------------------- data
def _open(cache: str | Path | ActivationCache) -> ActivationCache:
    return cache if isinstance(cache, ActivationCache) else ActivationCache.open(cache)


def holdout_split(cache: str | Path | ActivationCache, fraction: float = 0.1,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices `(train_rows, heldout_rows)`, holding out whole images (all their rows), chosen
    by `seed` only (not the training seed, so SAEs trained with different seeds share a held-out set)."""
    cache = _open(cache)
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    images = np.unique(cache.image_index)
    n_held = int(round(len(images) * fraction))
    if fraction > 0:
        n_held = min(max(n_held, 1), len(images) - 1)
    held_images = np.random.default_rng(seed).choice(images, size=n_held, replace=False)
    held = np.isin(cache.image_index, held_images)
    return np.nonzero(~held)[0], np.nonzero(held)[0]


def _rows_mask(cache: ActivationCache, rows: np.ndarray | Sequence[int] | None) -> np.ndarray:
    if rows is None:
        return np.ones(cache.n_rows, dtype=bool)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        if rows.shape != (cache.n_rows,):
            raise ValueError(f"a boolean row mask must have shape ({cache.n_rows},), got {rows.shape}")
        return rows
    mask = np.zeros(cache.n_rows, dtype=bool)
    mask[rows.astype(np.int64)] = True
    return mask


def _shard_rows(cache: ActivationCache, hook: str, mask: np.ndarray, seed: int, epochs: int | None,
                with_labels: bool) -> Iterator[torch.Tensor]:
    """Selected rows shard by shard: shard order and within-shard order drawn per (seed, epoch)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        for s in np.random.default_rng([seed, epoch]).permutation(cache.n_shards):
            first, n = cache.shard_offsets[s]
            sel = mask[first:first + n]
            if not sel.any():
                continue
            shard = cache.read_shard(int(s), hook)
            perm = torch.from_numpy(np.random.default_rng([seed, epoch, int(s)]).permutation(int(sel.sum())))
            sel_t = torch.from_numpy(sel)
            acts = shard["acts"][sel_t][perm]
            if with_labels:
                # Packed as one extra column so that one shuffle moves activations and labels together,
                # as SAELens' multi_hook_concat_split_iter does for several hooks.
                acts = torch.cat([acts, shard["labels"][sel_t][perm].to(acts.dtype)[:, None]], dim=1)
            yield acts
        epoch += 1


def _with_private_torch_rng(it: Iterator[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """Run `it` under its own seeded torch RNG state.

    SAELens' `mixing_buffer` shuffles with torch's global generator; this keeps its permutations a
    function of `seed` alone (independent of whatever else draws random numbers), so a resumed run can
    replay the stream exactly.
    """
    state = torch.Generator().manual_seed(seed).get_state()
    while True:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            try:
                item = next(it)
            except StopIteration:
                return
            state = torch.get_rng_state()
        yield item


def activation_batches(
    cache: str | Path | ActivationCache,
    hook_name: str | None = None,
    batch_size: int = 256,
    *,
    rows: np.ndarray | Sequence[int] | None = None,
    seed: int = 0,
    epochs: int | None = None,
    buffer_size: int | None = None,
    mix_fraction: float = 0.5,
    with_labels: bool = False,
    skip_batches: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches `[batch_size, d_in]` of cached activations for `SAETrainer` (a `DataProvider`).

    Shards are visited in a per-epoch random order, rows shuffled within each shard and mixed across
    shards in SAELens' `mixing_buffer` of `buffer_size` rows (default: the largest of 32768 rows, two
    shards and four batches). `epochs=None` streams forever (SAETrainer stops at its sample count). Only full batches are
    yielded; rows left over at the end of an epoch carry into the next. The stream is a function of
    `seed` only. `with_labels=True` yields `(acts_BD, labels_B)` (int64, -1 where unknown) instead.
    `skip_batches` drops that many batches first (used to resume a run where it stopped).
    """
    cache = _open(cache)
    hook = cache.resolve_hook(hook_name)
    mask = _rows_mask(cache, rows)
    if not mask.any():
        raise ValueError("no rows selected: nothing to train on")
    if with_labels and np.abs(cache.labels).max(initial=0) >= 2**24:
        raise ValueError("labels must be below 2**24 to travel through the float32 mixing buffer")
    if buffer_size is None:
        buffer_size = max(4 * batch_size, 2 * cache.metadata["request"]["shard_size"], 32768)
    d = cache.d_in(hook)
    rows_iter = (x.to(dtype) for x in _shard_rows(cache, hook, mask, seed, epochs, with_labels))
    batches = _with_private_torch_rng(mixing_buffer(buffer_size, batch_size, rows_iter, mix_fraction), seed)
    for i, batch in enumerate(batches):
        if i < skip_batches:
            continue
        if with_labels:
            yield batch[:, :d], batch[:, d].round().long()
        else:
            yield batch


def mean_of_rows(cache: ActivationCache, hook: str, mask: np.ndarray) -> torch.Tensor:
    """float64 mean of the selected rows (streamed shard by shard)."""
    total, n = torch.zeros(cache.d_in(hook), dtype=torch.float64), 0
    for s, (first, count) in enumerate(cache.shard_offsets):
        sel = mask[first:first + count]
        if sel.any():
            total += cache.read_shard(s, hook, torch.float64)["acts"][torch.from_numpy(sel)].sum(0)
            n += int(sel.sum())
    return total / max(n, 1)


# ---------------------------------------------------------------------------------- evaluation
def _resolve_sae_hook(sae: SAE, cache: ActivationCache, hook_name: str | None) -> str:
    hook = hook_name or (sae.cfg.metadata.get("hook_name") if sae.cfg.metadata.get("hook_name") in cache.hook_names else None)
    hook = cache.resolve_hook(hook)
    if sae.cfg.d_in != cache.d_in(hook):
        raise ValueError(f"SAE d_in={sae.cfg.d_in} does not match hook {hook!r} of the cache at {cache.root}, "
                         f"whose width is {cache.d_in(hook)}")
    return hook


def _fvu_mean(sae: SAE, cache: ActivationCache, hook: str, mean: torch.Tensor | None) -> torch.Tensor:
    if mean is not None:
        return torch.as_tensor(mean, dtype=torch.float32)
    recorded = sae.cfg.metadata.get("activation_mean")
    return torch.tensor(recorded, dtype=torch.float32) if recorded is not None else cache.mean(hook)


@torch.no_grad()
def per_sample_fvu_on_cache(
    sae: SAE,
    cache: str | Path | ActivationCache,
    hook_name: str | None = None,
    rows: np.ndarray | Sequence[int] | None = None,
    mean: torch.Tensor | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Per-row FVU `||x - sae(x)||^2 / ||x - mu||^2` (float64 `[n]`), in row order, or in the order of `rows`.

    `mu` is `mean`, else the SAE's recorded `activation_mean` (the mean of its training activations,
    which test-time FVU gates use too), else the cache's mean.
    """
    cache = _open(cache)
    hook = _resolve_sae_hook(sae, cache, hook_name)
    mask = _rows_mask(cache, rows)
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
    cache: str | Path | ActivationCache,
    hook_name: str | None = None,
    quantiles: Sequence[float] = (0.5, 0.9, 0.95, 0.99, 0.995),
    rows: np.ndarray | Sequence[int] | None = None,
    mean: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Quantiles of per-sample FVU over the cache's rows (all, or `rows`), e.g. thresholds for a VS2 FVU gate.

    Returns `{"hook_name", "n_rows", "mean", "quantiles": {q: value}}`.
    """
    cache = _open(cache)
    hook = _resolve_sae_hook(sae, cache, hook_name)
    fvu = per_sample_fvu_on_cache(sae, cache, hook, rows=rows, mean=mean)
    if fvu.size == 0:
        raise ValueError("no rows selected")
    return {
        "hook_name": hook,
        "n_rows": int(fvu.size),
        "mean": float(fvu.mean()),
        "quantiles": {float(q): float(np.quantile(fvu, q)) for q in quantiles},
    }


@torch.no_grad()
def evaluate_sae_on_cache(sae: SAE, cache: ActivationCache, hook: str, train_mask: np.ndarray,
                          heldout_mask: np.ndarray, batch_size: int = 4096,
                          show_progress: bool = False) -> dict[str, Any]:
    """Held-out FVU (`1 - explained variance` = sum ||x - x_rec||^2 / sum ||x - mean_heldout||^2), held-out
    mean L0, train FVU, and latent firing frequencies over the training rows (dead = never fires)."""
    d_sae = sae.cfg.d_sae
    fires = torch.zeros(d_sae, dtype=torch.float64)
    acc = {name: {"sse": 0.0, "sum": torch.zeros(cache.d_in(hook), dtype=torch.float64), "sumsq": 0.0, "n": 0, "l0": 0.0}
           for name in ("train", "heldout")}
    dev = sae.W_dec.device
    for s, (first, count) in enumerate(tqdm(cache.shard_offsets, desc="Evaluating SAE", disable=not show_progress)):
        acts = None
        for name, mask in (("train", train_mask), ("heldout", heldout_mask)):
            sel = mask[first:first + count]
            if not sel.any():
                continue
            acts = cache.read_shard(s, hook)["acts"] if acts is None else acts
            a = acc[name]
            for x in acts[torch.from_numpy(sel)].split(batch_size):
                x = x.to(dev, sae.W_dec.dtype)
                codes = sae.encode(x)
                recon = sae.decode(codes)
                x64 = x.double()
                a["sse"] += float((x - recon).double().pow(2).sum())
                a["sum"] += x64.sum(0).cpu()
                a["sumsq"] += float(x64.pow(2).sum())
                a["n"] += x.shape[0]
                active = (codes != 0)
                a["l0"] += float(active.sum())
                if name == "train":
                    fires += active.sum(0).double().cpu()
    out: dict[str, Any] = {}
    for name, a in acc.items():
        if a["n"] == 0:
            out[f"{name}_fvu"] = out[f"{name}_mean_l0"] = None
            continue
        m = a["sum"] / a["n"]
        total_var = a["sumsq"] - a["n"] * float(m @ m)
        out[f"{name}_fvu"] = a["sse"] / total_var
        out[f"{name}_mean_l0"] = a["l0"] / a["n"]
        out[f"n_{name}_rows"] = a["n"]
    n_train = max(acc["train"]["n"], 1)
    freq = fires / n_train
    out["dead_fraction"] = float((fires == 0).double().mean())
    out["log_feature_sparsity"] = torch.log10(freq + 1e-10).float()  # SAELens' sparsity.safetensors convention
    return out


# ---------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainRunConfig:
    """Everything that defines a run; a resumed run must match it."""

    cache_dir: str
    cache_fingerprint: dict[str, Any]
    hook_name: str
    architecture: str
    k: int
    expansion_factor: int
    d_in: int
    lr: float
    lr_warm_up_steps: int
    lr_decay_steps: int
    batch_size: int
    total_training_samples: int
    seed: int
    holdout_fraction: float
    holdout_seed: int
    dead_feature_window: int
    decoder_init_norm: float | None
    aux_loss_coefficient: float
    buffer_size: int | None
    with_labels: bool
    device: str
    sae_cfg_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    sae: SAE
    out_dir: Path
    metrics: dict[str, Any]


class _CheckpointingProvider:
    """Wraps the data provider so that a Ctrl-C (SIGINT) or SIGTERM during training saves a checkpoint
    between two steps, where the trainer state is consistent, and then stops with KeyboardInterrupt."""

    def __init__(self, batches: Iterator[Any]):
        self.batches = batches
        self.trainer: SAETrainer | None = None
        self.stop_requested = False

    def __iter__(self) -> "_CheckpointingProvider":
        return self

    def __next__(self) -> Any:
        if self.stop_requested and self.trainer is not None:
            self.trainer.save_checkpoint(checkpoint_name=str(self.trainer.n_training_samples))
            raise KeyboardInterrupt("training interrupted; checkpoint saved, run again with resume to continue")
        return next(self.batches)


@contextlib.contextmanager
def _graceful_interrupts(provider: _CheckpointingProvider):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):  # second signal: stop at once
        if provider.stop_requested:
            raise KeyboardInterrupt
        provider.stop_requested = True

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _trainer_progress(show: bool):
    """SAETrainer makes its own tqdm bar with no switch; silence it when asked (a thin patch)."""
    import sae_lens.training.sae_trainer as trainer_module

    if show:
        yield
        return
    original = trainer_module.tqdm
    trainer_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        trainer_module.tqdm = original


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in ckpt_root.glob("*") if (p / CHECKPOINT_DONE).is_file() and p.name.isdigit()]
    return max(done, key=lambda p: int(p.name)) if done else None


def _mark_checkpoint(ckpt_root: Path, trainer_ref: list[SAETrainer], checkpoint_path: Path | None) -> None:
    """Called by SAETrainer after it wrote a checkpoint: mark it complete (atomically), drop older ones."""
    if checkpoint_path is None:
        return
    trainer = trainer_ref[0]
    _write_json_atomic(checkpoint_path / CHECKPOINT_DONE, {"n_training_samples": trainer.n_training_samples})
    for p in ckpt_root.glob("*"):
        if p.is_dir() and p != checkpoint_path:
            shutil.rmtree(p, ignore_errors=True)


def _run_config_diff(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [f"{k}: saved run has {found.get(k)!r}, request has {wanted.get(k)!r}"
            for k in wanted if k not in ("device", "cache_dir") and found.get(k) != wanted.get(k)]


def _build_training_sae(cfg: TrainRunConfig, metadata: SAEMetadata) -> TrainingSAE:
    sae_cls, cfg_cls = get_sae_training_class(cfg.architecture)
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    kwargs: dict[str, Any] = dict(
        d_in=cfg.d_in, d_sae=cfg.d_in * cfg.expansion_factor, dtype="float32", device=cfg.device,
        apply_b_dec_to_input=True,  # encode (x - b_dec): the paper's TopK(W_enc (x - b_pre))
        normalize_activations="none",
        # SAELens' default is the 0.1 "heuristic" init; Gao et al. / sparsify use unit-norm decoder rows
        # with W_enc = W_dec^T. Explicit here so that a SAELens default change does not change our SAEs.
        decoder_init_norm=cfg.decoder_init_norm,
        metadata=metadata,
    )
    if "k" in valid:
        kwargs["k"] = cfg.k
    if "aux_loss_coefficient" in valid:
        kwargs["aux_loss_coefficient"] = cfg.aux_loss_coefficient  # aux-k loss on dead latents: kept on
    if "rescale_acts_by_decoder_norm" in valid:
        kwargs["rescale_acts_by_decoder_norm"] = True  # top-k on unit-norm decoder rows (sparsify)
    unknown = set(cfg.sae_cfg_kwargs) - valid
    if unknown:
        raise ValueError(f"{cfg_cls.__name__} has no fields {sorted(unknown)}; valid fields: {sorted(valid)}")
    kwargs.update(cfg.sae_cfg_kwargs)
    return sae_cls(cfg_cls(**kwargs))


def train_sae(
    cache_dir: str | Path | ActivationCache,
    hook_name: str | None = None,
    *,
    k: int = 64,
    expansion_factor: int = 4,
    lr: float = 5e-4,
    lr_warm_up_steps: int | None = None,
    lr_decay_steps: int | None = None,
    batch_size: int = 256,
    total_training_samples: int | None = None,
    epochs: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    log_to_wandb: bool = False,
    out_dir: str | Path = "sae",
    holdout_fraction: float = 0.1,
    holdout_seed: int = 0,
    dead_feature_window: int = DEFAULT_DEAD_FEATURE_WINDOW,
    decoder_init_norm: float | None = 1.0,
    aux_loss_coefficient: float = 1.0,
    buffer_size: int | None = None,
    n_checkpoints: int = 10,
    architecture: str = "topk",
    sae_cfg_kwargs: dict[str, Any] | None = None,
    trainer_cls: type[SAETrainer] = SAETrainer,
    with_labels: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train a top-k SAE on one hook of an activation cache with SAELens, evaluate it, save it.

    - `hook_name`: default the cache's first hook. `epochs` or `total_training_samples` (default 10 epochs
      of the training rows); rounded down to whole batches.
    - Learning rate: linear warm-up (default 5% of steps) then linear decay to 0 (as sparsify, which the
      paper used); `lr_decay_steps` defaults to all steps after the warm-up.
    - `b_dec` starts at the mean of the training activations (SAELens starts it at zero).
    - `holdout_fraction` of the images (chosen by `holdout_seed`) are left out for evaluation.
    - Other objectives: `architecture` names a SAELens-registered training SAE class
      (`register_sae_training_class`) and `sae_cfg_kwargs` its extra config fields (e.g. `w_aux`);
      `with_labels=True` makes the data provider yield `(acts, labels)`, for a `trainer_cls` that uses them.
    - `resume=True`: continue from the newest checkpoint in `out_dir/checkpoints`, or return the finished
      SAE if the run already ended (the request must match the saved run). Without `resume`, a folder
      holding a run is refused unless `overwrite=True`.
    Saved to `out_dir` (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`, `training_run.json`).
    """
    t_start = time.perf_counter()
    if with_labels and trainer_cls is SAETrainer:
        raise ValueError("SAETrainer trains on activation tensors; with_labels=True needs a trainer_cls that "
                         "takes (acts, labels) batches")
    cache = _open(cache_dir)
    hook = cache.resolve_hook(hook_name)
    if total_training_samples is not None and epochs is not None:
        raise ValueError("give total_training_samples or epochs, not both")
    train_rows, held_rows = holdout_split(cache, holdout_fraction, holdout_seed)
    if total_training_samples is None:
        total_training_samples = int((10 if epochs is None else epochs) * len(train_rows))
    n_steps = total_training_samples // batch_size
    if n_steps < 1:
        raise ValueError(f"{total_training_samples} training samples make no batch of {batch_size}")
    total_training_samples = n_steps * batch_size
    warm = max(1, n_steps // 20) if lr_warm_up_steps is None else lr_warm_up_steps
    decay = (n_steps - warm) if lr_decay_steps is None else lr_decay_steps
    if warm + decay > n_steps:
        raise ValueError(f"lr_warm_up_steps + lr_decay_steps = {warm + decay} exceeds the {n_steps} training steps")
    req = cache.metadata["request"]
    cfg = TrainRunConfig(
        cache_dir=str(cache.root),
        cache_fingerprint={k_: req[k_] for k_ in ("model_name", "pretrained", "model_fingerprint", "dataset", "split",
                                                  "dataset_fingerprint", "positions", "dtype")} | {"n_rows": cache.n_rows},
        hook_name=hook, architecture=architecture, k=k, expansion_factor=expansion_factor, d_in=cache.d_in(hook),
        lr=lr, lr_warm_up_steps=warm, lr_decay_steps=decay, batch_size=batch_size,
        total_training_samples=total_training_samples, seed=seed, holdout_fraction=holdout_fraction,
        holdout_seed=holdout_seed, dead_feature_window=dead_feature_window, decoder_init_norm=decoder_init_norm,
        aux_loss_coefficient=aux_loss_coefficient, buffer_size=buffer_size, with_labels=with_labels, device=device,
        sae_cfg_kwargs=dict(sae_cfg_kwargs or {}),
    )

    out = Path(out_dir)
    run_path, ckpt_root = out / RUN_FILE, out / CHECKPOINT_DIR
    if overwrite and out.exists():
        for p in (run_path, out / "cfg.json", out / "sae_weights.safetensors", out / SPARSITY_FILENAME):
            p.unlink(missing_ok=True)
        shutil.rmtree(ckpt_root, ignore_errors=True)
    if run_path.is_file():
        saved = json.loads(run_path.read_text())
        if not resume:
            raise ValueError(f"{out} already holds a training run ({saved.get('status')}); "
                             "pass resume=True (--resume) to continue it or overwrite=True (--overwrite) to replace it")
        diffs = _run_config_diff(saved["config"], json.loads(json.dumps(cfg.to_dict())))
        if diffs:
            raise ValueError(f"cannot resume the run in {out}: it was started differently ({'; '.join(diffs)})")
        if saved.get("status") == "complete":
            return TrainResult(SAE.load_from_disk(out, device=device), out, saved["metrics"])
    elif (out / "cfg.json").exists() and not overwrite:
        raise ValueError(f"{out} already holds an SAE; choose another folder or overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(run_path, {"status": "running", "config": cfg.to_dict()})

    train_mask = _rows_mask(cache, train_rows)
    heldout_mask = _rows_mask(cache, held_rows)
    train_mean = mean_of_rows(cache, hook, train_mask)
    metadata = SAEMetadata(
        hook_name=hook, model_name=req["model_name"], pretrained=req["pretrained"], positions=req["positions"],
        dataset=req["dataset"], split=req["split"], objective=architecture,
        activation_mean=train_mean.tolist(),
    )
    if "w_aux" in cfg.sae_cfg_kwargs:
        metadata.w_aux = cfg.sae_cfg_kwargs["w_aux"]

    torch.manual_seed(seed)
    sae = _build_training_sae(cfg, metadata)
    with torch.no_grad():  # Gao et al.: b_pre starts at the data mean; SAELens would start it at zero
        sae.b_dec.copy_(train_mean.to(sae.b_dec.dtype))

    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_training_samples, train_batch_size_samples=batch_size,
        lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=warm, lr_decay_steps=decay,
        device=device, dead_feature_window=dead_feature_window,
        feature_sampling_window=max(n_steps + 1, 2000),  # one window: sparsity statistics over the whole run
        n_checkpoints=n_checkpoints, checkpoint_path=str(ckpt_root), save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=log_to_wandb, run_name=out.name),
    )
    resume_from = _latest_checkpoint(ckpt_root) if resume else None
    skip = 0
    if resume_from is not None:
        skip = json.loads((resume_from / CHECKPOINT_DONE).read_text())["n_training_samples"] // batch_size
    batches = activation_batches(cache, hook, batch_size, rows=train_mask, seed=seed, buffer_size=buffer_size,
                                 with_labels=with_labels, skip_batches=skip)
    provider = _CheckpointingProvider(batches)
    trainer_ref: list[SAETrainer] = []
    trainer = trainer_cls(cfg=trainer_cfg, sae=sae, data_provider=provider,
                          save_checkpoint_fn=functools.partial(_mark_checkpoint, ckpt_root, trainer_ref))
    trainer_ref.append(trainer)
    provider.trainer = trainer
    if resume_from is not None:
        trainer.load_trainer_state(resume_from)
        sae.load_weights_from_checkpoint(resume_from)
        # SAELens checkpoints inside a step, before it counts the step: count from the samples seen.
        trainer.n_training_steps = trainer.n_training_samples // batch_size
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
    samples_before = trainer.n_training_samples

    if log_to_wandb:
        import wandb

        wandb.init(project="sae_lens_vision_steer", name=out.name, config=cfg.to_dict())
    t_fit = time.perf_counter()
    with _graceful_interrupts(provider), _trainer_progress(show_progress):
        trainer.fit()
    fit_seconds = time.perf_counter() - t_fit
    if log_to_wandb:
        wandb.finish()

    # Save once, load the inference SAE back, evaluate exactly what was saved, then save with the metrics.
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_inference_model(tmp)
    metrics = evaluate_sae_on_cache(SAE.load_from_disk(tmp, device=device), cache, hook, train_mask, heldout_mask,
                                    show_progress=show_progress)
    sparsity = metrics.pop("log_feature_sparsity")
    sae.cfg.metadata.n_training_samples = total_training_samples
    sae.cfg.metadata.heldout_fvu = metrics["heldout_fvu"]
    sae.cfg.metadata.mean_l0 = metrics["heldout_mean_l0"] if metrics["heldout_mean_l0"] is not None else metrics["train_mean_l0"]
    sae.cfg.metadata.dead_fraction = metrics["dead_fraction"]
    sae.cfg.metadata.heldout_fraction = holdout_fraction
    sae.cfg.metadata.holdout_seed = holdout_seed
    sae.cfg.metadata.seed = seed
    import sae_lens_vision_steer

    sae.cfg.metadata.vision_steer_version = sae_lens_vision_steer.__version__
    sae.save_inference_model(tmp)
    save_file({"sparsity": sparsity}, tmp / SPARSITY_FILENAME)
    for name in ("sae_weights.safetensors", SPARSITY_FILENAME, "cfg.json"):  # cfg.json last: it marks an SAE
        os.chmod(tmp / name, _file_mode())  # safetensors writes 0600; give the usual permissions
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)

    trained_now = trainer.n_training_samples - samples_before
    metrics |= {
        "n_training_samples": total_training_samples,
        "n_training_steps": n_steps,
        "resumed_from_samples": samples_before if resume_from is not None else None,
        "fit_seconds": fit_seconds,
        "train_samples_per_second": trained_now / fit_seconds if fit_seconds > 0 else None,
        "total_seconds": time.perf_counter() - t_start,
    }
    _write_json_atomic(run_path, {"status": "complete", "config": cfg.to_dict(), "metrics": metrics})
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return TrainResult(SAE.load_from_disk(out, device=device), out, metrics)
