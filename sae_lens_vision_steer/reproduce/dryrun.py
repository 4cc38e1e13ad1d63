"""`reproduce --dry-run`: what a run of the selected grid would download and compute, with sizes and an
estimated time. Image counts and download sizes come from `resources/reproduce_facts.json` (each with
its source; unknown ones are said to be unknown), FLOPs and parameter counts from the architectures
(`costs.architecture_profile`), seconds from `costs.Costs` (the user's measured file, or the stated
GPU-peak bound). Work already on disk (a complete cache, a finished SAE, a done cell) is not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .costs import Costs, architecture_profile, facts
from .grid import Grid, Sizes, definition
from .tables import declared_prompts
from .plan import TPT_LIKE, CacheJob, Plan


def _images(data: str, split: str, limit: int | None) -> int | None:
    counts = []
    for member in data.split(","):
        n = facts()["datasets"].get(member, {}).get("splits", {}).get(split, {}).get("images")
        if n is None:
            return limit  # unknown: a limit still bounds it
        counts.append(n if limit is None else min(n, limit))
    return sum(counts)


def _mb(data: str, split: str) -> float | None:
    total = 0.0
    for member in data.split(","):
        mb = facts()["datasets"].get(member, {}).get("splits", {}).get(split, {}).get("mb")
        if mb is None:
            return None
        total += mb
    return total


@dataclass
class DryRun:
    lines: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return "\n".join(self.lines)


def dry_run(plan: Plan, costs: Costs, root: Path | None = None, done: set[str] | None = None) -> DryRun:
    """Count the plan's downloads, backbone passes, SAE trainings and seconds (skipping finished work)."""
    from ..core.identity import model_label

    done = done or set()
    root = Path(root) if root else None
    grid, sizes = plan.grid, plan.sizes
    out = DryRun()
    groups = [g for g in plan.groups if any(c not in done for c in g.cells)]
    saes = {j.key: j for g in groups for j in ([g.sae] if g.sae else []) + g.layer_saes()}
    saes = {k: j for k, j in saes.items() if not (root and (root / j.folder / "cfg.json").is_file())}
    caches: dict[str, CacheJob] = {}
    for j in saes.values():
        caches.setdefault(j.cache.key, j.cache)
    from .plan import gate_cache, pool_cache

    for g in groups:
        for c in g.cells:
            for job in (gate_cache(plan, g, c), pool_cache(plan, g, c)):
                if job is not None:
                    caches.setdefault(job.key, job)
    from ..pipeline import store_complete  # the pipeline's own test of a finished store

    caches = {k: j for k, j in caches.items() if not (root and store_complete(root / j.folder))}

    # downloads
    backbones = sorted({g.backbone for g in groups} | {j.backbone for j in caches.values()})
    out.lines.append("Downloads (first run only; sizes from the Hub file pages, see resources/reproduce_facts.json):")
    dl_known, dl_unknown = 0.0, []
    for name in backbones:
        b = grid.backbone(name)
        prof = architecture_profile(b.model, b.model_kwargs)
        fact = facts()["models"].get(f"{b.model}/{b.pretrained}", {})
        listed = fact.get("mb")
        size = listed if listed is not None else prof.float32_mb
        how = "listed" if listed is not None else "computed: parameters x 4 bytes"
        if b.random_weights or b.model.startswith("local-dir:"):
            size, how = 0.0, "no download (random or local weights)"
        dl_known += size
        out.lines.append(f"  weights {name:<10} {model_label(b.model, b.pretrained)}: {size:,.0f} MB ({how}; "
                         f"{prof.n_params / 1e6:.1f} M parameters)")
    splits = {(g.data, grid.data(g.data).eval_split) for g in groups} | {(j.data, j.split) for j in caches.values()}
    for data, split in list(splits):  # a union's members are downloaded split by split
        if grid.data(data).is_union:
            splits |= {(m, split) for m in grid.data(data).members if any(d.name == m for d in grid.datasets)}
    splits = sorted(splits)
    for data, split in splits:
        src = grid.data(data)
        if src.is_union:  # its members' downloads are listed (and counted) on their own
            out.lines.append(f"  data    {data}/{split}: the union of {', '.join(src.members)} (no download of its own)")
            continue
        if src.data_dir:
            out.lines.append(f"  data    {data}/{split}: local folder {src.data_dir}")
            continue
        mb, n = _mb(src.dataset, split), _images(src.dataset, split, None)
        if mb is None:
            dl_unknown.append(f"{data}/{split}")
        else:
            dl_known += mb
        out.lines.append(f"  data    {data}/{split}: {'unknown' if mb is None else f'{mb:,.1f}'} MB, "
                         f"{'unknown' if n is None else f'{n:,}'} images")
    # compute
    total_s, unknown_s = 0.0, []
    passes: dict[str, int] = {}
    image_passes = 0
    out.lines.append("Compute:")

    def add_pass(backbone: str, n: int | None, what: str, times: int = 1) -> None:
        nonlocal total_s, image_passes
        passes[backbone] = passes.get(backbone, 0) + times
        b = grid.backbone(backbone)
        s = costs.image_s(backbone, architecture_profile(b.model, b.model_kwargs))
        if n is None or s is None:
            unknown_s.append(what)
            return
        image_passes += n * times
        total_s += n * times * s

    for j in caches.values():
        add_pass(j.backbone, _images(grid.data(j.data).dataset, j.split, sizes.train_limit), f"cache {j.folder}")
    n_eval_groups, n_tpt = 0, 0
    by_method: dict[tuple[str, str], list[int | None]] = {}  # (method, prompts) -> images per cell to run
    for g in groups:
        src = grid.data(g.data)
        n = _images(src.dataset, src.eval_split, sizes.eval_limit)
        n_eval_groups += 1
        extra = 1 if g.last_n > 1 else 0
        add_pass(g.backbone, n, f"evaluate {g.data}/{g.backbone}", 1 + extra)
        for c in g.cells:
            if c not in done:
                by_method.setdefault((c.method, declared_prompts(c)), []).append(n)
            if c.method in TPT_LIKE and c not in done:
                n_tpt += 1
                add_pass(g.backbone, n, f"{c.method} {g.data}/{g.backbone}", facts()["tpt"]["views"])
    from ..training.config import PAPER_PRESETS

    sae_s = 0.0
    for j in saes.values():
        b = grid.backbone(j.backbone)
        prof = architecture_profile(b.model, b.model_kwargs)
        preset = PAPER_PRESETS.get(b.model)
        x = j.spec.expansion or (preset.expansion_factor if preset else 4)
        rows = _images(grid.data(j.cache.data).dataset, j.cache.split, sizes.train_limit)
        # `run`'s defaults: 10 epochs over the 90% of rows not held out for the SAE's FVU
        samples = sizes.sae_samples or (rows and int((sizes.sae_epochs or 10) * rows * 0.9))
        s = costs.sae_sample_s(j.backbone, prof.d_model, prof.d_model * x)
        if samples is None or s is None:
            unknown_s.append(f"SAE {j.folder}")
        else:
            sae_s += samples * s
    total_s += sae_s
    n_cells = sum(1 for g in groups for c in g.cells if c not in done)
    out.lines.append(f"  cells to run: {n_cells} (of {len(grid.cells)} declared) in {n_eval_groups} evaluation groups")
    out.lines.append(f"  activation caches to compute: {len(caches)}; SAE trainings: {len(saes)}")
    out.lines.append("  backbone passes over a split: " + ", ".join(f"{b} {n}" for b, n in sorted(passes.items()))
                     + f" (total {sum(passes.values())}, {image_passes:,} image forwards"
                     + (f"; 64-view cells (TPT, C-TPT, ZERO, VS2 + Ens + Aug): {n_tpt}, "
                        f"{facts()['tpt']['views']} views per "
                        "image" if n_tpt else "") + ")")
    views = facts()["tpt"]["views"]
    out.lines.append("  rows to run, by method (prompts; image forwards of their own: 64-view methods count "
                     f"{views} per image, the others share their group's pass):")
    for (method, prompts), ns in sorted(by_method.items()):
        own = views if method in TPT_LIKE else 0
        images = sum(x for x in ns if x is not None)
        out.lines.append(f"    {method:<16} {prompts:<9} {len(ns):>3} cell(s)"
                         + (f", {own * images:,} image forwards ({own} per image)" if own else ""))
    changed = redefined(grid, root, sizes, done)
    if changed:
        out.lines.append(f"  rows whose definition changed since their cells finished (recomputed; {len(changed)}):")
        out.lines += changed
    out.lines.append(f"Estimated time ({costs.where}): {_hms(total_s)} (backbone {_hms(total_s - sae_s)}, SAE training "
                     f"{_hms(sae_s)})" + (f"; not counted (unknown image counts): {len(unknown_s)} item(s)"
                                          if unknown_s else ""))
    out.lines.append(f"  seconds per image: {costs.label}")
    out.lines.append("  text encoding is not counted (cached after the first run; small next to the image passes); "
                     "TPT's prompt-tuning steps through the text tower are not counted either, nor is fitting a linear "
                     "probe (L-BFGS on the cached training embeddings)")
    out.lines.append(f"Download total: {dl_known:,.0f} MB known" + (f" + unknown size for {', '.join(dl_unknown)}"
                                                                   if dl_unknown else ""))
    out.summary = {"cells": n_cells, "declared_cells": len(grid.cells), "eval_groups": n_eval_groups,
                   "caches": len(caches), "sae_trainings": len(saes), "backbone_passes": passes,
                   "image_forwards": image_passes, "estimated_seconds": total_s, "sae_seconds": sae_s,
                   "not_estimated": unknown_s,
                   "rows_by_method": {f"{m} ({p})": len(v) for (m, p), v in by_method.items()},
                   "download_mb_known": dl_known, "download_unknown": dl_unknown,
                   "costs": costs.label}
    return out


