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

import dataclasses
import functools
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sae_lens import SAE, SAETrainer
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.registry import get_sae_training_class
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
from .checkpoints import (  # noqa: F401  (re-exported: the CLI's resume hints)
    CHECKPOINT_DIR,
    CHECKPOINT_DONE,
    RUN_FILE,
    graceful_interrupts,
    latest_checkpoint,
    mark_checkpoint,
    trainer_progress,
)
from .config import (  # noqa: F401  (re-exported: train_sae's config and the paper's sizes)
    DEFAULT_DEAD_FEATURE_WINDOW,
    DEFAULT_EVAL_ROWS,
    SAEPreset,
    TrainConfig,
    TrainRunConfig,
    check_architecture,
    check_training_args,
    default_hook_name,
    sae_size,
)
from .fvu import evaluate_sae_on_cache, fvu_distribution, per_sample_fvu_on_cache  # noqa: F401 (re-exported)
from .transcoder import is_transcoder_config, paired_batches


@dataclass(frozen=True)
class TrainResult:
    sae: SAE
    out_dir: Path
    metrics: dict[str, Any]


def _run_config_diff(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return describe_differences(request_differences(found, wanted, wanted, skip=("device", "cache_dir")),
                                "saved run")


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
                          save_checkpoint_fn=functools.partial(mark_checkpoint, ckpt_root, trainer_ref))
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
        with graceful_interrupts(stop), trainer_progress(show_progress):
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
