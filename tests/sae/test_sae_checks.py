"""Issue 19, items 1, 7, 11, 15: nothing an SAE folder holds runs code, and a damaged SAE is one InputError
naming its file (exit 3), never a traceback or numbers computed from NaN weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from saes import hostile_model_dir, make_topk_sae, payload_pickle
from safetensors.torch import load_file, save_file

from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.core.errors import InputError
from sae_lens_vision_steer.sae.loading import load_vision_sae

EXIT_INPUT = 3


def _sae(folder: Path, **meta) -> Path:
    sae = make_topk_sae()
    for k, v in meta.items():
        setattr(sae.cfg.metadata, k, v)
    sae.save_model(folder)
    return folder


def _edit_cfg(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def _hostile_sae(tmp_path: Path, marker: Path, **kwargs) -> Path:
    """The fuzz case: metadata asks for weights_only=False and points at a local-dir model whose weights are a
    payload pickle."""
    model = hostile_model_dir(tmp_path / "model", marker)
    return _sae(tmp_path / "sae", model_name=f"local-dir:{model}", pretrained=None,
                model_kwargs=kwargs or {"weights_only": False})


@pytest.mark.parametrize("command", ["eval", "features"])
def test_sae_metadata_cannot_turn_off_weights_only(tmp_path, capsys, command):
    marker = tmp_path / "PWNED"
    sae = _hostile_sae(tmp_path, marker)
    args = {"eval": ["eval", "--sae", str(sae), "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"],
            "features": ["features", "--sae", str(sae), "--cache", str(tmp_path / "cache"), "--out",
                         str(tmp_path / "fb"), "--device", "cpu", "--no-progress"]}[command]
    assert main(args) == EXIT_INPUT
    err = capsys.readouterr().err
    assert not marker.exists(), "the pickle's payload ran"
    assert str(sae / "cfg.json") in err and "'weights_only'" in err and "Traceback" not in err


def test_without_the_switch_the_pickle_is_refused_by_weights_only_in_one_line(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    sae = _hostile_sae(tmp_path, marker)
    _edit_cfg(sae, metadata={**json.loads((sae / "cfg.json").read_text())["metadata"], "model_kwargs": {},
                             "model_from_pretrained_kwargs": {}})
    args = ["eval", "--sae", str(sae), "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"),
            "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    assert main(args) == EXIT_INPUT
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "weights_only=True" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kwargs,needle", [
    ({"trust_remote_code": True}, "'trust_remote_code'"),
    ({"pickle_module": "os"}, "'pickle_module'"),
    ({"pretrained_image_path": "/tmp/x.pt"}, "'pretrained_image_path'"),
    ({"vision_cfg": {"timm_model_pretrained": True}}, "vision_cfg.timm_model_pretrained"),
    ({"no_such_option": 1}, "not an architecture option"),
    ({"force_image_size": 4096}, "force_image_size=4096"),
])
def test_file_model_kwargs_are_architecture_options_only(tmp_path, kwargs, needle):
    sae = _sae(tmp_path / "sae", model_name="ViT-B-32", model_kwargs=kwargs)
    with pytest.raises(InputError, match="cfg.json") as e:
        load_vision_sae(sae)
    assert needle in str(e.value)


def test_architecture_kwargs_still_load(tmp_path):
    from conftest import TINY_CLIP_KWARGS

    sae = _sae(tmp_path / "sae", model_name="ViT-B-32", model_kwargs=TINY_CLIP_KWARGS)
    _, info = load_vision_sae(sae)
    assert info.metadata["model_kwargs"] == json.loads(json.dumps(TINY_CLIP_KWARGS))


def test_a_pickle_under_the_safetensors_name_is_refused_unread(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    sae = _sae(tmp_path / "sae")
    (sae / "sae_weights.safetensors").write_bytes(payload_pickle(marker))
    assert main(["eval", "--sae", str(sae), "--random-weights", "--device", "cpu"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert not marker.exists() and "sae_weights.safetensors is not a safetensors file" in err and "pickle" in err


@pytest.mark.parametrize("change,needle", [
    ({"k": 1000}, "k=1000 is out of range"),
    ({"k": -3}, "k=-3 is out of range"),
    ({"k": 0}, "k=0 is out of range"),
    ({"d_sae": 128}, "does not match"),  # the weights hold 256 latents
    ({"architecture": "jumprelu"}, "threshold"),  # a JumpReLU SAE needs its threshold tensor
    ({"d_in": "64"}, "d_in should be a whole number"),
])
def test_damaged_cfg_is_one_input_error_naming_the_file(tmp_path, capsys, change, needle):
    sae = _edit_cfg(_sae(tmp_path / "sae"), **change)
    assert main(["eval", "--sae", str(sae), "--random-weights", "--device", "cpu"]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert needle in err and str(sae) in err and "Traceback" not in err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    sae = _sae(tmp_path / "sae")
    w = load_file(sae / "sae_weights.safetensors")
    w["W_dec"][3, 5] = value
    save_file(w, sae / "sae_weights.safetensors")
    with pytest.raises(InputError, match="'W_dec' holds 1 non-finite"):
        load_vision_sae(sae)


def test_a_clean_sae_loads_unchanged(tmp_path):
    ref = make_topk_sae()
    sae = _sae(tmp_path / "sae")
    loaded, _ = load_vision_sae(sae)
    torch.testing.assert_close(loaded.W_enc, ref.W_enc)
    assert loaded.cfg.k == ref.cfg.k
