"""Choosing VS2's (lambda, gamma): the sweep's selection protocol.

`select_steering(model, data, sae, classifier, SweepConfig(...))` scores a steering method on every cell
of a lambda x gamma grid from one cached backbone pass, on the split the config names:

- `select_on="eval"`: the evaluation split itself. The best cell's accuracy is then test-tuned, and the
  outcome carries a warning saying so.
- `select_on="train-holdout"`: a held-out part of the training split (`holdout_split`), with its labels
  used only to pick the cell; zero-shot, the method at the chosen cell and at the paper's setting are then
  evaluated on the evaluation split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core.errors import UsageError
from ..steering.vs2 import PAPER_GAMMA, PAPER_LAM
from .runner import Evaluator, MethodSpec, evaluate, sweep_vs2

SELECT_ON = ("eval", "train-holdout")
EVAL_SELECTION_WARNING = (
    "WARNING: the sweep is selected on the evaluation split itself ({split}): the best cell's accuracy "
    "is an optimistic, test-tuned number. Use --select-on train-holdout for a fair choice."
)
HOLDOUT_NOTE = ("the held-out images may have been part of the SAE's (label-free) training data; only their "
                "labels are used here, for choosing the cell")


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """The grid, the method and where its cell is chosen; the evaluation settings shared by every cell."""

    lams: tuple[float, ...]
    gammas: tuple[float, ...]
    method: str = "vs2"
    select_on: str = "eval"
    holdout_fraction: float = 0.1
    fvu_threshold: float | None = None
    gate_methods: tuple[str, ...] = ("vs2",)
    hook_name: str | None = None
    batch_size: int = 256
    num_workers: int = 2
    options: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # extra fields for the summary's config
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.lams or not self.gammas:
            raise UsageError("lams and gammas need at least one value each", arguments=("lams", "gammas"))
        if self.select_on not in SELECT_ON:
            raise UsageError(f"select_on must be one of {SELECT_ON}, got {self.select_on!r}", arguments=("select_on",))
        if self.select_on == "train-holdout" and not 0 < self.holdout_fraction <= 1:
            raise UsageError(f"holdout_fraction must be in (0, 1], got {self.holdout_fraction}",
                             arguments=("holdout_fraction",))


@dataclass
class SweepOutcome:
    sweep: Any  # SweepResult
    selection: str  # "<dataset>/<split>" the cell was chosen on
    final: Any | None  # EvaluationResult on the evaluation split (train-holdout only)
    summary: dict[str, Any]  # what sweep.json holds
    warning: str | None


def holdout_split(train_data: Any, eval_data: Any, fraction: float) -> Any:
    """`fraction` of the training split (evenly spaced, every class) to choose the cell on."""
    held = train_data.subset(max(1, round(fraction * len(train_data))))
    if list(held.classnames) != list(eval_data.classnames):
        raise UsageError("the training split's classes differ from the evaluation split's")
    return held


def select_steering(model: Any, data: Any, sae: Any, classifier: Any, cfg: SweepConfig,
                    select_data: Any | None = None) -> SweepOutcome:
    """Sweep `cfg.method` over the grid on `select_data` (default: `data`, the evaluation split), pick the
    best cell, and for a held-out selection evaluate it on `data` next to zero-shot and the paper's cell."""
    if cfg.select_on == "train-holdout" and select_data is None:
        raise UsageError("select_on='train-holdout' needs the held-out training images (holdout_split)")
    select_data = data if cfg.select_on == "eval" else select_data
    ev = Evaluator(model, select_data, sae, classifier, cfg.hook_name, cfg.batch_size, cfg.num_workers,
                   cfg.show_progress, options=cfg.options, fvu_threshold=cfg.fvu_threshold,
                   gate_methods=list(cfg.gate_methods), prepare=[cfg.method])
    sweep = sweep_vs2(ev, list(cfg.lams), list(cfg.gammas), selected_on=cfg.select_on,
                      show_progress=cfg.show_progress, method=cfg.method)
    lam, gamma, _ = sweep.best
    selection = f"{select_data.dataset_id}/{select_data.split}"
    summary: dict[str, Any] = {
        "config": {"sweep_method": cfg.method, "model": model.cfg.model_name, "pretrained": model.cfg.pretrained,
                   "dataset": data.dataset_id, "split": data.split, "selection_data": selection,
                   "hook_name": ev.cached.hook_name, "fvu_threshold": cfg.fvu_threshold,
                   "gated_methods": list(cfg.gate_methods) if cfg.fvu_threshold is not None else [],
                   "holdout_fraction": cfg.holdout_fraction if cfg.select_on == "train-holdout" else None,
                   **cfg.record},
        "sweep": sweep.to_json(),
        "timing": {"backbone_s": ev.cached.seconds, "sweep_s": sweep.seconds, "n_backbone_passes": ev.n_backbone_passes},
    }
    warning, final = None, None
    if cfg.select_on == "eval":
        warning = summary["warning"] = EVAL_SELECTION_WARNING.format(split=selection)
    else:
        summary["note"] = HOLDOUT_NOTE
        final = evaluate(model, data, sae,
                         [MethodSpec("zeroshot", "zeroshot"),
                          MethodSpec(cfg.method, cfg.method, {"lam": lam, "gamma": gamma}),
                          MethodSpec(f"{cfg.method}_paper", cfg.method, {"lam": PAPER_LAM, "gamma": PAPER_GAMMA})],
                         lam=lam, gamma=gamma, fvu_threshold=cfg.fvu_threshold, classifier=classifier,
                         hook_name=cfg.hook_name, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         show_progress=cfg.show_progress, options=cfg.options,
                         config={"selected_on": selection, **cfg.record}, gate_methods=list(cfg.gate_methods))
        summary["evaluation"] = {k: {"top1": v.top1, "delta_top1": v.delta_top1, "coverage": v.coverage}
                                 for k, v in final.methods.items()}
    return SweepOutcome(sweep, selection, final, summary, warning)


__all__ = ["EVAL_SELECTION_WARNING", "SELECT_ON", "SweepConfig", "SweepOutcome", "holdout_split", "select_steering"]
