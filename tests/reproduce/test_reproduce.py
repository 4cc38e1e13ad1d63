"""`vision-steer reproduce` end to end on a tiny declared grid (random tiny CLIP, generated image folders):
every kind of cell runs, a second run computes nothing, failing cells (an unknown method, a missing data
set) are reported and retried alone; the dry run counts the paper grid; the paper numbers are the notes'."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP_KWARGS, write_image_folder

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.reproduce import (
    Backbone,
    Cell,
    DataSource,
    Entry,
    Grid,
    SAESpec,
    Sizes,
    paper_grid,
)
from sae_lens_vision_steer.reproduce.tables import paper_numbers

NOTES = Path(__file__).resolve().parents[2].parent / "shared" / "paper-notes.md"
VS2 = (("gamma", 1.5), ("lam", 2.1))


def tiny_grid(data_dir: Path, missing_dir: Path, other_dir: Path) -> Grid:
    # The grid's own names: "cifar100" / "ViT-B-32" here are a generated folder and the tiny random CLIP,
    # so the tables look the paper's numbers up (the differences are meaningless, their arithmetic is not).
    bb = Backbone("ViT-B-32", "ViT-B-32", None, random_weights=True, model_kwargs=json.dumps(TINY_CLIP_KWARGS))
    ds = (DataSource("cifar100", "imagefolder", str(data_dir)), DataSource("missing", "imagefolder", str(missing_dir)),
          DataSource("union", "imagefolder,imagefolder", f"{data_dir},{other_dir}"),
          DataSource("gate", "imagefolder", str(data_dir)))  # the gate on the union's first member only
    union = SAESpec(k=8, expansion=2, train_on="union")
    sae = SAESpec(k=8, expansion=2)
    col = "cifar100/ViT-B-32"
    cells = [("headline", "zeroshot", Cell("cifar100", "ViT-B-32", "zeroshot")),
             ("headline", "vs2", Cell("cifar100", "ViT-B-32", "vs2", sae, VS2)),
             ("headline", "rec_final", Cell("cifar100", "ViT-B-32", "rec_final", sae, VS2)),
             ("headline", "vs2_pass", Cell("cifar100", "ViT-B-32", "vs2", SAESpec("pass", 8, 2, w_aux=0.8), VS2)),
             ("headline", "vs2pp", Cell("cifar100", "ViT-B-32", "vs2pp", sae, VS2, n_neighbours=5)),
             ("gate", "q=0.9", Cell("cifar100", "ViT-B-32", "vs2", sae, VS2, fvu_quantile=0.9)),
             ("layers", "last2", Cell("cifar100", "ViT-B-32", "vs2_last_n", sae, VS2, last_n=2)),
             ("generalized", "vs2", Cell("cifar100", "ViT-B-32", "vs2", union, VS2, fvu_quantile=0.9,
                                                     gate_on="gate")),
             ("tta", "zeroshot_single", Cell("cifar100", "ViT-B-32", "zeroshot_single")),
             ("headline", "bogus", Cell("cifar100", "ViT-B-32", "no_such_method", sae, VS2)),
             ("headline", "zeroshot", Cell("missing", "ViT-B-32", "zeroshot"))]
    entries = [Entry(t, r, f"{c.dataset}/ViT-B-32" if c.dataset != "cifar100" else col, c) for t, r, c in cells]
    entries.append(Entry("sae_fvu", "fvu", col, cells[1][2], "fvu"))
    entries.append(Entry("generalized", "fvu", col, cells[7][2], "fvu"))
    return Grid((bb,), ds, tuple(entries))


def _run(tmp_path: Path, grid_file: Path, capsys, *extra: str, plots: bool = False) -> tuple[int, str]:
    code = main(["reproduce", "--grid", str(grid_file), "--out", str(tmp_path / "out"), "--limit", "30",
                 "--sae-epochs", "2", "--train-batch-size", "8", "--sae-buffer", "32", "--batch-size", "16", "--device", "cpu",
                 "--no-progress", *([] if plots else ["--no-plots"]), *extra])
    return code, capsys.readouterr().out


def _states(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


def test_reproduce_end_to_end_reuses_and_retries_only_failed_cells(tmp_path, capsys):
    data = tmp_path / "data"
    write_image_folder(data / "train", n_classes=3, per_class=10, size=32, seed=0)
    write_image_folder(data / "val", n_classes=3, per_class=4, size=32, seed=1)
    write_image_folder(tmp_path / "other" / "train", n_classes=2, per_class=6, size=32, seed=2)
    grid = tiny_grid(data, tmp_path / "missing", tmp_path / "other")
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(grid.to_json()))

    code, out = _run(tmp_path, grid_file, capsys)
    assert code == 3  # some cells failed
    root = tmp_path / "out"
    states = _states(root)
    assert len(states) == len(grid.cells) == 11
    failed = {k: s for k, s in states.items() if s["status"] == "failed"}
    assert sorted(s["cell"]["method"] for s in failed.values()) == ["no_such_method", "zeroshot"]
    bogus = next(s for s in failed.values() if s["cell"]["method"] == "no_such_method")
    assert "unknown method 'no_such_method'" in bogus["error"] and "registered:" in bogus["error"]
    missing = next(s for s in failed.values() if s["cell"]["dataset"] == "missing")
    assert "does not exist" in missing["error"]
    done = {s["cell"]["method"] + ("/" + s["cell"]["sae"]["objective"] if s["cell"]["sae"] else "")
            + (f"/q{s['cell']['fvu_quantile']}" if s["cell"]["fvu_quantile"] else "")
            + (f"/k{s['cell']['sae']['k']}" if s["cell"]["sae"] else "")
            + (f"/{s['cell']['sae']['train_on']}" if s["cell"]["sae"] and s["cell"]["sae"]["train_on"] else ""): s
            for s in states.values() if s["status"] == "done"}
    assert len(done) == 9
    # caches: the final block and block 0 (for the last-2 layers) of the training split, and the union's
    assert "computed: {" in out and "'caches': 3" in out

    # numbers: gain = top1 - zero-shot; the FVU gate's tau is the 0.9 quantile of per-sample FVU written out
    for s in done.values():
        assert s["gain"] == pytest.approx(s["top1"] - s["zeroshot_top1"])
        assert s["n_images"] == 12
    gated = done["vs2/topk/q0.9/k8"]
    from sae_lens import SAE

    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.sae.metadata import activation_mean

    sae = SAE.load_from_disk(gated["sae"])
    cache = ActivationStore.open(next((root / "caches").glob("*/cifar100/train-L0-*")))
    x = cache.load().float()
    with torch.no_grad():
        rec = sae.decode(sae.encode(x))
    mu = activation_mean(sae).float()  # the mean the SAE records (its training rows' mean)
    fvu = ((x - rec) ** 2).sum(1) / ((x - mu) ** 2).sum(1)
    assert gated["fvu_threshold"] == pytest.approx(float(np.quantile(fvu.double().numpy(), 0.9)), rel=1e-4)
    # a baseline registered by name by another module, scored on the shared pass of the SAE group
    assert done["zeroshot_single"]["group"] == done["vs2/topk/k8"]["group"]
    assert done["vs2/topk/k8"]["fvu"] == done["vs2/topk/k8"]["sae_heldout_fvu"] is not None
    # the generalized SAE: trained on the union cache (both folders), gated over it, its FVU per data set
    gen = done["vs2/topk/q0.9/k8/union"]
    union_cache = ActivationStore.open(next((root / "caches").glob("*/union/train-L0-*")))
    assert union_cache.n_rows == 30 + 12
    usae = SAE.load_from_disk(gen["sae"])
    x = union_cache.load().float()[union_cache.dataset_ids() == 0]  # the gate member's rows
    with torch.no_grad():
        fvu = ((x - usae.decode(usae.encode(x))) ** 2).sum(1) / ((x - activation_mean(usae).float()) ** 2).sum(1)
    assert gen["fvu_threshold"] == pytest.approx(float(np.quantile(fvu.double().numpy(), 0.9)), rel=1e-4)
    assert gen["fvu"] != gen["sae_heldout_fvu"] and 0 < gen["fvu"] < 10

    # the tables: ours, the paper's number and the difference; failures listed with their errors
    md = (root / "tables.md").read_text()
    rows = json.loads((root / "tables.json").read_text())
    vs2_row = next(r for r in rows if (r["table"], r["row"]) == ("headline", "vs2"))
    assert vs2_row["paper"] == 64.52 and vs2_row["diff"] == pytest.approx(vs2_row["ours"] - 64.52)
    assert "failed: KeyError: unknown method 'no_such_method'" in md
    assert re.search(r"\| vs2 \| cifar100/ViT-B-32 \| top1 \| [\d.]+ \| 64.52 \| [+-][\d.]+ \|", md)

    # a second run: nothing new is computed, the done cells are untouched, the two failed ones are retried
    mtimes = {k: (root / "cells" / f"{k}.json").stat().st_mtime_ns for k, s in states.items() if s["status"] == "done"}
    code, out = _run(tmp_path, grid_file, capsys)
    assert code == 3
    assert "computed: nothing" in out and "'cells': 9" in out
    assert {k: (root / "cells" / f"{k}.json").stat().st_mtime_ns for k in mtimes} == mtimes
    assert {k for k, s in _states(root).items() if s["status"] == "failed"} == set(failed)

    # the missing data set appears: only its cell runs; the unknown method still fails alone
    write_image_folder(tmp_path / "missing" / "train", n_classes=3, per_class=2, size=32)
    write_image_folder(tmp_path / "missing" / "val", n_classes=3, per_class=2, size=32)
    code, out = _run(tmp_path, grid_file, capsys, plots=True)
    assert (root / "table_headline.png").stat().st_size > 1000
    assert code == 3 and "'cells': 1" in out.split("reused")[0] and "'caches'" not in out.split("reused")[0]
    assert [s["cell"]["method"] for s in _states(root).values() if s["status"] == "failed"] == ["no_such_method"]

    # the dry run of the finished folder has nothing left but the failing cell
    code, out = _run(tmp_path, grid_file, capsys, "--dry-run")
    assert code == 0 and "cells to run: 1 (of 11 declared)" in out and "SAE trainings: 0" in out


def test_paper_grid_dry_run_counts_and_selection(capsys):
    grid = paper_grid()
    assert {e.cell.dataset for e in grid.entries} >= {"cifar100", "cub200", "tiny-imagenet", "aircraft", "food101",
                                                     "flowers102", "caltech101", "sun397", "eurosat"}
    assert {e.cell.method for e in grid.entries} >= {"zeroshot", "vs2", "rec_final", "rec_final_gamma", "vs2pp",
                                                    "vs2pp_oracle", "tpt", "ctpt", "prompt_ensemble",
                                                    "zeroshot_single", "vs2_last_n"}
    # the headline VS2 cell is also lam 2.1 / gamma 1.5 of the sweep: one computation
    head = next(e.cell for e in grid.entries if (e.table, e.row, e.column) == ("headline", "vs2", "cifar100/ViT-B-32"))
    sweep = next(e.cell for e in grid.entries if (e.table, e.row) == ("lam_gamma", "lam=2.1,gamma=1.5"))
    assert head == sweep and grid.cell_key(head, Sizes()) == grid.cell_key(sweep, Sizes())
    assert grid.cell_key(head, Sizes()) != grid.cell_key(head, Sizes(eval_limit=10))
    with pytest.raises(ValueError, match=r"unknown data set\(s\) \['cifar10'\]"):
        grid.select(datasets=["cifar10"])
    sub = grid.select(tables=["tta"])
    assert sorted(c.method for c in sub.cells) == sorted(["zeroshot_single", "prompt_ensemble", "tpt", "ctpt",
                                                         "zeroshot", "vs2"])
    assert main(["reproduce", "--out", "/nonexistent/x", "--dry-run", "--only", "tta"]) == 0
    out = capsys.readouterr().out
    # one evaluation pass of CIFAR-100 test, one cache pass of CIFAR-100 train, 2 x 64 TPT views
    assert "backbone passes over a split: ViT-B-32 130" in out
    assert "SAE trainings: 1" in out and "605 MB (listed" in out and "50,000 images" in out


def test_paper_numbers_are_the_notes_tables():
    facts = paper_numbers()
    assert all({"table", "paper_table", "row", "dataset", "backbone", "metric", "value"} <= set(f) for f in facts)
    keys = [(f["table"], f["row"], f["dataset"], f["backbone"], f["metric"]) for f in facts]
    assert len(keys) == len(set(keys))
    if not NOTES.is_file():
        pytest.skip("paper notes not found")
    text = NOTES.read_text()
    head = text.split("## Headline results")[1]
    for f in (f for f in facts if f["table"] == "headline"):  # every number is in the notes' row, in its column
        line = next(ln for ln in head.splitlines() if ln.startswith(f"| {f['row_name']} |"))
        col = ["cifar100", "cub200", "tiny-imagenet"].index(f["dataset"])
        pair = line.strip("|").split("|")[1 + col].split("/")
        assert float(pair[0 if f["backbone"] == "ViT-B-32" else 1]) == f["value"]
    for f in facts:
        if isinstance(f["value"], float):
            assert f"{f['value']:.2f}".rstrip("0").rstrip(".") in text or f"{f['value']}" in text, f


def test_bad_requests_are_refused_with_the_reason(tmp_path, capsys):
    cases = [(["--only", "nonsense"], 2, "unknown table(s) ['nonsense']; the grid declares ['headline'"),
             (["--grid", str(tmp_path / "nope.json")], 3, "grid file"),
             (["--grid", str(tmp_path / "bad.json")], 2, "bad.json: missing field 'datasets'"),
             (["--only", "tta", "--costs", str(tmp_path / "costs.json")], 2, "'image_seconds_per_image'")]
    (tmp_path / "bad.json").write_text('{"backbones": []}')
    (tmp_path / "costs.json").write_text('{"image_seconds_per_image": {"ViT-B-32": -1}}')
    for extra, code, text in cases:
        assert main(["reproduce", "--out", str(tmp_path / "out"), "--dry-run", *extra]) == code
        assert text in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written
