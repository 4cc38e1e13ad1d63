"""The declared grid of `vision-steer reproduce`: backbones x data sets x methods, plus the paper's
ablations, as frozen dataclasses.

A `Cell` is one computation (a method on a data set with a backbone and an SAE); a `Entry` places a
cell in a paper-style table under a row and a column. Two entries that ask for the same computation
(the headline VS2 cell is also lam = 2.1, gamma = 1.5 of the lam x gamma table and "last 1 layer"
of the layers table) share one cell, so it is computed once. A cell's `key` is a digest of what
decides its numbers (its fields, the backbone's and data set's definitions and the run sizes), so a
result is reused only for the same request.

`paper.paper_grid()` is the paper's evaluation; `Grid.from_json` reads a custom grid (the test's tiny one).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import UnknownNameError, UsageError
from ..core.fileio import read_json_file
from ..core.names import safe_component
from ..models.kwargs import check_file_model_kwargs, parse_model_kwargs

OBJECTIVES = ("topk", "pass")
# Fields added after grids were run: left out of a key while unset, so every finished cell, SAE and cache
# keeps its key (a definition that did not change is reused).
LATER_FIELDS = ("templates", "train_fraction")


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def definition(obj: Any) -> Any:
    """`asdict(obj)` without the later fields that are unset (recursively): what a key is computed from."""
    d = asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
    if isinstance(d, dict):
        return {k: definition(v) for k, v in d.items() if not (k in LATER_FIELDS and v is None)}
    if isinstance(d, (list, tuple)):
        return type(d)(definition(v) for v in d)
    return d


@dataclass(frozen=True)
class Backbone:
    """A model as `HookedCLIP.from_pretrained` takes it (QuickGELU for `openai` tags is automatic there)."""

    name: str  # the grid's name for it, e.g. "ViT-B-32"
    model: str
    pretrained: str | None = "openai"
    random_weights: bool = False
    model_kwargs: str = "{}"  # JSON (a dataclass field must be hashable)
    seed: int = 0


@dataclass(frozen=True)
class DataSource:
    """A data set as `data.load_image_dataset` takes it. `dataset` with commas is a union of members."""

    name: str
    dataset: str
    data_dir: str | None = None
    train_split: str | None = "train"  # None: no training split (the OOD sets are evaluation-only here)
    eval_split: str = "val"

    @property
    def members(self) -> list[str]:
        return [d.strip() for d in self.dataset.split(",")]

    @property
    def is_union(self) -> bool:
        return len(self.members) > 1


@dataclass(frozen=True)
class SAESpec:
    """An SAE to train. `train_on` names a `DataSource` (None: the cell's own data set); `layer_from_end`
    0 is the final block's `hook_resid_post`; k / expansion None take the paper's preset for the backbone."""

    objective: str = "topk"  # or "pass"
    k: int | None = None
    expansion: int | None = None
    w_aux: float | None = None
    train_on: str | None = None
    layer_from_end: int = 0
    train_fraction: float | None = None  # train on this fraction of the training images (None: all)

    def __post_init__(self) -> None:
        f = self.train_fraction
        if f is not None and not (isinstance(f, (int, float)) and 0 < f <= 1):
            raise UsageError(f"train_fraction must be in (0, 1], got {f!r}")
        if f == 1:  # all of the data is the plain SAE: one definition, one key
            object.__setattr__(self, "train_fraction", None)


@dataclass(frozen=True)
class Cell:
    """One computation. `settings` are the method's (lam, gamma, ...) as sorted pairs; `fvu_quantile`
    gates the method with the q-quantile of per-sample FVU over `gate_on` (default: the SAE's training
    data); `n_neighbours` and `last_n` are run options (VS2++ retrieval, layers steered)."""

    dataset: str
    backbone: str
    method: str
    sae: SAESpec | None = None
    settings: tuple[tuple[str, float], ...] = ()
    fvu_quantile: float | None = None
    gate_on: str | None = None
    n_neighbours: int = 50
    last_n: int = 1
    # The prompt protocol (evaluation/protocol.py): None = the method's own, else the data set's ensemble
    # (what every cell used before protocols existed); "single", a set name, or "ensemble".
    templates: str | None = None

    def setting(self, name: str, default: Any = None) -> Any:
        return dict(self.settings).get(name, default)


@dataclass(frozen=True)
class Entry:
    table: str
    row: str
    column: str  # "<dataset>/<backbone>" for the paper's tables
    cell: Cell
    metric: str = "top1"  # top1 | gain (method minus zero-shot) | fvu (of the cell's SAE)


@dataclass(frozen=True)
class Sizes:
    """Run sizes: None = the whole split / the defaults of `run` (10 epochs)."""

    train_limit: int | None = None
    eval_limit: int | None = None
    sae_epochs: float | None = None
    sae_samples: int | None = None
    batch_size: int = 256
    train_batch_size: int = 256
    sae_buffer: int | None = None  # rows in SAELens' mixing buffer (None: training_data's default)


@dataclass(frozen=True)
class Grid:
    backbones: tuple[Backbone, ...]
    datasets: tuple[DataSource, ...]
    entries: tuple[Entry, ...]

    # ------------------------------------------------------------------ look-ups
    def backbone(self, name: str) -> Backbone:
        for b in self.backbones:
            if b.name == name:
                return b
        raise UnknownNameError(f"backbone {name!r} is not declared; the grid has {[b.name for b in self.backbones]}")

    def data(self, name: str) -> DataSource:
        for d in self.datasets:
            if d.name == name:
                return d
        raise UnknownNameError(f"data set {name!r} is not declared; the grid has {[d.name for d in self.datasets]}")

    @property
    def cells(self) -> list[Cell]:
        return list(dict.fromkeys(e.cell for e in self.entries))

    @property
    def tables(self) -> list[str]:
        return list(dict.fromkeys(e.table for e in self.entries))

    def cell_key(self, cell: Cell, sizes: Sizes) -> str:
        """What decides the cell's numbers: the cell, its backbone's and data sets' definitions, the sizes."""
        names = {cell.dataset, *(n for n in (cell.gate_on, cell.sae and cell.sae.train_on) if n)}
        return digest({"cell": definition(cell), "backbone": asdict(self.backbone(cell.backbone)),
                       "data": [asdict(self.data(n)) for n in sorted(names)], "sizes": asdict(sizes)})

    # ------------------------------------------------------------------ selection
    def select(self, datasets: Iterable[str] | None = None, backbones: Iterable[str] | None = None,
               methods: Iterable[str] | None = None, tables: Iterable[str] | None = None) -> "Grid":
        """The entries whose data set, backbone, method and table are among those given (None: all).
        A name the grid does not declare is refused, with the declared ones."""
        entries = list(self.entries)
        for what, wanted, have, get in (
                ("data set", datasets, [d.name for d in self.datasets], lambda e: e.cell.dataset),
                ("backbone", backbones, [b.name for b in self.backbones], lambda e: e.cell.backbone),
                ("method", methods, sorted({e.cell.method for e in self.entries}), lambda e: e.cell.method),
                ("table", tables, self.tables, lambda e: e.table)):
            if wanted is None:
                continue
            wanted = list(wanted)
            unknown = [w for w in wanted if w not in have]
            if unknown:
                raise UsageError(f"unknown {what}(s) {unknown}; the grid declares {have}")
            entries = [e for e in entries if get(e) in wanted]
        if not entries:
            raise UsageError("the selection leaves no cell to run")
        return replace(self, entries=tuple(entries))

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {"backbones": [asdict(b) for b in self.backbones], "datasets": [asdict(d) for d in self.datasets],
                "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str | Path) -> "Grid":
        source = "grid"
        if not isinstance(obj, dict):
            source = f"grid file {obj}"
            obj = read_json_file(obj, "grid file")
        try:
            backbones = tuple(Backbone(**_json_kwargs(b)) for b in obj["backbones"])
            datasets = tuple(DataSource(**d) for d in obj["datasets"])
            entries = tuple(_entry(e) for e in obj["entries"])
        except (KeyError, TypeError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise UsageError(f"{source}: {what} (expected backbones, datasets and entries with the fields of "
                             "reproduce/grid.py)") from None
        grid = cls(backbones, datasets, entries)
        grid.check(source)
        for c in grid.cells:  # every name must resolve
            grid.backbone(c.backbone), grid.data(c.dataset)
            for n in (c.gate_on, c.sae and c.sae.train_on):
                if n:
                    grid.data(n)
        return grid


    def check(self, source: str = "grid") -> None:
        """What a grid file could use against us: names that become folders (`core.names.safe_component`:
        no `..`, no `/`, no leading dot), model kwargs that are not architecture options (a loading-safety
        switch such as `weights_only` included), an unknown SAE objective. Refused naming `source`."""
        try:
            for b in self.backbones:
                safe_component(b.name, "backbone name")
            for d in self.datasets:
                safe_component(d.name, "data-set name")
                for split in (d.train_split, d.eval_split):
                    if split is not None:
                        safe_component(split, f"split of data set {d.name!r}")
            for c in self.cells:
                if c.sae is not None and c.sae.objective not in OBJECTIVES:
                    raise UsageError(f"SAE objective {c.sae.objective!r} is not one of {list(OBJECTIVES)}")
        except UsageError as e:
            raise UsageError(f"{source}: {e}") from None
        for i, b in enumerate(self.backbones):
            check_file_model_kwargs(parse_model_kwargs(b.model_kwargs, f"{source}: backbones[{i}].model_kwargs"),
                                    b.model, f"{source}: backbones[{i}] ({b.name}).model_kwargs")


def _json_kwargs(b: dict[str, Any]) -> dict[str, Any]:
    """A backbone's `model_kwargs` may be written as a JSON object in the file; the dataclass keeps a string."""
    b = dict(b)
    if isinstance(b.get("model_kwargs"), dict):
        b["model_kwargs"] = json.dumps(b["model_kwargs"], sort_keys=True)
    return b


def _entry(e: dict[str, Any]) -> Entry:
    c = dict(e["cell"])
    if c.get("sae") is not None:
        c["sae"] = SAESpec(**c["sae"])
    c["settings"] = tuple(tuple(p) for p in c.get("settings", ()))
    return Entry(e["table"], e["row"], e["column"], Cell(**c), e.get("metric", "top1"))


__all__ = ["LATER_FIELDS", "Backbone", "Cell", "DataSource", "Entry", "Grid", "SAESpec", "Sizes", "definition", "digest"]
