"""Issue 19, items 1, 3 and 16 for `reproduce`: a grid file cannot run code through its model kwargs, its names
cannot put anything outside --out (the dry run refuses them too), and a full disk is exit 5."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from conftest import TINY_CLIP_KWARGS, write_image_folder
from saes import hostile_model_dir

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.core.errors import OutputError, UsageError
from sae_lens_vision_steer.core.names import inside, safe_component, safe_relative_path
from sae_lens_vision_steer.reproduce import Backbone, Cell, DataSource, Entry, Grid, SAESpec


def _grid_file(tmp_path: Path, backbone: Backbone, data_name: str = "d", objective: str = "topk",
               sae: bool = True, split: str = "train") -> Path:
    data = tmp_path / "data"
    if not data.exists():
        write_image_folder(data / "train", n_classes=2, per_class=3, size=32)
        write_image_folder(data / "val", n_classes=2, per_class=2, size=32, seed=1)
    spec = SAESpec(objective, 8, 2) if sae else None
    cell = Cell(data_name, backbone.name, "vs2" if sae else "zeroshot", spec, (("gamma", 1.5), ("lam", 2.1)) if sae else ())
    grid = Grid((backbone,), (DataSource(data_name, "imagefolder", str(data), train_split=split),),
                (Entry("t", "r", "c", cell),))
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid.to_json()))
    return path


def _reproduce(tmp_path: Path, grid: Path, *extra: str) -> int:
    return main(["reproduce", "--grid", str(grid), "--out", str(tmp_path / "out"), "--limit", "4", "--device", "cpu",
                 "--sae-epochs", "1", "--no-progress", "--no-plots", *extra])


@pytest.mark.parametrize("dry", [False, True])
def test_grid_model_kwargs_cannot_turn_off_weights_only(tmp_path, capsys, dry):
    marker = tmp_path / "PWNED"
    model = hostile_model_dir(tmp_path / "model", marker)
    grid = _grid_file(tmp_path, Backbone("evil", f"local-dir:{model}", None, model_kwargs='{"weights_only": false}'),
                      sae=False)
    assert _reproduce(tmp_path, grid, *(["--dry-run"] if dry else [])) == 3
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickle's payload ran"
    assert str(grid) in err and "'weights_only'" in err and "backbones[0]" in err


@pytest.mark.parametrize("field,value", [("backbone", "../../escaped"), ("backbone", "/tmp/abs"),
                                         ("data", "../../escaped"), ("data", ".hidden"), ("split", "../../x"),
                                         ("objective", "../../x")])
@pytest.mark.parametrize("dry", [False, True])
def test_grid_names_that_would_leave_out_are_refused(tmp_path, capsys, field, value, dry):
    bb = Backbone(value if field == "backbone" else "b", "ViT-B-32", None, random_weights=True,
                  model_kwargs=json.dumps(TINY_CLIP_KWARGS))
    grid = _grid_file(tmp_path, bb, data_name=value if field == "data" else "d",
                      objective=value if field == "objective" else "topk", split=value if field == "split" else "train")
    before = {p for p in tmp_path.parent.iterdir()}
    assert _reproduce(tmp_path, grid, *(["--dry-run"] if dry else [])) == 2
    err = capsys.readouterr().err
    assert str(grid) in err and repr(value) in err
    assert {p for p in tmp_path.parent.iterdir()} == before and not (tmp_path / "escaped").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_names_helper():
    for ok in ("ViT-B-32", "cifar100", "union-gate", "x.y_z"):
        assert safe_component(ok, "name") == ok
    for bad in ("..", "../x", "a/b", ".hidden", "", "a..b", "/abs", "a b", "x" * 201, None, "é"):
        with pytest.raises(UsageError, match="invalid name"):
            safe_component(bad, "name")
    assert safe_relative_path("blocks.11/topk", "sae id") == "blocks.11/topk"
    for bad in ("a//b", "/a", "a/", "a/../b"):
        with pytest.raises(UsageError):
            safe_relative_path(bad, "sae id")
    root = Path("/srv/out")
    assert inside(root, root / "caches/x") == Path("/srv/out/caches/x")
    with pytest.raises(OutputError, match="outside"):
        inside(root, root / "caches/../../etc")


def test_a_full_disk_stops_reproduce_with_exit_5(tmp_path, capsys, monkeypatch):
    bb = Backbone("b", "ViT-B-32", None, random_weights=True, model_kwargs=json.dumps(TINY_CLIP_KWARGS))
    grid = _grid_file(tmp_path, bb, sae=False)
    import sae_lens_vision_steer.evaluation.results as results

    def full_disk(path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(results, "write_json_atomic", full_disk)  # the group's results.json cannot be written
    assert _reproduce(tmp_path, grid) == 5
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "Traceback" not in err
