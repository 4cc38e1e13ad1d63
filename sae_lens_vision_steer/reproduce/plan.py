"""From grid cells to work: activation caches, SAE trainings and evaluation groups, each keyed by
what decides it, so the runner reuses whatever is already on disk and the dry run counts the rest.

- `CacheJob`: one backbone pass over a training split, caching the CLS token at one block.
- `SAEJob`: one SAE trained on a `CacheJob` (or, for a union, on the union's cache).
- `EvalGroup`: one `evaluation.evaluate` call, i.e. one backbone pass over an evaluation split scoring
  every cell that shares its backbone, data set, SAE and run options (methods of kind `pass`, such
  as multi-layer steering or TPT, add their own passes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.errors import UsageError
from ..core.names import safe_component
from .grid import Cell, Grid, SAESpec, Sizes, definition, digest

# Methods that run their own image forwards over augmented views (64 per image, TPT's setting).
VIEW_METHODS = ("tpt", "ctpt", "zero", "vs2_ens_aug")
TPT_LIKE = VIEW_METHODS  # the earlier name
# Methods that read the training split's activation cache (VS2++'s retrieval pool, the label baselines).
POOL_METHODS = ("vs2pp", "clip_steer", "weighted_rag", "knn_vote", "linear_probe")


@dataclass(frozen=True)
class CacheJob:
    backbone: str
    data: str
    split: str
    layer_from_end: int
    limit: int | None

    @property
    def key(self) -> str:
        return digest(asdict(self))

    @property
    def folder(self) -> str:
        return "/".join(("caches", safe_component(self.backbone, "backbone name"), safe_component(self.data, "data-set name"),
                         f"{safe_component(self.split, 'split')}-L{self.layer_from_end}-{self.key[:8]}"))


@dataclass(frozen=True)
class SAEJob:
    backbone: str
    cache: CacheJob
    spec: SAESpec
    sizes: tuple[tuple[str, Any], ...]  # epochs / samples / batch size

    @property
    def key(self) -> str:
        return digest(definition(self))

    @property
    def folder(self) -> str:
        return "/".join(("saes", safe_component(self.backbone, "backbone name"),
                         safe_component(self.cache.data, "data-set name"),
                         f"{safe_component(self.spec.objective, 'objective')}-L{self.spec.layer_from_end}-{self.key[:8]}"))


@dataclass(frozen=True)
class EvalGroup:
    backbone: str
    data: str
    sae: SAEJob | None
    n_neighbours: int
    last_n: int
    cells: tuple[Cell, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        return digest({"backbone": self.backbone, "data": self.data, "sae": self.sae and self.sae.key,
                       "n_neighbours": self.n_neighbours, "last_n": self.last_n})

    def layer_saes(self) -> list[SAEJob]:
        """For `last_n` > 1: the SAEs of blocks n-last_n .. n-1 (the group's SAE is the last)."""
        if self.sae is None or self.last_n <= 1:
            return []
        return [_shift(self.sae, i) for i in range(self.last_n - 1, 0, -1)] + [self.sae]


def _shift(job: SAEJob, layer_from_end: int) -> SAEJob:
    from dataclasses import replace

    return replace(job, cache=replace(job.cache, layer_from_end=layer_from_end),
                   spec=replace(job.spec, layer_from_end=layer_from_end))


@dataclass
class Plan:
    grid: Grid
    sizes: Sizes
    groups: list[EvalGroup]

    @property
    def saes(self) -> list[SAEJob]:
        jobs: dict[str, SAEJob] = {}
        for g in self.groups:
            for j in ([g.sae] if g.sae else []) + g.layer_saes():
                jobs.setdefault(j.key, j)
        return list(jobs.values())

    @property
    def caches(self) -> list[CacheJob]:
        jobs: dict[str, CacheJob] = {}
        for s in self.saes:
            jobs.setdefault(s.cache.key, s.cache)
        for g in self.groups:
            for c in g.cells:
                for job in (gate_cache(self, g, c), pool_cache(self, g, c)):
                    if job is not None:
                        jobs.setdefault(job.key, job)
        return list(jobs.values())


def sae_job(grid: Grid, sizes: Sizes, cell: Cell) -> SAEJob | None:
    if cell.sae is None:
        return None
    data = cell.sae.train_on or cell.dataset
    source = grid.data(data)
    if source.train_split is None and not source.is_union:
        raise UsageError(f"data set {data!r} has no training split to train an SAE on")
    cache = CacheJob(cell.backbone, data, source.train_split or "train", cell.sae.layer_from_end, sizes.train_limit)
    sz = (("epochs", sizes.sae_epochs), ("samples", sizes.sae_samples), ("batch", sizes.train_batch_size),
          ("buffer", sizes.sae_buffer))
    return SAEJob(cell.backbone, cache, cell.sae, sz)


def gate_cache(plan: Plan, group: EvalGroup, cell: Cell) -> CacheJob | None:
    """The unlabeled training activations the FVU gate's quantile is taken over."""
    if cell.fvu_quantile is None or group.sae is None:
        return None
    if cell.gate_on is None or gate_in_union(plan.grid, group, cell):
        return group.sae.cache
    src = plan.grid.data(cell.gate_on)
    return CacheJob(cell.backbone, cell.gate_on, src.train_split or "train", 0, plan.sizes.train_limit)


def gate_in_union(grid: Grid, group: EvalGroup, cell: Cell) -> bool:
    """The gate's data sets are members of the SAE's training union: its quantile comes from those
    members' rows of the union cache (v3: the generalized SAE's gate on CIFAR-100 + Tiny-ImageNet)."""
    if cell.gate_on is None or group.sae is None:
        return False
    union = grid.data(group.sae.cache.data)
    return union.is_union and set(grid.data(cell.gate_on).members) <= set(union.members)


def pool_cache(plan: Plan, group: EvalGroup, cell: Cell) -> CacheJob | None:
    """VS2++'s retrieval pool (and the label baselines' training split): the evaluated data set's own training
split (final block)."""
    if not _retrieves(cell):
        return None
    src = plan.grid.data(cell.dataset)
    if src.train_split is None:
        what = "trains on" if cell.method == "linear_probe" else "retrieves from"
        raise UsageError(f"{cell.method} {what} the training split; {cell.dataset!r} has none")
    return CacheJob(cell.backbone, cell.dataset, src.train_split, 0, plan.sizes.train_limit)


def make_plan(grid: Grid, sizes: Sizes) -> tuple[Plan, dict[Cell, str]]:
    """Group the grid's cells; returns the plan and the cells that cannot be planned, with the reason."""
    groups: dict[str, EvalGroup] = {}
    cells_of: dict[str, list[Cell]] = {}
    bad: dict[Cell, str] = {}
    for cell in grid.cells:
        try:
            job = sae_job(grid, sizes, cell)
            g = EvalGroup(cell.backbone, cell.dataset, job, cell.n_neighbours if _retrieves(cell) else 50,
                          cell.last_n)
        except (KeyError, ValueError) as e:
            bad[cell] = _text(e)
            continue
        groups.setdefault(g.key, g)
        cells_of.setdefault(g.key, []).append(cell)
    # Cells without an SAE (zero-shot, TTA) join a group of the same backbone and data set when one exists.
    for key in [k for k, g in groups.items() if g.sae is None]:
        g = groups[key]
        # (a retrieving cell, e.g. knn_vote, only with its own N: it then shares the host's neighbours)
        host = next((h for h in groups.values() if h.sae is not None and h.last_n == 1
                     and h.n_neighbours == g.n_neighbours and (h.backbone, h.data) == (g.backbone, g.data)), None)
        if host is not None:
            cells_of[host.key].extend(cells_of.pop(key))
            del groups[key]
    final = [EvalGroup(g.backbone, g.data, g.sae, g.n_neighbours, g.last_n, tuple(cells_of[k]))
             for k, g in groups.items()]
    plan = Plan(grid, sizes, final)
    for g in final:  # pool / gate caches must be plannable too
        for c in g.cells:
            try:
                gate_cache(plan, g, c), pool_cache(plan, g, c)
            except (KeyError, ValueError) as e:
                bad[c] = _text(e)
    if bad:
        plan.groups = [EvalGroup(g.backbone, g.data, g.sae, g.n_neighbours, g.last_n,
                                 tuple(c for c in g.cells if c not in bad)) for g in final]
        plan.groups = [g for g in plan.groups if g.cells]
    return plan, bad


def _retrieves(cell: Cell) -> bool:
    return cell.method.startswith(POOL_METHODS)


def _text(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {text}"


__all__ = ["POOL_METHODS", "VIEW_METHODS", "CacheJob", "EvalGroup", "Plan", "SAEJob", "gate_cache", "gate_in_union", "make_plan", "pool_cache", "sae_job"]
