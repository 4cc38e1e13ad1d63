"""Top-k SAE training on an activation cache, with SAELens' `SAETrainer`.

- `activation_batches` (in `batches`): the data provider: fixed-size batches from the memory-mapped shards
  in a global block shuffle, deterministic for a seed; the trainer is fed it directly, as plain SAELens is.
- `train_sae`: builds a SAELens training SAE by architecture name (`topk` by default; other
  registered training classes, such as a PASS SAE, plug in through `architecture=` and
  `sae_cfg_kwargs=`), trains it with `SAETrainer`, evaluates it on held-out images and saves it with
  `save_inference_model` so that `sae_lens.SAE.load_from_disk` loads it on its own.
- `per_sample_fvu_on_cache` / `fvu_distribution` (in `fvu`, re-exported here): per-row FVU.

Resume: `train_sae(..., resume=True)` continues from the newest complete checkpoint in
`out_dir/checkpoints` (SAELens' own checkpoint files: SAE weights, optimizer, LR scheduler and
dead-latent counters). The data stream starts again at the same batch, so a resumed run ends with the
same weights as an uninterrupted one (same machine and torch build). A finished run is returned as is.
One run per folder at a time (a second writer is refused); arguments are checked before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE, SAETrainer
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, get_sae_training_class
from sae_lens.saes.sae import SAEMetadata, TrainingSAE
from safetensors.torch import save_file

from .._version import __version__
from ..activation_cache import ActivationStore
from ..core.errors import ConflictError, UnknownNameError, UsageError
from ..core.fileio import (
    check_writable_dir,
    exclusive_writer,
    file_mode,
    write_json_atomic,
)
from ..core.requests import describe_differences, request_differences
from ..sae.metadata import no_language_model_advice, training_metadata
from .batches import (  # noqa: F401
    LoaderStats,
    StopRequested,
    activation_batches,
    holdout_split,
    image_subset,
    mean_of_rows,
    open_store,
    rows_mask,
    shard_maps,
)
from .fvu import evaluate_sae_on_cache, fvu_distribution, per_sample_fvu_on_cache  # noqa: F401 (re-exported)
from .transcoder import is_transcoder_config, paired_batches


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
DEFAULT_EVAL_ROWS = 50_000  # the closing evaluation's sample of training rows (and of held-out rows)


def default_hook_name(n_layers: int) -> str:
    return f"blocks.{n_layers - 1}.hook_resid_post"


def sae_size(model_name: str | None, k: int | None = None, expansion_factor: int | None = None,
             preset: str | None = None) -> tuple[int, int, str]:
    """`(k, expansion_factor, source)`: explicit values win, then the named `preset`, then the paper's
    preset for `model_name`, then 64 and 4 (`vision-steer train` and `run` both use this)."""
    if preset is not None and preset not in PAPER_PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {sorted(PAPER_PRESETS)}")
    p = PAPER_PRESETS.get(preset or model_name or "")
    source = f"the paper's preset for {preset or model_name}" if p else "the defaults (no paper preset for this model)"
    return (k if k is not None else (p.k if p else 64),
            expansion_factor if expansion_factor is not None else (p.expansion_factor if p else 4), source)


def check_training_args(*, k: int, expansion_factor: int, lr: float, batch_size: int, epochs: float | None,
                        total_training_samples: int | None, lr_warm_up_steps: int | None,
                        lr_decay_steps: int | None, holdout_fraction: float, n_checkpoints: int,
                        d_in: int | None = None) -> None:
    """Refuse out-of-range settings before any work (each error names its argument; the CLI adds the flag)."""
    def positive_int(name: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{name} must be a positive whole number, got {v!r}", arguments=(name,))

    positive_int("k", k)
    positive_int("expansion_factor", expansion_factor)
    positive_int("batch_size", batch_size)
    if total_training_samples is not None:
        positive_int("total_training_samples", total_training_samples)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UsageError(f"lr must be a positive number, got {lr!r}", arguments=("lr",))
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise UsageError(f"epochs must be a positive number, got {epochs!r}", arguments=("epochs",))
    for name, v in (("lr_warm_up_steps", lr_warm_up_steps), ("lr_decay_steps", lr_decay_steps),
                    ("n_checkpoints", n_checkpoints)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise UsageError(f"{name} must be a whole number >= 0, got {v!r}", arguments=(name,))
    if not 0 <= holdout_fraction < 1:
        raise UsageError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}", arguments=("holdout_fraction",))
    if d_in is not None and k > d_in * expansion_factor:
        raise UsageError(f"k={k} is larger than d_sae = d_in x expansion_factor = {d_in} x {expansion_factor} = "
                         f"{d_in * expansion_factor}; use a smaller k or a larger expansion_factor",
                         arguments=("k", "expansion_factor"))


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
    hook_name_out: str | None = None  # a transcoder's output hook
    d_out: int | None = None
    train_fraction: float | None = None  # None: all of the training images

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    sae: SAE
    out_dir: Path
    metrics: dict[str, Any]


@contextlib.contextmanager
def _graceful_interrupts(stop: threading.Event):
    """A Ctrl-C (SIGINT) or SIGTERM during training sets `stop`: the data provider then raises
    `StopRequested` from its next `next()`, between two steps, where the trainer state is consistent (a
    second signal stops at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

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


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in ckpt_root.glob("*") if (p / CHECKPOINT_DONE).is_file() and p.name.isdigit()]
    return max(done, key=lambda p: int(p.name)) if done else None


