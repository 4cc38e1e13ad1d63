"""PASS: prototype-aligned SAE training (arXiv 2506.01247), as a SAELens training architecture.

    L = L_topk + w_aux * mean_i ||z_i - zbar_{y_i}||^2

`L_topk` is SAELens' top-k training loss unchanged (MSE + the dead-latent auxiliary loss); `z_i` is
the sparse code of training image `i`, `y_i` its class, `zbar_y` the class's prototype code, and
`w_aux = 0.8` by default (the paper's value). Labels are used only in training: the trained SAE is
saved as an ordinary `topk` inference SAE (`SAE.load_from_disk`, `VS2Steering` use it unchanged),
with `objective="pass"` and `w_aux` in its metadata. At test time PASS is plain VS2 with this SAE.

How it plugs into SAELens:
- `PassTrainingSAE` subclasses `TopKTrainingSAE` and is registered as training architecture
  `"pass"` (`sae_lens.register_sae_training_class`); its inference config class is `TopKSAEConfig`,
  so `save_inference_model` writes `architecture="topk"`.
- SAELens' `SAETrainer` pulls plain activation tensors from its `data_provider` and builds the
  `TrainStepInput` itself, so labels have no slot there. Rather than subclass the trainer, the
  labels travel beside the activations: `LabelRoutingProvider` wraps an iterator of
  `(acts, labels)` batches, hands each batch's labels to the SAE (`set_step_labels`) and yields the
  activations. `training_forward_pass` takes the labels (or `PassTrainStepInput.labels` when called
  directly) and checks they match the batch size, so a mismatch fails loudly instead of silently
  pairing activations with the wrong labels.

Differences from the paper (it does not say how the prototypes are computed):
- Prototypes are running means, not learned parameters: a buffer `prototypes_CS` [n_classes,
  d_sae] on the SAE. At every step the batch's class-mean codes (detached) update it as an
  exponential moving average, `zbar_y <- m zbar_y + (1 - m) mean_{i in batch, y_i = y} z_i`
  (`prototype_momentum` m = 0.9; a class seen for the first time starts at its batch mean). The
  loss then pulls each code towards its class's updated, detached prototype, so the gradient flows
  only through `z_i` (as in centre-loss training). Per-batch class means alone would be too noisy
  with ~20 images per class per batch; a frozen mean from the start would chase untrained codes.
- The codes are the top-k feature activations as SAELens trains them (with
  `rescale_acts_by_decoder_norm`, in unit-decoder-norm units), i.e. the same values the saved
  inference SAE's `encode` returns after the decoder norms are folded in.
- The prototype term is a sum over latents averaged over the batch, on the same scale as SAELens'
  MSE term (also summed over dimensions and averaged over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from sae_lens import (
    SAETrainer,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    register_sae_training_class,
)
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

from ..core.errors import UsageError

PASS_ARCHITECTURE = "pass"
DEFAULT_W_AUX = 0.8
DEFAULT_PROTOTYPE_MOMENTUM = 0.9
PROTOTYPE_BUFFERS = ("prototypes_CS", "prototype_seen_C")


@dataclass(kw_only=True)
class PassTrainingSAEConfig(TopKTrainingSAEConfig):
    """`TopKTrainingSAEConfig` plus the PASS term: `w_aux`, the number of classes and the EMA momentum."""

    n_classes: int
    w_aux: float = DEFAULT_W_AUX
    prototype_momentum: float = DEFAULT_PROTOTYPE_MOMENTUM

    def __post_init__(self) -> None:
        if self.n_classes < 1:
            raise UsageError(f"PASS needs n_classes >= 1, got {self.n_classes}")
        if not (self.w_aux >= 0 and np.isfinite(self.w_aux)):
            raise UsageError(f"w_aux must be a finite number >= 0, got {self.w_aux}")
        if not 0.0 <= self.prototype_momentum < 1.0:
            raise UsageError(f"prototype_momentum must be in [0, 1), got {self.prototype_momentum}")
        super().__post_init__()
        self.metadata.objective = "pass"
        self.metadata.w_aux = float(self.w_aux)

    @classmethod
    def architecture(cls) -> str:
        return PASS_ARCHITECTURE

    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig  # the saved SAE is a plain top-k SAE


@dataclass
class PassTrainStepInput(TrainStepInput):
    """A `TrainStepInput` with class labels, for calling `training_forward_pass` directly."""

    labels: torch.Tensor | None = None


class PassTrainingSAE(TopKTrainingSAE):
    """Top-k training SAE with the PASS prototype loss. See the module docstring."""

    cfg: PassTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: PassTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # Buffers: saved in training checkpoints (so a resumed run keeps its prototypes), dropped
        # from the inference SAE (see process_state_dict_for_saving_inference).
        self.register_buffer("prototypes_CS", torch.zeros(cfg.n_classes, cfg.d_sae, dtype=self.dtype, device=self.device))
        self.register_buffer("prototype_seen_C", torch.zeros(cfg.n_classes, dtype=torch.bool, device=self.device))
        self._step_labels: torch.Tensor | None = None

    # ------------------------------------------------------------------ labels
    def set_step_labels(self, labels_B: torch.Tensor | np.ndarray) -> None:
        """Labels of the next training batch (called by `LabelRoutingProvider`)."""
        self._step_labels = torch.as_tensor(labels_B, dtype=torch.long)

    def _labels_for(self, step_input: TrainStepInput, batch_size: int) -> torch.Tensor:
        labels = getattr(step_input, "labels", None)
        if labels is None:
            labels, self._step_labels = self._step_labels, None  # each batch's labels are used once
        if labels is None:
            raise RuntimeError("PASS training needs class labels for every batch: feed the trainer through "
                               "LabelRoutingProvider (or pass PassTrainStepInput(labels=...))")
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.prototypes_CS.device)
        if labels.shape != (batch_size,):
            raise RuntimeError(f"PASS got {tuple(labels.shape)} labels for a batch of {batch_size} activations")
        if bool((labels < 0).any()) or bool((labels >= self.cfg.n_classes).any()):
            raise UsageError(f"PASS labels must lie in [0, {self.cfg.n_classes}); got min {int(labels.min())}, "
                             f"max {int(labels.max())} (-1 marks an image without a label)")
        return labels

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def update_prototypes(self, codes_BS: torch.Tensor, labels_B: torch.Tensor) -> None:
        """EMA update of the class prototypes with this batch's class-mean codes."""
        C = self.cfg.n_classes
        sums_CS = torch.zeros(C, codes_BS.shape[1], dtype=self.prototypes_CS.dtype, device=codes_BS.device)
        sums_CS.index_add_(0, labels_B, codes_BS.detach().to(sums_CS.dtype))
        counts_C = torch.bincount(labels_B, minlength=C)
        present_C = counts_C > 0
        batch_mean_CS = sums_CS / counts_C.clamp_min(1)[:, None].to(sums_CS.dtype)
        m = self.cfg.prototype_momentum
        ema_CS = torch.where(self.prototype_seen_C[:, None], m * self.prototypes_CS + (1 - m) * batch_mean_CS,
                             batch_mean_CS)
        self.prototypes_CS.copy_(torch.where(present_C[:, None], ema_CS, self.prototypes_CS))
        self.prototype_seen_C |= present_C

    def prototype_loss(self, codes_BS: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """`mean_i ||z_i - zbar_{y_i}||^2` against the updated, detached prototypes (unweighted)."""
        if codes_BS.is_sparse:
            codes_BS = codes_BS.to_dense()
        self.update_prototypes(codes_BS, labels_B)
        target_BS = self.prototypes_CS[labels_B].to(codes_BS.dtype)
        return (codes_BS - target_BS).pow(2).sum(dim=-1).mean()

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        # Fetch the labels first so a missing or misaligned batch fails before any work.
        self._current_labels = self._labels_for(step_input, step_input.sae_in.shape[0])
        try:
            return super().training_forward_pass(step_input)
        finally:
            self._current_labels = None

    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts: torch.Tensor, hidden_pre: torch.Tensor,
                           sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = super().calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)
        labels = getattr(self, "_current_labels", None)
        if labels is None:
            labels = self._labels_for(step_input, feature_acts.shape[0])
        losses["pass_prototype_loss"] = self.cfg.w_aux * self.prototype_loss(feature_acts, labels)
        return losses

    # ------------------------------------------------------------------ saving
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        for name in PROTOTYPE_BUFFERS:  # training-only state: the inference SAE is a plain top-k SAE
            state_dict.pop(name, None)
        super().process_state_dict_for_saving_inference(state_dict)


