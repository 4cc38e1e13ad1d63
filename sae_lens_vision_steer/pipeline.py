"""The main job as one library call: cache -> train -> gate -> evaluate.

`vision-steer run` is `run_pipeline(PipelineConfig(...), model)`; `reproduce` runs the same stages cell by
cell (`cache_stage`, `train_stage`, `gate_stage`, `evaluate_stage`). Each stage reuses or resumes its
output when the request matches what is on disk, and refuses one made differently, naming the difference:

    OUT/cache_train/   the activation store of the training split
    OUT/sae/           the SAELens SAE
    OUT/results.json   results.md, per_class_<method>.png (a union: summary.* and one folder per member)
    OUT/run.json       what ran, with each stage's time, the SAE's metrics and its FVU distribution

Unions of data sets (`dataset="cifar100,cub200"`) are handled here, once: the gate over the chosen
members' training rows, and evaluation per member with its own classes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .activation_cache import ActivationStore, cache_activations
from .core import distributed
from .core.errors import InputError, UsageError
from .core.outputs import prepare_output_dir
from .data import ImageDataset, load_image_dataset
from .evaluation import evaluate
from .evaluation.union import evaluate_members
from .training.config import TrainConfig
from .training.fvu import fvu_distribution
from .training.gate import gate_threshold
from .training.trainer import TrainResult, train_sae

OBJECTIVES = ("topk", "pass")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Everything `run_pipeline` needs besides the model. `train` says what SAE to train; `options` are
    the evaluation methods' extra inputs (`n_neighbours`, a retrieval backbone, ...)."""

    out: str | Path
    dataset: str = "cifar100"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "val"
    train_limit: int | None = None
    eval_limit: int | None = None
    skip_bad_images: bool = False
    hook: str | None = None  # default: the model's steering hook (final block, CLS)
    batch_size: int = 256
    num_workers: int = 2
    cache_dtype: str = "float16"
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = ("zeroshot", "vs2", "rec_final", "rec_final_gamma")
    lam: float | None = None
    gamma: float | None = None
    fvu_threshold: float | None = None
    fvu_quantile: float | None = None
    gate_methods: tuple[str, ...] = ("vs2",)
    gate_datasets: tuple[str, ...] | None = None
    templates: str | None = None
    text_cache: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # extra fields for results.json's config
    request: dict[str, Any] = field(default_factory=dict)  # what the output folder is keyed by
    # Request keys that change only the evaluation (lam, gamma, the gate, methods, ...): a finished folder
    # whose record differs only in these reuses its cache and SAE and is evaluated again.
    reevaluate_keys: tuple[str, ...] = ()
    overwrite: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.methods:
            raise UsageError("methods is empty")
        if self.fvu_threshold is not None and self.fvu_quantile is not None:
            raise UsageError("give fvu_threshold or fvu_quantile, not both")


@dataclass
class PipelineResult:
    out: Path
    hook: str
    store: ActivationStore
    trained: TrainResult
    fvu_threshold: float | None
    result: Any  # EvaluationResult, or UnionEvaluation for a union
    written: dict[str, Path]
    stages: dict[str, float]
    reused: list[str]
    changed: list[str] = field(default_factory=list)  # the evaluation settings that differ from the last run


# ---------------------------------------------------------------------------------- stages
def load_splits(model: Any, cfg: PipelineConfig, log: Callable[[str], None] = print
                ) -> tuple[ImageDataset, ImageDataset]:
    """The training and evaluation splits, checked to share their classes (member by member)."""
    train = load_image_dataset(cfg.dataset, cfg.train_split, cfg.data_dir, model.preprocess, cfg.train_limit,
                               cfg.skip_bad_images)
    test = load_image_dataset(cfg.dataset, cfg.eval_split, cfg.data_dir, model.preprocess, cfg.eval_limit,
                              cfg.skip_bad_images)
    pairs = zip(train.members, test.members) if is_union(test) else [(train, test)]
    for tr, ev in pairs:
        if list(tr.classnames) != list(ev.classnames):
            raise InputError(f"the training and evaluation splits of {ev.dataset_id} have different classes")
    if (train.dataset_id, train.split) == (test.dataset_id, test.split):
        log(f"WARNING: training and evaluating on the same images ({test.dataset_id}/{test.split}), "
            "as the train and eval splits ask")
    return train, test


def is_union(data: Any) -> bool:
    return getattr(data, "members", None) is not None


