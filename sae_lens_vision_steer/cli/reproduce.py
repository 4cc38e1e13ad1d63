"""`vision-steer reproduce`: the paper's evaluation grid in one folder, resumable, with the paper's numbers
next to ours (sae_lens_vision_steer/reproduce/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import UsageError
from .common import (
    EXIT_INPUT,
    add_device_arg,
    add_progress_arg,
    non_negative_int,
    positive_float,
    positive_int,
)

HELP = "run the paper's whole evaluation grid (or a part) and write its tables next to the paper's numbers"
DESCRIPTION = (
    "Runs a declared grid of data sets x backbones x methods plus the paper's ablations (lambda x gamma, last "
    "1/2/3 layers, gate quantiles, SAE width/k, PASS w_aux, VS2++ N, the generalized SAE, the TTA baselines) in "
    "--out, reusing every cache, SAE, text embedding and finished cell already there. A failing cell does not "
    "stop the others; it is listed as failed with its error, and the next run retries only the failed cells. "
    "Writes OUT/tables.md, tables.json and table_*.png. --dry-run lists the downloads and the work with sizes "
    "and an estimated time. Exits 3 when some cells failed."
)


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for every cache, SAE, result and the tables")
    p.add_argument("--grid", default=None,
                   help="a grid JSON file (the fields of reproduce/grid.py) instead of the paper's grid")
    p.add_argument("--write-grid", default=None, metavar="FILE", help="write the (selected) grid as JSON and stop")
    g = p.add_argument_group("selection (comma-separated names; default: all)")
    g.add_argument("--datasets", default=None, help="e.g. cifar100,cub200 (the OOD sets: aircraft,food101,...)")
    g.add_argument("--backbones", default=None, help="e.g. ViT-B-32,ViT-B-16")
    g.add_argument("--methods", default=None, help="e.g. zeroshot,vs2,vs2pp (methods as the evaluation runner names them)")
    g.add_argument("--only", default=None, metavar="TABLE",
                   help="tables: headline, sae_fvu, vitl14, ood, generalized, tta, lam_gamma, layers, gate, "
                        "pass_waux, width_k, vs2pp_n")
    g = p.add_argument_group("sizes (for small runs; part of every key, so other sizes never reuse these results)")
    g.add_argument("--limit", type=positive_int, default=None, help="at most this many images of every split")
    g.add_argument("--train-limit", type=positive_int, default=None, help="training images per split (overrides --limit)")
    g.add_argument("--eval-limit", type=positive_int, default=None, help="evaluation images per split (overrides --limit)")
    g.add_argument("--sae-epochs", type=positive_float, default=None, help="SAE epochs (default 10, as `run`)")
    g.add_argument("--sae-samples", type=positive_int, default=None, help="SAE training samples instead of epochs")
    g.add_argument("--sae-buffer", type=positive_int, default=None,
                   help="rows in the SAE loader's shuffle buffer (default: the library's, the larger of 65536 rows "
                        "and 80 batches, at most the training rows)")
    g.add_argument("--batch-size", type=positive_int, default=256, help="images per forward pass")
    g.add_argument("--train-batch-size", type=positive_int, default=256, help="SAE training batch size")
    g.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers")
    g = p.add_argument_group("dry run")
    g.add_argument("--dry-run", action="store_true", help="list downloads and work with sizes and time; run nothing")
    g.add_argument("--costs", default=None, metavar="FILE",
                   help='JSON of measured costs: {"image_seconds_per_image": {"ViT-B-32": s, ...}, '
                        '"sae_seconds_per_sample": {...}, "label": "..."} (or "flops_per_second"); default: '
                        "counted FLOPs over the H200's published FP32 peak (a lower bound)")
    add_device_arg(p)
    p.add_argument("--text-cache", default=None, metavar="DIR", help="text-embedding cache (default: OUT/text_cache)")
    p.add_argument("--no-plots", action="store_true", help="skip the table PNGs")
    add_progress_arg(p)


def _grid_and_sizes(args: argparse.Namespace):
    from ..reproduce import Grid, Sizes, paper_grid

    grid = Grid.from_json(args.grid) if args.grid else paper_grid()
    grid = grid.select(_csv(args.datasets), _csv(args.backbones), _csv(args.methods), _csv(args.only))
    sizes = Sizes(train_limit=args.train_limit or args.limit, eval_limit=args.eval_limit or args.limit,
                  sae_epochs=args.sae_epochs, sae_samples=args.sae_samples, batch_size=args.batch_size,
                  train_batch_size=args.train_batch_size, sae_buffer=args.sae_buffer)
    if args.sae_epochs is not None and args.sae_samples is not None:
        raise UsageError("give --sae-epochs or --sae-samples, not both")
    return grid, sizes


def interrupted(args: argparse.Namespace) -> str:
    return (f"finished cells, caches and SAEs are saved in {args.out}; run the same command again to continue "
            "(an interrupted cache or SAE training resumes where it stopped)")


def run(args: argparse.Namespace) -> int:
    from ..reproduce import GridRunner, cell_states, make_plan, write_tables
    from ..reproduce.costs import Costs
    from ..reproduce.dryrun import dry_run

    grid, sizes = _grid_and_sizes(args)
    if args.write_grid:
        from .common import write_json_atomic

        write_json_atomic(args.write_grid, grid.to_json())
        print(f"wrote {args.write_grid}: {len(grid.cells)} cells in {len(grid.entries)} table entries")
        return 0
    out = Path(args.out)
    if args.dry_run:
        costs = Costs.from_file(args.costs) if args.costs else Costs.gpu_peak_bound()
        plan, bad = make_plan(grid, sizes)
        states = cell_states(grid, out, sizes) if out.is_dir() else {}
        done = {c for c, s in states.items() if s and s.get("status") == "done"}
        report = dry_run(plan, costs, out if out.is_dir() else None, done)
        print(f"vision-steer reproduce --dry-run: {len(grid.cells)} cells, {len(grid.tables)} table(s) "
              f"({', '.join(grid.tables)})")
        print(report.text())
        for cell, err in bad.items():
            print(f"  cannot plan {cell.method} on {cell.dataset}/{cell.backbone}: {err}")
        return 0
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")
    runner = GridRunner(grid, out, sizes, device=args.device, show_progress=not args.no_progress,
                        text_cache=args.text_cache, num_workers=args.num_workers)
    rep = runner.run()
    written = write_tables(grid, cell_states(grid, out, sizes), out, plots=not args.no_plots)
    print(f"computed: {dict(rep.computed) or 'nothing'}; reused: {dict(rep.reused) or 'nothing'} "
          f"({rep.seconds:.1f} s)")
    print(f"wrote {written['md']}, {written['json']}" + (f" and {len(written) - 2} plot(s)" if len(written) > 2 else ""))
    if rep.failed:
        print(f"{len(rep.failed)} of {len(grid.cells)} cells failed (listed in {written['md']}); "
              "run the same command again to retry only those", file=sys.stderr)
        return EXIT_INPUT
    return 0