def register_pass_architecture() -> None:
    """Register `"pass"` with SAELens (idempotent; done on import of this module)."""
    if PASS_ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class(PASS_ARCHITECTURE, PassTrainingSAE, PassTrainingSAEConfig)


register_pass_architecture()


# ---------------------------------------------------------------------------------- labels in training
class LabelRoutingProvider:
    """`Iterator[Tensor]` for `SAETrainer(data_provider=...)` over an iterator of `(acts, labels)`.

    Each `next()` hands the batch's labels to the PASS SAE and returns the activations, so SAELens'
    trainer runs unchanged (it calls `next(data_provider)` and then the training step on that batch).
    """

    def __init__(self, labelled_batches: Iterator[tuple[torch.Tensor, torch.Tensor]], sae: PassTrainingSAE):
        self.batches = labelled_batches
        self.sae = sae

    def __iter__(self) -> "LabelRoutingProvider":
        return self

    def __next__(self) -> torch.Tensor:
        batch = next(self.batches)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("LabelRoutingProvider needs (activations, labels) batches; "
                            "use the data provider's labels mode")
        acts, labels = batch
        if len(acts) != len(labels):
            raise UsageError(f"batch of {len(acts)} activations but {len(labels)} labels")
        self.sae.set_step_labels(labels)
        return acts


