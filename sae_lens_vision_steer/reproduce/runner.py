"""Runs a planned grid in one folder, reusing everything already computed, cell by cell resumable.

    ROOT/caches/<backbone>/<data>/<split>-L<i>-<key>/   activation caches (`cache_activations`)
    ROOT/saes/<backbone>/<data>/<objective>-L<i>-<key>/ SAEs (`train_sae`, `train_pass_sae`)
    ROOT/groups/<key>/results.json ...                  one `evaluate` call per evaluation group
    ROOT/cells/<key>.json                               each cell's state: done (with its numbers) or failed (with the error)
    ROOT/text_cache/                                    class-prompt embeddings (`text_cache.py`), unless given

Each cell's state is written atomically as soon as its group ends. A rerun skips done cells, retries
failed ones, and reuses complete caches and finished SAEs (the library verifies they match the
request; a mismatch is refused naming the difference and fails only the cells that need it). A cell
that fails (an unknown method, a data set that cannot be loaded, a union that is not available) does
not stop the others.
"""

from __future__ import annotations

import errno
import json
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import OutputError
from ..core.fileio import describe_os_error, write_json_atomic
from ..core.names import inside
from .grid import Cell, Grid, Sizes
from .plan import (
    CacheJob,
    EvalGroup,
    Plan,
    SAEJob,
    gate_cache,
    gate_in_union,
    make_plan,
    pool_cache,
)

STATE_DIR = "cells"
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the disk, not the cell: the whole run stops