def cache_stage(model: Any, data: ImageDataset, hook: str, folder: str | Path, *, dtype: str = "float16",
                batch_size: int = 256, num_workers: int = 2, show_progress: bool = True,
                overwrite: bool = False) -> tuple[ActivationStore, bool]:
    """`(store, reused)`: the CLS activations of `data` at `hook`, reused when complete and matching."""
    reused = store_complete(folder) and not overwrite
    store = cache_activations(model, data, hook, folder, positions="cls", dtype=dtype, batch_size=batch_size,
                              num_workers=num_workers, show_progress=show_progress, overwrite=overwrite)
    return (store if isinstance(store, ActivationStore) else ActivationStore.open(folder)), reused


def train_stage(store: ActivationStore, hook: str, config: TrainConfig, folder: str | Path, *,
                objective: str = "topk", w_aux: float | None = None, show_progress: bool = True,
                overwrite: bool = False) -> tuple[TrainResult, bool]:
    """`(trained, reused)`: a top-k or PASS SAE on `store` at `hook`, resumed or returned when finished."""
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown SAE objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    reused = training_complete(folder) and not overwrite
    if objective == "pass":
        from .training.pass_sae import train_pass_sae

        extra = {} if w_aux is None else {"w_aux": w_aux}
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                  if f.name not in ("architecture", "with_labels", "sae_cfg_kwargs")}
        trained = train_pass_sae(store.root, hook, out_dir=folder, resume=True, overwrite=overwrite,
                                 show_progress=show_progress, **extra, **fields)
    else:
        trained = train_sae(store, hook, config, out_dir=folder, resume=True, overwrite=overwrite,
                            show_progress=show_progress)
    return trained, reused


def gate_stage(sae: Any, store: ActivationStore, quantile: float | None, threshold: float | None = None,
               datasets: Sequence[str] | None = None, hook: str | None = None, model: Any = None
               ) -> tuple[float | None, dict[str, Any]]:
    """The gate's `tau` and what to record of it: `threshold` as given, or the `quantile` of per-sample FVU
    over the store's rows (the chosen members' rows of a union store)."""
    if quantile is None:
        return threshold, {}
    tau, info = gate_threshold(sae, store, quantile, datasets=datasets, hook_name=hook, model=model)
    record = {"fvu_quantile": quantile, "reference_cache": str(store.root)}
    if store.metadata.get("request", {}).get("members") or datasets:
        record |= {"gate_datasets": info["datasets"], "gate_rows": info["rows_per_dataset"]}
    return tau, record


def evaluate_stage(model: Any, data: ImageDataset, sae: Any, methods: Sequence[Any], **kwargs: Any) -> Any:
    """`evaluation.evaluate` on one data set, or on each member of a union with its own classes and
    templates (`evaluation.union.evaluate_members`). Keyword arguments are `evaluate`'s."""
    if is_union(data):
        return evaluate_members(model, data.members, sae, methods, **kwargs)
    return evaluate(model, data, sae, methods, **kwargs)