class PassSAETrainer(SAETrainer):
    """`SAETrainer` whose data provider yields `(acts, labels)`: it wraps the provider in a
    `LabelRoutingProvider` for the PASS SAE and is otherwise SAELens' trainer unchanged.
    (`training.train_sae(trainer_cls=PassSAETrainer, with_labels=True)` uses it.)"""

    def __init__(self, cfg: Any, sae: PassTrainingSAE, data_provider: Iterator[Any], *args: Any, **kwargs: Any):
        if not isinstance(sae, PassTrainingSAE):
            raise TypeError(f"PassSAETrainer trains a PassTrainingSAE, got {type(sae).__name__}")
        super().__init__(cfg, sae, LabelRoutingProvider(data_provider, sae), *args, **kwargs)


def check_pass_labels(labels: np.ndarray | torch.Tensor, n_classes: int | None = None) -> int:
    """Validate training labels for PASS before training starts; return the number of classes.

    The prototypes get one row per class, so the class count comes from the data (`n_classes`: the data
    set's classes, which a cache records), never from the largest label: a label outside
    `[0, n_classes)` is refused naming it and its row. Every row needs a label: `-1` (an image without
    a label) is a clear error naming how many rows and the first one. Without `n_classes` (a cache made
    before it was recorded) the count is `max(label) + 1`, refused when it exceeds the number of rows.
    """
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1 or y.size == 0:
        raise UsageError("PASS needs a non-empty 1-D array of class labels")
    missing = np.flatnonzero(y == -1)
    if missing.size:
        raise UsageError(f"PASS trains with class labels, but {missing.size} of {y.size} cached rows have no label "
                         f"(label -1; first at row {int(missing[0])}). Cache a labelled split, or train with "
                         "objective='topk'.")
    if n_classes is not None and n_classes < 1:
        raise UsageError(f"PASS needs n_classes >= 1, got {n_classes}")
    top = n_classes if n_classes is not None else y.size
    bad = np.flatnonzero((y < 0) | (y >= top))
    if bad.size:
        first = int(bad[0])
        where = (f"the {n_classes} classes of the data set" if n_classes is not None else
                 f"what a cache of {y.size} rows that does not record its class count can hold (cache it again "
                 "with this version, which records it, or pass n_classes)")
        raise UsageError(f"{bad.size} of {y.size} cached rows have a label outside [0, {top}), {where}: first "
                         f"label {int(y[first])} at row {first}")
    return n_classes if n_classes is not None else int(y.max()) + 1