def redefined(grid: Grid, root: Path | None, sizes: Sizes, done: set[Any]) -> list[str]:
    """Entries whose cell is to run while a finished cell in `root` is the same computation but for its
    prompt protocol (`templates`): their definition changed, so they are recomputed. One line each."""
    if root is None or not (root / "cells").is_dir():
        return []
    old = []
    for p in (root / "cells").glob("*.json"):
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if st.get("status") == "done" and isinstance(st.get("cell"), dict):
            old.append(st)
    lines = []
    for e in grid.entries:
        if e.cell in done:
            continue
        mine = {k: v for k, v in definition(e.cell).items() if k != "templates"}
        for st in old:
            theirs = {k: v for k, v in definition(st["cell"]).items() if k != "templates"}
            if _same(mine, theirs) and st["cell"].get("templates") != e.cell.templates:
                was = st.get("prompts") or st["cell"].get("templates") or "the data set's ensemble"
                lines.append(f"    {e.table}/{e.row} {e.column}: prompts {was} -> {declared_prompts(e.cell)}")
                break
    return lines


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def norm(d: dict[str, Any]) -> Any:
        return json.loads(json.dumps(d, sort_keys=True, default=str))

    return norm(a) == norm(b)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


__all__ = ["DryRun", "dry_run", "redefined"]