@dataclass
class RunReport:
    computed: Counter = field(default_factory=Counter)  # caches, saes, groups, cells, text (built)
    reused: Counter = field(default_factory=Counter)  # caches, saes, cells, text (hit)
    failed: dict[str, str] = field(default_factory=dict)  # cell key -> error
    seconds: float = 0.0


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def at(self, relative: str) -> Path:
        """`root/relative`, asserted to stay under root once `..` is resolved (names are checked when the grid
        is read; this is the last line of defence)."""
        return inside(self.root, self.root / relative, "reproduce output")

    def state_path(self, key: str) -> Path:
        return self.at(f"{STATE_DIR}/{key}.json")

    def state(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path(key).read_text())
        except (OSError, ValueError):
            return None  # missing, or unreadable: the cell runs again

    def is_done(self, key: str) -> bool:
        s = self.state(key)
        return bool(s and s.get("status") == "done")

    def write_state(self, key: str, cell: Cell, status: str, **fields: Any) -> None:
        self.state_path(key).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path(key), {"status": status, "cell": asdict(cell), **fields,
                                                 "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                          indent=1, default=str)


class GridRunner:
    """`GridRunner(grid, root, sizes).run()`; `log` receives one line per step."""

    def __init__(self, grid: Grid, root: str | Path, sizes: Sizes = Sizes(), device: str = "cpu",
                 show_progress: bool = True, text_cache: str | Path | None = None, num_workers: int = 0,
                 log: Callable[[str], None] = print):
        self.grid, self.sizes, self.device, self.show = grid, sizes, device, show_progress
        self.ws = Workspace(root)
        self.text_cache = Path(text_cache) if text_cache else self.ws.root / "text_cache"
        self.num_workers, self.log = num_workers, log
        self.report = RunReport()
        self._model: tuple[str, Any] | None = None
        self._saes: dict[str, Any] = {}
        self._caches: dict[str, Any] = {}

    # ------------------------------------------------------------------ entry point
    def run(self) -> RunReport:
        t0 = time.perf_counter()
        plan, bad = make_plan(self.grid, self.sizes)
        for cell, err in bad.items():
            self._fail(cell, err)
        groups = sorted(plan.groups, key=lambda g: (g.backbone, g.data))
        for i, group in enumerate(groups):
            keys = {c: self.grid.cell_key(c, self.sizes) for c in group.cells}
            todo = [c for c in group.cells if not self.ws.is_done(keys[c])]
            self.report.reused["cells"] += len(group.cells) - len(todo)
            if not todo:
                continue
            self.log(f"[{i + 1}/{len(groups)}] {group.data} / {group.backbone}: {len(todo)} cell(s)"
                     + (f", SAE {group.sae.folder}" if group.sae else ""))
            runnable = [c for c in todo if self._method_known(c, keys[c])]
            if runnable:
                self._run_group(plan, group, runnable, keys)
        self.report.seconds = time.perf_counter() - t0
        return self.report

    # ------------------------------------------------------------------ failures
    def _fail(self, cell: Cell, error: str, key: str | None = None) -> None:
        key = key or self.grid.cell_key(cell, self.sizes)
        self.report.failed[key] = error
        self.ws.write_state(key, cell, "failed", error=error)
        self.log(f"      FAILED {cell.method} on {cell.dataset}/{cell.backbone}: {error}")

    def _method_known(self, cell: Cell, key: str) -> bool:
        from ..evaluation import get_method

        try:
            get_method(cell.method)
            return True
        except KeyError as e:
            self._fail(cell, f"KeyError: {e.args[0]}", key)
            return False

    def _run_group(self, plan: Plan, group: EvalGroup, cells: list[Cell], keys: dict[Cell, str]) -> None:
        try:
            records = self._evaluate(plan, group, cells, keys)
        except (KeyboardInterrupt, OutputError):
            raise  # Ctrl-C, or an output that cannot be written (exit 5): every later cell would fail the same way
        except OSError as e:
            if e.errno in OUTPUT_ERRNOS:  # a full or read-only disk fails every cell after it: stop (exit 5)
                raise OutputError(f"cannot write under {self.ws.root}"
                                  + (f" ({e.filename})" if e.filename else "") + f": {describe_os_error(e)}; free "
                                  "some space and run the same command again (finished cells are kept)") from None
            self._record_failure(cells, keys, e)
            return
        except Exception as e:  # one group's failure is reported on its cells; the others go on
            self._record_failure(cells, keys, e)
            return
        self.report.computed["groups"] += 1
        for c in cells:
            self.ws.write_state(keys[c], c, "done", **records[c])
            self.report.computed["cells"] += 1

    def _record_failure(self, cells: list[Cell], keys: dict[Cell, str], e: Exception) -> None:
        err = f"{type(e).__name__}: {' '.join(str(e).split())}"
        if not isinstance(e, (ValueError, KeyError, OSError, RuntimeError, ImportError)):
            err += " | " + traceback.format_exc(limit=3).splitlines()[-1]
        for c in cells:
            self._fail(c, err, keys[c])

    # ------------------------------------------------------------------ work
    def model(self, backbone: str):
        if self._model is None or self._model[0] != backbone:
            import torch

            from ..core.identity import weights_from_name
            from ..sae.splice import HookedCLIP

            b = self.grid.backbone(backbone)
            self._model, self._saes, self._caches = None, {}, {}
            kwargs = json.loads(b.model_kwargs)
            pretrained = None if b.random_weights else b.pretrained
            if b.random_weights:
                torch.manual_seed(b.seed)
                if weights_from_name(b.model):
                    kwargs["load_weights"] = False
            self._model = (backbone, HookedCLIP.from_pretrained(b.model, pretrained=pretrained, device=self.device,
                                                                **kwargs))
        return self._model[1]

    def hook(self, model, layer_from_end: int) -> str:
        if layer_from_end == 0:
            return model.steer_hook
        return f"blocks.{model.cfg.n_layers - 1 - layer_from_end}.hook_resid_post"

    def cache(self, job: CacheJob):
        from ..data import load_image_dataset
        from ..pipeline import cache_stage

        if job.key in self._caches:
            return self._caches[job.key]
        model = self.model(job.backbone)
        src = self.grid.data(job.data)
        data = load_image_dataset(list(src.members) if src.is_union else src.dataset, job.split, src.data_dir,
                                  model.preprocess, job.limit)
        store, reused = cache_stage(model, data, self.hook(model, job.layer_from_end), self.ws.at(job.folder),
                                    batch_size=self.sizes.batch_size, num_workers=self.num_workers,
                                    show_progress=self.show)
        (self.report.reused if reused else self.report.computed)["caches"] += 1
        self._caches[job.key] = store
        return store

    def sae(self, job: SAEJob):
        if job.key in self._saes:
            return self._saes[job.key]
        from ..pipeline import train_stage
        from ..training.config import TrainConfig, sae_size

        cache = self.cache(job.cache)
        b = self.grid.backbone(job.backbone)
        k, x, _ = sae_size(b.model, job.spec.k, job.spec.expansion)
        sizes = dict(job.sizes)
        epochs = 10 if sizes["epochs"] is None and sizes["samples"] is None else sizes["epochs"]  # as `run`
        config = TrainConfig(k=k, expansion_factor=x, batch_size=sizes["batch"], epochs=epochs,
                             total_training_samples=sizes["samples"], buffer_size=sizes.get("buffer"), seed=b.seed,
                             device=self.device, train_fraction=job.spec.train_fraction or 1.0)
        hook = self.hook(self.model(job.backbone), job.spec.layer_from_end)
        trained, reused = train_stage(cache, hook, config, self.ws.at(job.folder), objective=job.spec.objective,
                                      w_aux=job.spec.w_aux if job.spec.objective == "pass" else None,
                                      show_progress=self.show)
        (self.report.reused if reused else self.report.computed)["saes"] += 1
        self._saes[job.key] = (trained.sae, trained.metrics, cache)
        return self._saes[job.key]

    def _evaluate(self, plan: Plan, group: EvalGroup, cells: list[Cell], keys: dict[Cell, str]) -> dict[Cell, dict]:
        import torch

        from ..data import load_image_dataset
        from ..evaluation import MethodSpec
        from ..pipeline import evaluate_stage

        model = self.model(group.backbone)
        sae = metrics = None
        if group.sae is not None:
            sae, metrics, _ = self.sae(group.sae)
        options: dict[str, Any] = {"n_neighbours": group.n_neighbours}
        if group.last_n > 1:
            options["last_n_saes"] = [self.sae(j)[0] for j in group.layer_saes()]
        specs, taus = [], {}
        for c in cells:
            settings = dict(c.settings)
            pool = pool_cache(plan, group, c)
            if pool is not None:
                options["pool_cache"] = str(self.cache(pool).root)
            if c.fvu_quantile is not None:
                settings["fvu_threshold"] = taus[c] = self._tau(plan, group, c, sae, model)
            if c.templates is not None:  # the row's prompt protocol (None: the method's own, or the ensemble)
                settings["templates"] = c.templates
            specs.append(MethodSpec(keys[c], c.method, settings))
        src = self.grid.data(group.data)
        data = load_image_dataset(src.dataset, src.eval_split, src.data_dir, model.preprocess, self.sizes.eval_limit)
        with torch.no_grad():
            result = evaluate_stage(model, data, sae, specs, batch_size=self.sizes.batch_size, num_workers=self.num_workers,
                              show_progress=self.show, options=options, gate_methods=(), text_cache=self.text_cache,
                              config={"reproduce_group": group.key})
        result.save(self.ws.at(f"groups/{group.key}"), plots=False)
        text = result.timing.get("text_cache")
        (self.report.reused if text == "hit" else self.report.computed)["text"] += 1
        zs = result.methods["zeroshot"].top1
        out = {}
        for c in cells:
            row = result.methods[keys[c]]
            # the gain is against zero-shot with the row's own prompts (the same pass, no extra forward)
            same = row.zeroshot_same_prompts if row.zeroshot_same_prompts is not None else zs
            rec = {"top1": row.top1, "top5": row.top5, "mean_per_class": row.mean_per_class, "zeroshot_top1": same,
                   "gain": row.top1 - same, "run_zeroshot_top1": zs, "templates": row.templates,
                   "prompts": row.prompts, "coverage": row.coverage, "settings": row.settings,
                   "fvu_threshold": taus.get(c), "n_images": result.config["n_images"], "group": group.key,
                   "backbone_passes": result.timing["n_backbone_passes"], "text_cache": text,
                   "seconds": row.seconds, "labels": _labels_note(row.info),
                   "image_forwards_per_image": row.info.get("image_forwards_per_image", 1)}
            if "fvu_harm" in row.info:
                rec["fvu_harm"] = row.info["fvu_harm"]
            if sae is not None:
                rec["sae"] = str(self.ws.at(group.sae.folder))
                rec["sae_heldout_fvu"] = metrics.get("heldout_fvu")
                rec["fvu"] = self._fvu_on(plan, group, c, sae, metrics)
            out[c] = rec
        return out

    def _tau(self, plan: Plan, group: EvalGroup, cell: Cell, sae, model) -> float:
        from ..pipeline import gate_stage

        chosen = None
        if gate_in_union(self.grid, group, cell):
            from ..activation_cache.union import cache_dataset_names

            store = self.sae(group.sae)[2]  # the union's cache: its members in the union's order
            union = self.grid.data(group.sae.cache.data).members
            names = cache_dataset_names(store)
            chosen = [names[union.index(m)] for m in self.grid.data(cell.gate_on).members]
        else:
            store = self.cache(gate_cache(plan, group, cell))
        return gate_stage(sae, store, cell.fvu_quantile, datasets=chosen, model=model)[0]

    def _fvu_on(self, plan: Plan, group: EvalGroup, cell: Cell, sae, metrics) -> float | None:
        """The SAE's FVU on the cell's data set: its held-out FVU when trained on that data set, else the
        FVU over that data set's training rows (the generalized SAE, per data set)."""
        if group.sae.cache.data == cell.dataset:
            return metrics.get("heldout_fvu")
        import numpy as np

        from ..training.fvu import evaluate_sae_on_cache

        src = self.grid.data(cell.dataset)
        if src.train_split is None:
            return None
        own = self.cache(CacheJob(cell.backbone, cell.dataset, src.train_split, group.sae.spec.layer_from_end,
                                  self.sizes.train_limit))
        mask = np.ones(own.n_rows, dtype=bool)
        return evaluate_sae_on_cache(sae, own, self.hook(self.model(cell.backbone), group.sae.spec.layer_from_end),
                                     mask, mask)["heldout_fvu"]


def _labels_note(info: dict[str, Any]) -> str | None:
    """What labels a row read besides none: the evaluation labels (an oracle) or the training split's."""
    if info.get("oracle_upper_bound"):
        return "evaluation labels: an oracle upper bound"
    return info.get("uses_labels")


def cell_states(grid: Grid, root: str | Path, sizes: Sizes) -> dict[Cell, dict[str, Any] | None]:
    ws = Workspace(root)
    return {c: ws.state(grid.cell_key(c, sizes)) for c in grid.cells}


__all__ = ["GridRunner", "RunReport", "Workspace", "cell_states"]
