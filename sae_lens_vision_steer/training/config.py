"""What `train_sae` trains: `TrainConfig` (frozen, checked on construction), the paper's SAE sizes per
backbone (`sae_size`), the architecture names SAELens' registry knows, and `TrainRunConfig`, what a saved
run records (and a resumed run must match)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

from ..core.errors import UnknownNameError, UsageError


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


def check_architecture(name: str) -> None:
    """Refuse a training architecture SAELens' registry does not know, with SAELens' list."""
    if name not in SAE_TRAINING_CLASS_REGISTRY:
        raise UnknownNameError(f"SAELens has no training architecture={name!r}; its registry holds "
                               f"{sorted(SAE_TRAINING_CLASS_REGISTRY)}", arguments=("architecture",))


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
            raise UsageError(f"train_fraction must be in (0, 1], got {self.train_fraction}",
                             arguments=("train_fraction",))
        check_training_args(**self.checked())

    def checked(self) -> dict[str, Any]:
        return dict(k=self.k, expansion_factor=self.expansion_factor, lr=self.lr, batch_size=self.batch_size,
                    epochs=self.epochs, total_training_samples=self.total_training_samples,
                    lr_warm_up_steps=self.lr_warm_up_steps, lr_decay_steps=self.lr_decay_steps,
                    holdout_fraction=self.holdout_fraction, n_checkpoints=self.n_checkpoints)