def _class_means(z: torch.Tensor, y: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean code of each class in `classes` (sorted; zero for a class without rows): memory grows with the
    classes present, not with the largest label."""
    slot = torch.searchsorted(classes, y)
    sums = torch.zeros(len(classes), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, slot, z)
    return sums / torch.bincount(slot, minlength=len(classes)).clamp_min(1)[:, None].to(z.dtype)


@torch.no_grad()
def prototype_distance(codes_NS: torch.Tensor, labels_N: torch.Tensor | np.ndarray,
                       prototypes_CS: torch.Tensor | None = None) -> dict[str, float]:
    """How tightly codes gather around their class prototypes.

    `mean_sq_dist`: `mean_i ||z_i - zbar_{y_i}||^2`, with `zbar` the given prototypes or, by default,
    the class means of these codes; `within_class_fraction`: that divided by `mean_i ||z_i - zbar||^2`
    (distance to the global mean code), which does not change when all codes are scaled.
    """
    z = codes_NS.float()
    y = torch.as_tensor(np.asarray(labels_N), dtype=torch.long, device=z.device)
    if prototypes_CS is None:
        classes = torch.unique(y)
        prototype_of_row = _class_means(z, y, classes)[torch.searchsorted(classes, y)]
    else:
        prototype_of_row = prototypes_CS.float()[y]
    within = (z - prototype_of_row).pow(2).sum(-1).mean().item()
    total = (z - z.mean(0)).pow(2).sum(-1).mean().item()
    return {"mean_sq_dist": within, "total_sq_dist": total,
            "within_class_fraction": within / total if total > 0 else float("nan")}


def train_pass_sae(cache_dir: str | Path, hook_name: str | None = None, *, w_aux: float = DEFAULT_W_AUX,
                   prototype_momentum: float = DEFAULT_PROTOTYPE_MOMENTUM, n_classes: int | None = None,
                   **train_kwargs: Any):
    """`training.train_sae` with the PASS objective: checks the cache's labels first (every image
    needs one), then trains a `PassTrainingSAE` through `PassSAETrainer` on `(acts, labels)` batches.
    Other keyword arguments (k, expansion_factor, epochs, seed, out_dir, resume, ...) are `train_sae`'s.
    """
    from ..activation_cache import ActivationStore
    from .trainer import train_sae

    cache = ActivationStore.open(cache_dir)
    if n_classes is None:  # the data set's class count, recorded by the cache (not the largest label)
        n_classes = cache.metadata.get("request", {}).get("n_classes")
    n_classes = check_pass_labels(cache.labels, n_classes)
    for reserved in ("architecture", "trainer_cls", "with_labels"):
        if reserved in train_kwargs:
            raise UsageError(f"train_pass_sae sets {reserved} itself")
    sae_cfg_kwargs = {**train_kwargs.pop("sae_cfg_kwargs", {}), "w_aux": float(w_aux), "n_classes": n_classes,
                      "prototype_momentum": float(prototype_momentum)}
    return train_sae(cache, hook_name, architecture=PASS_ARCHITECTURE, sae_cfg_kwargs=sae_cfg_kwargs,
                     trainer_cls=PassSAETrainer, with_labels=True, **train_kwargs)


@torch.no_grad()
def prototype_distance_on_cache(sae, cache_dir: str | Path, rows: Sequence[int] | np.ndarray,
                                prototype_rows: Sequence[int] | np.ndarray | None = None,
                                hook_name: str | None = None, batch_size: int = 4096) -> dict[str, float]:
    """`prototype_distance` of the SAE's codes on cache rows `rows` (e.g. held-out images), with
    prototypes = class-mean codes over `prototype_rows` (e.g. the training rows; default `rows`)."""
    from ..activation_cache import ActivationStore

    cache = ActivationStore.open(cache_dir)
    hook = cache.resolve_hook(hook_name or sae.cfg.metadata.get("hook_name"))

    def codes(r: np.ndarray) -> torch.Tensor:
        acts = cache.load(hook, rows=r)
        return torch.cat([sae.encode(a.to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
                          for a in acts.split(batch_size)])

    rows = np.asarray(rows, dtype=np.int64)
    labels = torch.as_tensor(cache.labels[rows])
    z = codes(rows)
    if prototype_rows is None:
        return prototype_distance(z, labels)
    prototype_rows = np.asarray(prototype_rows, dtype=np.int64)
    zp, yp = codes(prototype_rows), torch.as_tensor(cache.labels[prototype_rows])
    # prototypes of the classes present (zero for a class without prototype rows), labels renumbered to them
    classes = torch.unique(torch.cat([yp, labels]))
    protos = _class_means(zp, yp, classes)
    return prototype_distance(z, torch.searchsorted(classes, labels), protos)


__all__ = [
    "DEFAULT_PROTOTYPE_MOMENTUM", "DEFAULT_W_AUX", "LabelRoutingProvider", "PASS_ARCHITECTURE", "PassSAETrainer",
    "PassTrainStepInput", "PassTrainingSAE", "PassTrainingSAEConfig", "check_pass_labels", "prototype_distance",
    "prototype_distance_on_cache", "register_pass_architecture", "train_pass_sae",
]