def _mark_checkpoint(ckpt_root: Path, trainer_ref: list[SAETrainer], checkpoint_path: Path | None) -> None:
    """Called by SAETrainer after it wrote a checkpoint: mark it complete (atomically), drop older ones."""
    if checkpoint_path is None:
        return
    trainer = trainer_ref[0]
    write_json_atomic(checkpoint_path / CHECKPOINT_DONE, {"n_training_samples": trainer.n_training_samples})
    for p in ckpt_root.glob("*"):
        if p.is_dir() and p != checkpoint_path:
            shutil.rmtree(p, ignore_errors=True)


def _run_config_diff(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return describe_differences(request_differences(found, wanted, wanted, skip=("device", "cache_dir")),
                                "saved run")


def check_architecture(name: str) -> None:
    """Refuse a training architecture SAELens' registry does not know, with SAELens' list."""
    if name not in SAE_TRAINING_CLASS_REGISTRY:
        raise UnknownNameError(f"SAELens has no training architecture={name!r}; its registry holds "
                               f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}", arguments=("architecture",))


def _build_training_sae(cfg: TrainRunConfig, metadata: SAEMetadata) -> TrainingSAE:
    check_architecture(cfg.architecture)
    sae_cls, cfg_cls = get_sae_training_class(cfg.architecture)
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    transcoder = is_transcoder_config(cfg_cls)
    if transcoder != (cfg.hook_name_out is not None):
        raise UsageError(f"architecture {cfg.architecture!r} " + (
            "is a transcoder: give its output hook, hook_name_out" if transcoder else
            "maps a hook onto itself; a transcoder (an output hook, hook_name_out) needs architecture='transcoder'"),
            arguments=("hook_name_out", "architecture"))
    d_sae = cfg.d_in * cfg.expansion_factor
    kwargs: dict[str, Any] = dict(
        d_in=cfg.d_in, d_sae=d_sae, dtype="float32", device=cfg.device,
        # encode (x - b_dec): the paper's TopK(W_enc (x - b_pre)); a transcoder's b_dec is in the output space
        apply_b_dec_to_input=not transcoder,
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
    if "matryoshka_widths" in valid:  # SAELens has no default: nested prefixes of 1/4, 1/2 and all latents
        kwargs["matryoshka_widths"] = sorted({w for w in (d_sae // 4, d_sae // 2, d_sae) if w > 0})
    if transcoder:
        kwargs["d_out"] = cfg.d_out
    unknown = set(cfg.sae_cfg_kwargs) - valid
    if unknown:
        raise UsageError(f"{cfg_cls.__name__} has no fields {sorted(unknown)} (sae_cfg_kwargs); valid fields: "
                         f"{sorted(valid)}", arguments=("sae_cfg_kwargs",))
    kwargs.update(cfg.sae_cfg_kwargs)
    try:  # SAELens checks its settings in the config and in the SAE's constructor: a bad setting, not a bug
        return sae_cls(cfg_cls(**kwargs))
    except (ValueError, TypeError) as e:
        raise UsageError(f"SAELens' {cfg.architecture!r} architecture refused the settings (sae_cfg_kwargs): {e}",
                         arguments=("sae_cfg_kwargs",)) from e


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What `train_sae` trains and how; every value is checked when the config is made.

    - `epochs` or `total_training_samples` (default 10 epochs of the training rows); rounded down to whole
      batches.
    - Learning rate: linear warm-up (default 5% of steps) then linear decay to 0 (as sparsify, which the
      paper used); `lr_decay_steps` defaults to all steps after the warm-up.
    - `holdout_fraction` of the images (chosen by `holdout_seed`) are left out for evaluation.
    - `decoder_init_norm`: the norm of the initial decoder rows; `"auto"`: 1.0 (unit-norm rows, Gao et al.,
      with `W_enc = W_dec^T` where SAELens ties them) for an SAE, 0.1 (SAELens' own default) for a
      transcoder, whose input and output are different spaces.
    - The closing evaluation (held-out FVU, L0, dead latents) runs on at most `eval_rows` training rows and
      as many held-out rows, drawn at random (None: every row); the metrics say which.
    - `train_fraction` < 1 trains on that fraction of the other images (nested subsets: 10% lies inside 25%,
      chosen by `holdout_seed`; the held-out images stay the same), with the number of training samples of
      the whole split (`epochs` count passes over all of it), so only the amount of data changes.
    - `architecture` names a SAELens-registered training SAE class (`register_sae_training_class`) and
      `sae_cfg_kwargs` its extra config fields (e.g. `w_aux`); `with_labels=True` makes the data provider
      yield `(acts, labels)`, for a `trainer_cls` that uses them.
    """

    k: int = 64
    expansion_factor: int = 4
    architecture: str = "topk"
    sae_cfg_kwargs: dict[str, Any] = field(default_factory=dict)
    lr: float = 5e-4
    lr_warm_up_steps: int | None = None
    lr_decay_steps: int | None = None
    batch_size: int = 256
    total_training_samples: int | None = None
    epochs: float | None = None
    seed: int = 0
    device: str = "cpu"
    holdout_fraction: float = 0.1
    holdout_seed: int = 0
    dead_feature_window: int = DEFAULT_DEAD_FEATURE_WINDOW
    decoder_init_norm: float | str | None = "auto"
    aux_loss_coefficient: float = 1.0
    buffer_size: int | None = None
    n_checkpoints: int = 10
    with_labels: bool = False
    log_to_wandb: bool = False
    eval_rows: int | None = DEFAULT_EVAL_ROWS
    train_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.total_training_samples is not None and self.epochs is not None:
            raise UsageError("give total_training_samples or epochs, not both")
        check_architecture(self.architecture)
        d = self.decoder_init_norm
        if not (d is None or d == "auto" or (isinstance(d, (int, float)) and not isinstance(d, bool)
                                            and math.isfinite(d) and d > 0)):
            raise UsageError(f"decoder_init_norm must be a positive number, None or 'auto', got {d!r}",
                             arguments=("decoder_init_norm",))
        if not 0 < self.train_fraction <= 1:
            raise UsageError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        check_training_args(**self.checked())

    def checked(self) -> dict[str, Any]:
        return dict(k=self.k, expansion_factor=self.expansion_factor, lr=self.lr, batch_size=self.batch_size,
                    epochs=self.epochs, total_training_samples=self.total_training_samples,
                    lr_warm_up_steps=self.lr_warm_up_steps, lr_decay_steps=self.lr_decay_steps,
                    holdout_fraction=self.holdout_fraction, n_checkpoints=self.n_checkpoints)


def train_sae(
    cache_dir: str | Path | ActivationStore,
    hook_name: str | None = None,
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path = "sae",
    hook_name_out: str | None = None,
    trainer_cls: type[SAETrainer] = SAETrainer,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
    **fields: Any,
) -> TrainResult:
    """Train an SAE (top-k unless `config.architecture` says otherwise) on one hook of an activation store
    with SAELens, evaluate it, save it.

    `config` says what to train (`TrainConfig`); `**fields` are `TrainConfig` fields, given instead of or on
    top of `config` (`train_sae(store, hook, k=16, epochs=2)`). `hook_name`: default the store's first hook.
    `b_dec` starts at the mean of the training activations (SAELens starts it at zero).
    `hook_name_out` (with `architecture="transcoder"`): train a transcoder from `hook_name` to this hook of
    the same store (same rows); its `b_dec` starts at the output hook's mean.
    `resume=True`: continue from the newest checkpoint in `out_dir/checkpoints`, or return the finished SAE
    if the run already ended (the request must match the saved run). Without `resume`, a folder holding a
    run is refused unless `overwrite=True`. Saved to `out_dir` (`cfg.json`, `sae_weights.safetensors`,
    `sparsity.safetensors`, `training_run.json`).
    """
    t_start = time.perf_counter()
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TypeError(f"train_sae() got unexpected arguments {unknown}; TrainConfig's fields are "
                        f"{[f.name for f in dataclasses.fields(TrainConfig)]}")
    c = dataclasses.replace(config, **fields) if config is not None else TrainConfig(**fields)
    if c.with_labels and trainer_cls is SAETrainer:
        raise UsageError("SAETrainer trains on activation tensors; with_labels=True needs a trainer_cls that "
                         "takes (acts, labels) batches")
    if hook_name_out is not None and c.with_labels:
        raise UsageError("a transcoder (hook_name_out) trains on (input, output) activation pairs; with_labels=True "
                         "is not supported", arguments=("hook_name_out",))
    cache = open_store(cache_dir)
    hook = cache.resolve_hook(hook_name)
    hook_out = None
    if hook_name_out is not None:
        if hook_name_out not in cache.hook_names:
            raise UnknownNameError(f"the transcoder's output hook, hook_name_out={hook_name_out!r}, is not in the "
                                   f"cache at {cache.root}; it holds {cache.hook_names}", arguments=("hook_name_out",))
        hook_out = hook_name_out
    if hook_out == hook:
        raise UsageError(f"a transcoder's output hook, hook_name_out, must differ from its input hook ({hook!r})",
                         arguments=("hook_name_out",))
    check_training_args(**c.checked(), d_in=cache.d_in(hook))
    train_rows, held_rows = holdout_split(cache, c.holdout_fraction, c.holdout_seed)
    if c.holdout_fraction > 0 and len(held_rows) < 2:
        raise UsageError(f"the held-out set has {len(held_rows)} row(s) ({len(np.unique(cache.image_index[held_rows]))} "
                         f"image(s)): its FVU needs at least 2 rows. Cache more images, raise --holdout-fraction, "
                         "or use --holdout-fraction 0")
    total_training_samples = c.total_training_samples
    if total_training_samples is None:
        total_training_samples = int((10 if c.epochs is None else c.epochs) * len(train_rows))
    if c.train_fraction < 1:
        train_rows = image_subset(cache, train_rows, c.train_fraction, c.holdout_seed)
    n_steps = total_training_samples // c.batch_size
    if n_steps < 1:
        raise UsageError(f"{total_training_samples} training samples make no batch of {c.batch_size}")
    total_training_samples = n_steps * c.batch_size
    warm = max(1, n_steps // 20) if c.lr_warm_up_steps is None else c.lr_warm_up_steps
    decay = (n_steps - warm) if c.lr_decay_steps is None else c.lr_decay_steps
    if warm + decay > n_steps:
        raise UsageError(f"lr_warm_up_steps + lr_decay_steps = {warm + decay} exceeds the {n_steps} training steps")
    req = cache.metadata["request"]
    cfg = TrainRunConfig(
        cache_dir=str(cache.root),
        cache_fingerprint={k_: req[k_] for k_ in ("model_name", "pretrained", "model_fingerprint", "dataset", "split",
                                                  "dataset_fingerprint", "positions", "dtype")} | {"n_rows": cache.n_rows},
        hook_name=hook, architecture=c.architecture, k=c.k, expansion_factor=c.expansion_factor,
        d_in=cache.d_in(hook), lr=c.lr, lr_warm_up_steps=warm, lr_decay_steps=decay, batch_size=c.batch_size,
        total_training_samples=total_training_samples, seed=c.seed, holdout_fraction=c.holdout_fraction,
        holdout_seed=c.holdout_seed, dead_feature_window=c.dead_feature_window,
        decoder_init_norm=(0.1 if hook_out else 1.0) if c.decoder_init_norm == "auto" else c.decoder_init_norm,
        aux_loss_coefficient=c.aux_loss_coefficient,
        buffer_size=c.buffer_size, with_labels=c.with_labels, device=c.device,
        sae_cfg_kwargs=dict(c.sae_cfg_kwargs or {}),
        train_fraction=c.train_fraction if c.train_fraction < 1 else None,
        hook_name_out=hook_out, d_out=cache.d_in(hook_out) if hook_out is not None else None,
    )
    run = RunControl(resume=resume, overwrite=overwrite, log_to_wandb=c.log_to_wandb, trainer_cls=trainer_cls,
                     show_progress=show_progress, t_start=t_start, n_checkpoints=c.n_checkpoints,
                     eval_rows=c.eval_rows)
    out = check_writable_dir(out_dir, "SAE folder")
    with exclusive_writer(out, "SAE training run", ConflictError), no_language_model_advice():
        return _train_locked(cache, hook, cfg, req, out, train_rows, held_rows, run)


@dataclass(frozen=True)
class RunControl:
    """How one training run is carried out (not part of what it trains)."""

    resume: bool
    overwrite: bool
    log_to_wandb: bool
    trainer_cls: type[SAETrainer]
    show_progress: bool
    t_start: float
    n_checkpoints: int
    eval_rows: int | None = DEFAULT_EVAL_ROWS


def _train_locked(cache: ActivationStore, hook: str, cfg: TrainRunConfig, req: dict[str, Any], out: Path,
                  train_rows: np.ndarray, held_rows: np.ndarray, run: RunControl) -> TrainResult:
    resume, overwrite, log_to_wandb, trainer_cls = run.resume, run.overwrite, run.log_to_wandb, run.trainer_cls
    show_progress, t_start, n_checkpoints = run.show_progress, run.t_start, run.n_checkpoints
    device, seed, batch_size, n_steps = cfg.device, cfg.seed, cfg.batch_size, cfg.total_training_samples // cfg.batch_size
    total_training_samples, holdout_fraction, holdout_seed = cfg.total_training_samples, cfg.holdout_fraction, cfg.holdout_seed
    lr, warm, decay, architecture = cfg.lr, cfg.lr_warm_up_steps, cfg.lr_decay_steps, cfg.architecture
    dead_feature_window, buffer_size, with_labels = cfg.dead_feature_window, cfg.buffer_size, cfg.with_labels
    run_path, ckpt_root = out / RUN_FILE, out / CHECKPOINT_DIR
    if overwrite and out.exists():
        for p in (run_path, out / "cfg.json", out / "sae_weights.safetensors", out / SPARSITY_FILENAME):
            p.unlink(missing_ok=True)
        shutil.rmtree(ckpt_root, ignore_errors=True)
    if run_path.is_file():
        saved = json.loads(run_path.read_text())
        if not resume:
            raise ConflictError(f"{out} already holds a training run ({saved.get('status')}); "
                             "pass resume=True to continue it or overwrite=True to replace it",
                                 arguments=("resume", "overwrite"))
        diffs = _run_config_diff(saved["config"], json.loads(json.dumps(cfg.to_dict())))
        if diffs:
            raise ConflictError(f"cannot resume the run in {out}: it was started differently ({'; '.join(diffs)})")
        if saved.get("status") == "complete":
            return TrainResult(SAE.load_from_disk(out, device=device), out, saved["metrics"])
    elif (out / "cfg.json").exists() and not overwrite:
        raise ConflictError(f"{out} already holds an SAE; choose another folder or overwrite=True",
                            arguments=("overwrite",))
    write_json_atomic(run_path, {"status": "running", "config": cfg.to_dict()})

    train_mask = rows_mask(cache, train_rows)
    heldout_mask = rows_mask(cache, held_rows)
    t_open = time.perf_counter()
    maps = shard_maps(cache, hook)  # memory-mapped shards, checked once here (sha256, finite values)
    out_maps = shard_maps(cache, cfg.hook_name_out) if cfg.hook_name_out is not None else maps
    open_seconds = time.perf_counter() - t_open
    train_mean = mean_of_rows(out_maps, out_maps.hook, train_mask)  # of what the decoder writes
    metadata = SAEMetadata(**training_metadata(req, hook, architecture, train_mean.tolist()))
    if cfg.hook_name_out is not None:
        metadata.hook_name_out = cfg.hook_name_out
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
    resume_from = latest_checkpoint(ckpt_root) if resume else None
    skip = 0
    if resume_from is not None:
        skip = json.loads((resume_from / CHECKPOINT_DONE).read_text())["n_training_samples"] // batch_size
    # The trainer is fed the loader itself, as plain SAELens is fed its data provider: nothing in between.
    loader_stats, stop = LoaderStats(), threading.Event()
    if cfg.hook_name_out is not None:  # a transcoder: input and output rows side by side
        batches = paired_batches(cache, hook, cfg.hook_name_out, batch_size, maps=(maps, out_maps), rows=train_mask,
                                 seed=seed, buffer_size=buffer_size, skip_batches=skip, device=device,
                                 stats=loader_stats, stop=stop)
    else:
        batches = activation_batches(maps, hook, batch_size, rows=train_mask, seed=seed, buffer_size=buffer_size,
                                     with_labels=with_labels, skip_batches=skip, device=device, stats=loader_stats,
                                     stop=stop)
    trainer_ref: list[SAETrainer] = []
    trainer = trainer_cls(cfg=trainer_cfg, sae=sae, data_provider=batches,
                          save_checkpoint_fn=functools.partial(_mark_checkpoint, ckpt_root, trainer_ref))
    trainer_ref.append(trainer)
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
    t_fit, cpu_fit = time.perf_counter(), time.process_time()
    try:
        with _graceful_interrupts(stop), _trainer_progress(show_progress):
            trainer.fit()
    except StopRequested:  # raised by next(batches), before a step: the state is consistent
        trainer.save_checkpoint(checkpoint_name=str(trainer.n_training_samples))
        raise KeyboardInterrupt("training interrupted; checkpoint saved, run again with resume to continue") from None
    finally:
        batches.close()  # stops a prefetching thread now, not when the iterator is collected
    fit_seconds, fit_cpu_seconds = time.perf_counter() - t_fit, time.process_time() - cpu_fit
    if log_to_wandb:
        wandb.finish()

    # Save once, load the inference SAE back, evaluate exactly what was saved, then save with the metrics.
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_inference_model(tmp)
    t_eval = time.perf_counter()
    metrics = evaluate_sae_on_cache(SAE.load_from_disk(tmp, device=device), maps, hook, train_mask, heldout_mask,
                                    show_progress=show_progress, max_rows=run.eval_rows, seed=holdout_seed,
                                    target_hook=cfg.hook_name_out)
    eval_seconds = time.perf_counter() - t_eval
    sparsity = metrics.pop("log_feature_sparsity")
    sae.cfg.metadata.n_training_samples = total_training_samples
    sae.cfg.metadata.heldout_fvu = metrics["heldout_fvu"]
    sae.cfg.metadata.mean_l0 = metrics["heldout_mean_l0"] if metrics["heldout_mean_l0"] is not None else metrics["train_mean_l0"]
    sae.cfg.metadata.dead_fraction = metrics["dead_fraction"]
    sae.cfg.metadata.evaluation = metrics["evaluation"]  # how many rows of how many the figures come from
    sae.cfg.metadata.heldout_fraction = holdout_fraction
    sae.cfg.metadata.holdout_seed = holdout_seed
    sae.cfg.metadata.seed = seed
    sae.cfg.metadata.vision_steer_version = __version__
    sae.save_inference_model(tmp)
    save_file({"sparsity": sparsity}, tmp / SPARSITY_FILENAME)
    for name in ("sae_weights.safetensors", SPARSITY_FILENAME, "cfg.json"):  # cfg.json last: it marks an SAE
        os.chmod(tmp / name, file_mode())  # safetensors writes 0600; give the usual permissions
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)

    trained_now = trainer.n_training_samples - samples_before
    metrics |= {
        "n_training_samples": total_training_samples,
        "n_training_steps": n_steps,
        "resumed_from_samples": samples_before if resume_from is not None else None,
        "fit_seconds": fit_seconds,
        "fit_cpu_seconds": fit_cpu_seconds,  # this process's CPU time in the fit (all its threads)
        "train_samples_per_second": trained_now / fit_seconds if fit_seconds > 0 else None,
        # The loader's own rate and the time the trainer waited for data (without prefetching: all of the
        # loader's time); the one-time mapping and checking of the shards; the closing evaluation.
        "loader_samples_per_second": loader_stats.samples_per_second,
        "loader_wait_seconds": loader_stats.wait_seconds,
        "open_seconds": open_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - t_start,
    }
    write_json_atomic(run_path, {"status": "complete", "config": cfg.to_dict(), "metrics": metrics})
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return TrainResult(SAE.load_from_disk(out, device=device), out, metrics)