def store_complete(folder: str | Path) -> bool:
    import json

    meta = Path(folder) / "metadata.json"
    try:
        return bool(json.loads(meta.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def training_complete(folder: str | Path) -> bool:
    import json

    try:
        return json.loads((Path(folder) / "training_run.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------- the main job
def run_pipeline(cfg: PipelineConfig, model: Any, log: Callable[[str], None] = print,
                 on_result: Callable[[Any], None] | None = None) -> PipelineResult:
    """Cache the training split at `cfg.hook` (CLS), train the SAE, calibrate the gate on the training
    rows, evaluate every method on one backbone pass over the evaluation split, and write the results.
    Under torchrun every rank calls this; rank 0 owns the output folder and trains. `on_result(result)` runs
    before anything is written (so a failing disk cannot take the numbers with it)."""
    import torch

    folder = prepare_output_dir(cfg.out, "run", cfg.request, cfg.overwrite,  # torchrun: the ranks agree first
                                reevaluate_keys=cfg.reevaluate_keys)
    out = folder.path
    if folder.changed:
        log("re-evaluating: " + "; ".join(folder.changed) + " (the cache and the SAE are reused when complete)")
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    reused: list[str] = []
    hook = cfg.hook or model.steer_hook  # the paper: final block, CLS (the pooled token without one)
    model.check_hook_name(hook)
    train_data, eval_data = load_splits(model, cfg, log)
    stages["setup_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    log(f"[1/4] caching {hook} CLS for {len(train_data)} images of {train_data.dataset_id}/{train_data.split}")
    store, was = cache_stage(model, train_data, hook, out / "cache_train", dtype=cfg.cache_dtype,
                             batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                             show_progress=cfg.show_progress, overwrite=cfg.overwrite)
    reused += ["cache"] if was else []
    stages["cache_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[2/4] training a {cfg.train.architecture} SAE (k={cfg.train.k}, expansion {cfg.train.expansion_factor}) "
        f"on {store.n_rows} cached rows")
    box: dict[str, Any] = {}

    def train() -> str:  # under torchrun rank 0 trains; the others load the saved SAE
        box["trained"], box["reused"] = train_stage(store, hook, cfg.train, out / "sae",
                                                    show_progress=cfg.show_progress, overwrite=cfg.overwrite)
        return str(box["trained"].out_dir)

    sae_dir = distributed.on_main(train)
    if "trained" not in box:
        from .sae.loading import load_sae

        box["trained"] = TrainResult(load_sae(sae_dir, cfg.train.device), Path(sae_dir), {})
    trained = box["trained"]
    reused += ["sae"] if box.get("reused") else []
    stages["train_s"] = time.perf_counter() - t
    log(f"      SAE in {trained.out_dir}: held-out FVU {_fmt(trained.metrics.get('heldout_fvu'))}, "
        f"dead fraction {_fmt(trained.metrics.get('dead_fraction'))}")

    t = time.perf_counter()
    sae = trained.sae
    fvu_dist = fvu_distribution(sae, store, hook)
    tau, gate_cfg = gate_stage(sae, store, cfg.fvu_quantile, cfg.fvu_threshold, cfg.gate_datasets, hook, model)
    if cfg.fvu_quantile is not None:
        over = ", ".join(gate_cfg.get("gate_datasets") or []) or "the training cache"
        log(f"      FVU gate: tau = {tau:.4f} (quantile {cfg.fvu_quantile} over the training rows of {over})")
    if is_union(train_data):  # the FVU distribution of every member's training rows, too
        from .activation_cache.union import member_rows

        fvu_dist["per_dataset"] = {m.dataset_id: fvu_distribution(sae, store, hook, rows=member_rows(store, i))
                                   for i, m in enumerate(train_data.members)}
    stages["fvu_s"] = time.perf_counter() - t

    t = time.perf_counter()
    log(f"[3/4] evaluating {', '.join(cfg.methods)} on {len(eval_data)} images of "
        f"{eval_data.dataset_id}/{eval_data.split}")
    with torch.no_grad():
        steer = {k: v for k, v in (("lam", cfg.lam), ("gamma", cfg.gamma)) if v is not None}
        result = evaluate_stage(
            model, eval_data, sae, list(cfg.methods), **steer, fvu_threshold=tau,
            templates=cfg.templates, hook_name=hook, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            show_progress=cfg.show_progress, gate_methods=list(cfg.gate_methods), text_cache=cfg.text_cache,
            options={"pool_cache": str(store.root), "fvu_quantile": cfg.fvu_quantile, **cfg.options},
            config={"sae_path": str(trained.out_dir), **cfg.record, **gate_cfg})
    stages["eval_s"] = time.perf_counter() - t
    written: dict[str, Path] = {}
    if distributed.is_main():  # the other ranks helped with caching and the backbone pass; rank 0 writes
        if on_result is not None:
            on_result(result)
        written = result.save(folder)
        stages["total_s"] = time.perf_counter() - t0
        from .core.fileio import write_json_atomic

        folder.add(write_json_atomic(out / "run.json", {
            "command": "run", "config": _jsonable(cfg), "hook_name": hook, "cache": str(store.root),
            "sae": str(trained.out_dir), "cache_rows": store.n_rows, "sae_metrics": trained.metrics,
            "fvu_distribution": fvu_dist, "fvu_threshold": tau, "reused": reused, "changed": folder.changed,
            "results": str(written["summary" if is_union(eval_data) else "json"]), "stages": stages,
        }))
        folder.finish()
    return PipelineResult(out, hook, store, trained, tau, result, written, stages, reused,
                          folder.changed)


def _jsonable(cfg: PipelineConfig) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


__all__ = ["OBJECTIVES", "PipelineConfig", "PipelineResult", "cache_stage", "evaluate_stage", "gate_stage",
           "is_union", "load_splits", "run_pipeline", "train_stage"]
