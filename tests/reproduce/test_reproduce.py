"""`vision-steer reproduce` end to end on a tiny declared grid (random tiny CLIP, generated image folders):
every kind of cell runs, a second run computes nothing, failing cells (an unknown method, a missing data
set) are reported and retried alone; the dry run counts the paper grid; the paper numbers are the notes'."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
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
from sae_lens_vision_steer.reproduce.grid import digest
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
    one = "single"  # Table 1(a)'s protocol; "cifar" (18 templates) stands in for an ensemble (an image folder's
    # own ensemble is the single prompt)
    cells = [("headline", "zeroshot", Cell("cifar100", "ViT-B-32", "zeroshot", templates=one)),
             ("headline", "vs2", Cell("cifar100", "ViT-B-32", "vs2", sae, VS2, templates=one)),
             ("headline", "rec_final", Cell("cifar100", "ViT-B-32", "rec_final", sae, VS2, templates=one)),
             ("headline", "vs2_pass", Cell("cifar100", "ViT-B-32", "vs2", SAESpec("pass", 8, 2, w_aux=0.8), VS2,
                                           templates=one)),
             ("headline", "vs2pp", Cell("cifar100", "ViT-B-32", "vs2pp", sae, VS2, n_neighbours=5, templates=one)),
             ("gate", "q=0.9", Cell("cifar100", "ViT-B-32", "vs2", sae, VS2, fvu_quantile=0.9, templates=one)),
             ("layers", "last2", Cell("cifar100", "ViT-B-32", "vs2_last_n", sae, VS2, last_n=2, templates=one)),
             ("generalized", "vs2", Cell("cifar100", "ViT-B-32", "vs2", union, VS2, fvu_quantile=0.9,
                                         gate_on="gate", templates=one)),
             ("tta", "zeroshot_single", Cell("cifar100", "ViT-B-32", "zeroshot_single")),
             ("headline", "bogus", Cell("cifar100", "ViT-B-32", "no_such_method", sae, VS2)),
             ("headline", "zeroshot", Cell("missing", "ViT-B-32", "zeroshot", templates=one)),
             ("tta", "vs2_ens", Cell("cifar100", "ViT-B-32", "vs2", sae, VS2, templates="cifar")),
             ("tta", "prompt_ensemble", Cell("cifar100", "ViT-B-32", "zeroshot", templates="cifar")),
             ("tta", "zero", Cell("cifar100", "ViT-B-32", "zero")),
             ("reviewers", "knn_vote", Cell("cifar100", "ViT-B-32", "knn_vote", n_neighbours=5, templates=one)),
             ("reviewers", "linear_probe", Cell("cifar100", "ViT-B-32", "linear_probe")),
             ("data_fraction", "50%", Cell("cifar100", "ViT-B-32", "vs2", SAESpec(k=8, expansion=2, train_fraction=0.5),
                                           VS2, templates=one))]
    entries = [Entry(t, r, f"{c.dataset}/ViT-B-32" if c.dataset != "cifar100" else col, c) for t, r, c in cells]
    entries.append(Entry("sae_fvu", "fvu", col, cells[1][2], "fvu"))
    entries.append(Entry("generalized", "fvu", col, cells[7][2], "fvu"))
    entries.append(Entry("data_fraction", "50%", "cifar100/ViT-B-32 fvu", cells[16][2], "fvu"))
    entries.append(Entry("data_fraction", "100%", col, cells[1][2], "gain"))
    return Grid((bb,), ds, tuple(entries))


def _name(cell: dict) -> str:
    sae = cell["sae"] or {}
    parts = (cell["method"], sae.get("objective"), cell["fvu_quantile"] and f"q{cell['fvu_quantile']}",
             sae.get("k") and f"k{sae['k']}", sae.get("train_on"), cell.get("templates"),
             sae.get("train_fraction") and f"f{sae['train_fraction']}")
    return "/".join(str(p) for p in parts if p)


def _run(tmp_path: Path, grid_file: Path, capsys, *extra: str, plots: bool = False) -> tuple[int, str]:
    code = main(["reproduce", "--grid", str(grid_file), "--out", str(tmp_path / "out"), "--limit", "30",
                 "--sae-epochs", "2", "--train-batch-size", "8", "--sae-buffer", "32", "--batch-size", "16", "--device", "cpu",
                 "--no-progress", *([] if plots else ["--no-plots"]), *extra])
    return code, capsys.readouterr().out


def _states(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


@pytest.mark.slow  # end to end: 17 cells, both prompt protocols, 4 SAEs (about 15 s)
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
    assert len(states) == len(grid.cells) == 17
    failed = {k: s for k, s in states.items() if s["status"] == "failed"}
    assert sorted(s["cell"]["method"] for s in failed.values()) == ["no_such_method", "zeroshot"]
    bogus = next(s for s in failed.values() if s["cell"]["method"] == "no_such_method")
    assert "unknown method 'no_such_method'" in bogus["error"] and "registered:" in bogus["error"]
    missing = next(s for s in failed.values() if s["cell"]["dataset"] == "missing")
    assert "does not exist" in missing["error"]
    done = {_name(s["cell"]): s for s in states.values() if s["status"] == "done"}
    assert len(done) == 15
    # caches: the final block and block 0 (for the last-2 layers) of the training split, and the union's
    assert "computed: {" in out and "'caches': 3" in out

    # numbers: gain = top1 - zero-shot; the FVU gate's tau is the 0.9 quantile of per-sample FVU written out
    for s in done.values():
        assert s["gain"] == pytest.approx(s["top1"] - s["zeroshot_top1"])
        assert s["n_images"] == 12
    gated = done["vs2/topk/q0.9/k8/single"]
    from sae_lens import SAE

    from sae_lens_vision_steer.activation_cache import ActivationStore
    from sae_lens_vision_steer.sae.metadata import activation_mean

    sae = SAE.load_from_disk(gated["sae"])
    cache = ActivationStore.open(next((root / "caches").glob("*/cifar100/train-L0-????????")))
    x = cache.load().float()
    with torch.no_grad():
        rec = sae.decode(sae.encode(x))
    mu = activation_mean(sae).float()  # the mean the SAE records (its training rows' mean)
    fvu = ((x - rec) ** 2).sum(1) / ((x - mu) ** 2).sum(1)
    assert gated["fvu_threshold"] == pytest.approx(float(np.quantile(fvu.double().numpy(), 0.9)), rel=1e-4)
    # a baseline registered by name by another module, scored on the shared pass of the SAE group
    vs2, ens = done["vs2/topk/k8/single"], done["vs2/topk/k8/cifar"]
    assert done["zeroshot_single"]["group"] == vs2["group"]
    assert vs2["fvu"] == vs2["sae_heldout_fvu"] is not None
    # both protocols on one backbone pass; each row's gain is against zero-shot with its own prompts
    assert ens["group"] == vs2["group"] == done["zeroshot/cifar"]["group"] == done["zeroshot/single"]["group"]
    assert (vs2["prompts"], ens["prompts"], done["zero"]["prompts"]) == ("single", "cifar (18)", "single")
    assert ens["zeroshot_top1"] == done["zeroshot/cifar"]["top1"]
    assert vs2["zeroshot_top1"] == done["zeroshot/single"]["top1"]
    assert done["zeroshot/single"]["top1"] == done["zeroshot_single"]["top1"]
    # the reviewers' rows: the vote shares VS2++'s group (its neighbours); the probe reads training labels
    assert done["knn_vote/single"]["group"] == done["vs2pp/topk/k8/single"]["group"]
    assert done["linear_probe"]["labels"] == "training labels" and done["linear_probe"]["prompts"] == "none"
    assert done["zero"]["image_forwards_per_image"] == 64
    # the data ablation: an SAE of its own on half of the training images (the held-out ones unchanged)
    half = done["vs2/topk/k8/single/f0.5"]
    run = json.loads((Path(half["sae"]) / "training_run.json").read_text())
    assert run["config"]["train_fraction"] == 0.5 and half["sae"] != vs2["sae"]
    assert json.loads((Path(vs2["sae"]) / "training_run.json").read_text())["config"].get("train_fraction") is None
    assert "fvu_harm" in vs2 and vs2["fvu_harm"]["n_images"] == 12
    # the generalized SAE: trained on the union cache (both folders), gated over it, its FVU per data set
    gen = done["vs2/topk/q0.9/k8/union/single"]
    union_cache = ActivationStore.open(next((root / "caches").glob("*/union/train-L0-????????")))
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
    assert re.search(r"\| vs2 \| cifar100/ViT-B-32 \| single \| top1 \| [\d.]+ \| 64.52 \| [+-][\d.]+ \|", md)
    assert re.search(r"\| vs2_ens \| cifar100/ViT-B-32 \| cifar \(18\) \| top1 \| [\d.]+ \| 65.48 \|", md)
    assert "| linear_probe (uses training labels) | cifar100/ViT-B-32 | none |" in md
    # open_clip's published number for the same weights and data set, with its source, under each zero-shot row
    ref = next(r for r in rows if (r["table"], r["row"]) == ("headline", "open_clip zero-shot (reference)"))
    assert ref["paper"] == 64.23 and ref["status"] == "reference" and "openclip_classification_results" in ref["source"]

    # a second run: nothing new is computed, the done cells are untouched, the two failed ones are retried
    mtimes = {k: (root / "cells" / f"{k}.json").stat().st_mtime_ns for k, s in states.items() if s["status"] == "done"}
    code, out = _run(tmp_path, grid_file, capsys)
    assert code == 3
    assert "computed: nothing" in out and "'cells': 15" in out
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
    assert code == 0 and "cells to run: 1 (of 17 declared)" in out and "SAE trainings: 0" in out

    # a row whose protocol changes is recomputed, and the dry run says which
    moved = Grid(grid.backbones, grid.datasets, tuple(
        Entry(e.table, e.row, e.column, replace(e.cell, templates="imagenet")) if e.row == "rec_final" else e
        for e in grid.entries))
    grid_file.write_text(json.dumps(moved.to_json()))
    code, out = _run(tmp_path, grid_file, capsys, "--dry-run")
    assert "cells to run: 2 (of 17 declared)" in out
    assert "headline/rec_final cifar100/ViT-B-32: prompts single -> imagenet" in out


def test_paper_grid_dry_run_counts_and_selection(capsys):
    grid = paper_grid()
    assert {e.cell.dataset for e in grid.entries} >= {"cifar100", "cub200", "tiny-imagenet", "aircraft", "food101",
                                                     "flowers102", "caltech101", "sun397", "eurosat"}
    assert {e.cell.method for e in grid.entries} >= {"zeroshot", "vs2", "rec_final", "rec_final_gamma", "vs2pp",
                                                    "vs2pp_oracle", "tpt", "ctpt", "zero", "vs2_ens_aug", "knn_vote",
                                                    "knn_vote_oracle", "linear_probe", "vs2_last_n"}
    # the headline VS2 cell is also lam 2.1 / gamma 1.5 of the sweep: one computation
    head = next(e.cell for e in grid.entries if (e.table, e.row, e.column) == ("headline", "vs2", "cifar100/ViT-B-32"))
    sweep = next(e.cell for e in grid.entries if (e.table, e.row) == ("lam_gamma", "lam=2.1,gamma=1.5"))
    assert head == sweep and grid.cell_key(head, Sizes()) == grid.cell_key(sweep, Sizes())
    assert grid.cell_key(head, Sizes()) != grid.cell_key(head, Sizes(eval_limit=10))
    with pytest.raises(ValueError, match=r"unknown data set\(s\) \['cifar10'\]"):
        grid.select(datasets=["cifar10"])
    sub = grid.select(tables=["tta"])
    assert sorted(c.method for c in sub.cells if c.dataset == "cifar100") == sorted(
        ["zeroshot", "zeroshot", "tpt", "ctpt", "zero", "vs2", "vs2", "vs2_ens_aug"])
    assert main(["reproduce", "--out", "/nonexistent/x", "--dry-run", "--only", "tta"]) == 0
    out = capsys.readouterr().out
    # per data set: one evaluation pass, one cache pass of the training split, 4 x 64 views (TPT, C-TPT, ZERO,
    # VS2 + Ens + Aug); three data sets
    assert "backbone passes over a split: ViT-B-32 774" in out
    assert "SAE trainings: 3" in out and "605 MB (listed" in out and "50,000 images" in out
    assert re.search(r"zero +single +3 cell\(s\), 1,650,816 image forwards \(64 per image\)", out)
    assert re.search(r"vs2_ens_aug +ensemble +3 cell\(s\)", out)


def test_paper_grid_protocols_and_unchanged_keys():
    """Table 1(a)-style rows use the single prompt; Table 1(b) rows as named; cells whose definition did
    not change keep the key the grid gave them before protocols existed (their results are reused)."""
    grid = paper_grid()
    for e in grid.entries:
        if e.table in ("headline", "sae_fvu", "lam_gamma", "gate", "width_k", "vs2pp_n", "data_fraction"):
            assert e.cell.templates == "single", e
    tta = {e.row: e.cell for e in grid.entries if e.table == "tta" and e.column == "cifar100/ViT-B-32"}
    assert tta["zeroshot"].templates == tta["vs2"].templates == "single"
    assert tta["prompt_ensemble"].templates is tta["vs2_ens"].templates is None  # the data set's ensemble
    assert tta["vs2_ens"].method == "vs2" and tta["prompt_ensemble"].method == "zeroshot"

    def old_key(cell) -> str:  # the key before `templates` / `train_fraction` existed, written out
        c = asdict(cell)
        del c["templates"]
        if c["sae"] is not None:
            del c["sae"]["train_fraction"]
        names = {cell.dataset, *(n for n in (cell.gate_on, cell.sae and cell.sae.train_on) if n)}
        return digest({"cell": c, "backbone": asdict(grid.backbone(cell.backbone)),
                       "data": [asdict(grid.data(n)) for n in sorted(names)], "sizes": asdict(Sizes())})

    for cell in (tta["vs2_ens"], tta["prompt_ensemble"], tta["tpt"], tta["ctpt"]):
        assert grid.cell_key(cell, Sizes()) == old_key(cell)
    assert grid.cell_key(tta["vs2"], Sizes()) != old_key(tta["vs2"])  # now single: recomputed
    full = next(e.cell for e in grid.entries if (e.table, e.row, e.metric) == ("data_fraction", "100%", "gain"))
    assert full == tta["vs2"] and full.sae.train_fraction is None  # 100% is the headline SAE


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
    tta = text.split("## Test-time-adaptation comparison")[1]
    for f in (f for f in facts if f["table"] == "tta"):  # Table 1(b), every data set
        line = next(ln for ln in tta.splitlines() if ln.startswith(f"| {f['row_name']} |"))
        col = ["cifar100", "cub200", "tiny-imagenet"].index(f["dataset"])
        assert float(line.strip("|").split("|")[1 + col]) == f["value"], f
    protocol = text.split("## Prompt protocol")[1].split("\n## ")[0]
    for f in (f for f in facts if f["table"] == "reference"):  # open_clip's numbers, each with its source
        assert "openclip_classification_results.csv" in f["source"] and "89fb801" in f["source"]
        if f["backbone"] == "ViT-B-32" or f["dataset"] == "cifar100":  # the ones the notes list
            assert f"{f['value']:.2f}" in protocol, f
    for f in facts:
        if isinstance(f["value"], float) and f["table"] != "reference":
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


def test_rows_needing_a_training_split_are_refused_where_there_is_none():
    from sae_lens_vision_steer.reproduce import make_plan

    bb = Backbone("ViT-B-32", "ViT-B-32", None, random_weights=True, model_kwargs=json.dumps(TINY_CLIP_KWARGS))
    ood = DataSource("eurosat", "eurosat", train_split=None)
    cells = [Cell("eurosat", "ViT-B-32", m, templates=t) for m, t in (("linear_probe", None), ("knn_vote", "single"),
                                                                        ("zeroshot", "single"))]
    grid = Grid((bb,), (ood,), tuple(Entry("t", c.method, "eurosat/ViT-B-32", c) for c in cells))
    plan, bad = make_plan(grid, Sizes())
    assert "linear_probe trains on the training split; 'eurosat' has none" in bad[cells[0]]
    assert "knn_vote retrieves from the training split; 'eurosat' has none" in bad[cells[1]]
    assert cells[2] not in bad and [c.method for g in plan.groups for c in g.cells] == ["zeroshot"]
