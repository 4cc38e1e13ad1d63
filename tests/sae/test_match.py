"""Issue 22 item 1: an SAE is bound to its model's weights (fingerprint) and architecture, not to the path
string the model was loaded with; `eval --sae` finds a `local-dir:` model it records, or says where it
looked and how to pass it."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_image_folder
from saes import make_topk_sae

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_INPUT, EXIT_OK
from sae_lens_vision_steer.core.errors import MissingInputError
from sae_lens_vision_steer.core.identity import model_fingerprint, model_identity
from sae_lens_vision_steer.sae.match import check_sae_matches_model, find_recorded_model
from sae_lens_vision_steer.sae.metadata import portable_metadata, training_metadata

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-clip-tinyimagenet"
HOOK = "blocks.3.hook_resid_post"  # the small CLIP: 4 blocks of width 128


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A checkout-like folder: `main/assets/tiny-clip-tinyimagenet`, `main/notebooks`; cwd = `main`."""
    root = tmp_path / "main"
    shutil.copytree(ASSET, root / "assets" / ASSET.name, ignore=shutil.ignore_patterns("*.md", "training.json"))
    (root / "notebooks").mkdir()
    monkeypatch.chdir(root)
    return root


def _sae_trained_on(model: HookedCLIP) -> torch.nn.Module:
    """An SAE whose metadata is what `train` records for a cache made with `model`."""
    sae = make_topk_sae(hook=HOOK, d_in=model.cfg.d_model)
    request = {**model_identity(model), "model_fingerprint": model_fingerprint(model), "positions": "cls",
               "dataset": "imagefolder:x", "split": "train"}
    for k, v in training_metadata(request, HOOK, "topk", [0.0] * model.cfg.d_model).items():
        setattr(sae.cfg.metadata, k, v)
    return sae


def test_an_sae_is_accepted_on_any_path_to_the_same_weights(repo, monkeypatch):
    sae = _sae_trained_on(HookedCLIP.from_pretrained("local-dir:assets/tiny-clip-tinyimagenet"))
    assert sae.cfg.metadata.model_name == "local-dir:tiny-clip-tinyimagenet"  # no path recorded as the name
    monkeypatch.chdir(repo / "notebooks")
    for name in ("local-dir:../assets/tiny-clip-tinyimagenet", f"local-dir:{repo}/assets/tiny-clip-tinyimagenet"):
        model = HookedCLIP.from_pretrained(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # same weights: not even a warning
            check_sae_matches_model(sae, model)
    # published metadata (no local paths) still identifies the weights; a copy of the folder elsewhere works
    published = make_topk_sae(hook=HOOK, d_in=128)
    for k, v in portable_metadata(dict(sae.cfg.metadata.__dict__)).items():
        setattr(published.cfg.metadata, k, v)
    assert "model_dir" not in portable_metadata(dict(sae.cfg.metadata.__dict__))
    shutil.copytree(repo / "assets" / "tiny-clip-tinyimagenet", repo / "elsewhere" / "my-copy")
    check_sae_matches_model(published, HookedCLIP.from_pretrained(f"local-dir:{repo}/elsewhere/my-copy"))


def test_other_weights_warn_and_another_architecture_is_refused(repo):
    model = HookedCLIP.from_pretrained("local-dir:assets/tiny-clip-tinyimagenet")
    sae = _sae_trained_on(model)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(0.01)  # in place: the fingerprint follows the weights
    with pytest.warns(UserWarning, match="other weights"):
        check_sae_matches_model(sae, model)
    torch.manual_seed(0)
    other = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, embed_dim=32,
                                       vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                                       text_cfg=dict(context_length=16, width=32, heads=2, layers=1))
    with pytest.raises(ValueError, match="different model.*n_layers 4 .this model: 2.*d_model 128"):
        check_sae_matches_model(sae, other)


def _save(sae, path: Path) -> Path:
    sae.save_model(str(path))
    return path


def test_eval_finds_the_recorded_model_from_another_directory(repo, tmp_path, monkeypatch, capsys):
    sae = _sae_trained_on(HookedCLIP.from_pretrained("local-dir:assets/tiny-clip-tinyimagenet"))
    sae.cfg.metadata.model_name = "local-dir:assets/tiny-clip-tinyimagenet"  # as recorded before this change
    del sae.cfg.metadata.model_dir
    _save(sae, repo / "runs" / "demo" / "sae")
    imgs = write_image_folder(tmp_path / "imgs" / "val", 2, 2, size=32).parent
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", "imagefolder", "--data-dir", str(imgs), "--methods", "zeroshot,vs2", "--num-workers", "0",
              "--no-plots", "--no-progress", "--device", "cpu"]
    assert main(["eval", "--sae", "main/runs/demo/sae", *common, "--out", "e1"]) == EXIT_OK
    printed = capsys.readouterr().out
    assert f"using model local-dir:{repo}/assets/tiny-clip-tinyimagenet" in printed
    assert "None" not in printed  # was "using weights None" and ".../None" (issue 22 item 8)
    res = json.loads((tmp_path / "e1" / "results.json").read_text())
    assert res["config"]["model_fingerprint"] == sae.cfg.metadata.model_fingerprint
    assert res["config"]["model"] == "local-dir:tiny-clip-tinyimagenet"
    # another path to the same folder, given with --model: accepted (was "different model", exit 2)
    assert main(["eval", "--sae", "main/runs/demo/sae", "--model", "local-dir:main/assets/tiny-clip-tinyimagenet",
                 *common, "--out", "e2"]) == EXIT_OK
    # the folder moved away: one line, where it looked, and the flag to pass
    shutil.move(repo / "assets", tmp_path / "moved")
    capsys.readouterr()
    assert main(["eval", "--sae", "main/runs/demo/sae", *common, "--out", "e3"]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "local-dir:tiny-clip-tinyimagenet" in err and "looked for" in err and "--model local-dir:PATH" in err


def test_find_recorded_model_prefers_the_recorded_folder(repo, tmp_path, monkeypatch):
    model = HookedCLIP.from_pretrained("local-dir:assets/tiny-clip-tinyimagenet")
    meta = model_identity(model)
    assert meta["model_dir"] == str(repo / "assets" / "tiny-clip-tinyimagenet")
    monkeypatch.chdir(tmp_path)
    assert find_recorded_model(meta) == f"local-dir:{repo}/assets/tiny-clip-tinyimagenet"
    assert find_recorded_model({"model_name": "ViT-B-32"}) == "ViT-B-32"  # names that carry no folder: as recorded
    with pytest.raises(MissingInputError, match="no folder of that model was found"):
        find_recorded_model({"model_name": "local-dir:nowhere-to-be-found"}, tmp_path / "runs" / "sae")
