"""Issue 22 items 3, 4 and 8: a new user's mistakes end in one line with a hint and the documented exit code,
quickly (nothing is downloaded first), and `--version` answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import TINY_CLIP_KWARGS

from sae_lens_vision_steer._version import __version__
from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.cli.common import EXIT_INPUT, EXIT_USAGE

TINY = ["--random-weights", "--seed", "0", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu"]


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("vision-steer")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No Hub and an empty HF cache: anything that tried to download would fail (or retry) here."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    _empty_library_caches(tmp_path, monkeypatch)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: set it as the variable would


def _empty_library_caches(tmp_path, monkeypatch) -> None:
    """huggingface_hub read its cache folder at import: point it at an empty one too."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


@pytest.mark.parametrize("flags, needles", [
    (["--model", "ViT-B-23", "--pretrained", "openai"], ["unknown open_clip model 'ViT-B-23'", "ViT-B-32"]),
    (["--model", "ViT-B-32", "--pretrained", "openia"], ["unknown pretrained tag 'openia'", "openai"]),
    (["--model", "ViT-B-32", "--pretrained", "no/such/ckpt.pt"], ["checkpoint file no/such/ckpt.pt", "--pretrained"]),
])
def test_a_typo_in_a_model_name_or_tag_is_one_line_with_the_nearest_names(offline, tmp_path, capsys, flags, needles):
    t0 = time.perf_counter()
    rc = main(["zeroshot", *flags, "--dataset", "imagefolder", "--data-dir", str(tmp_path), "--device", "cpu",
               "--out", str(tmp_path / "zs.json")])
    line = _one_line(capsys.readouterr().err)
    assert rc == (EXIT_INPUT if "ckpt" in flags[-1] else EXIT_USAGE)
    for needle in needles:
        assert needle in line
    assert line.count(",") < 12  # three names, not open_clip's list of ~150
    assert time.perf_counter() - t0 < 10


def test_pretrained_weights_not_cached_offline_are_one_line(offline, tmp_path, capsys):
    rc = main(["zeroshot", "--model", "ViT-B-32", "--pretrained", "openai", "--dataset", "imagefolder",
               "--data-dir", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "zs.json")])
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_INPUT and "ViT-B-32/openai" in line and "not in the Hugging Face cache" in line
    assert "--random-weights" in line


def test_eval_without_a_model_or_an_sae_asks_for_one(offline, tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["eval", "--dataset", "imagefolder", "--data-dir", str(tmp_path), "--methods", "zeroshot",
                 "--device", "cpu", "--out", str(tmp_path / "e")]) == EXIT_USAGE
    line = _one_line(capsys.readouterr().err)
    assert "--sae" in line and "--model" in line
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "e").exists()


@pytest.mark.parametrize("dataset, hint", [("tiny-imagenet", "tiny-imagenet-200"), ("cub200", "imagefolder")])
def test_a_forgotten_data_dir_offline_says_so_at_once(offline, tmp_path, capsys, dataset, hint):
    t0 = time.perf_counter()  # ViT-L/14 takes many seconds to build: the data are checked before the model
    rc = main(["zeroshot", "--model", "ViT-L-14", "--random-weights", "--device", "cpu", "--dataset", dataset,
               "--out", str(tmp_path / "zs.json")])
    line = _one_line(capsys.readouterr().err)
    assert rc == EXIT_INPUT, line
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert "--data-dir" in line and hint in line
    assert time.perf_counter() - t0 < 3  # was 42 s of retries, then exit 5


def test_a_union_member_without_its_folder_is_named(offline, tmp_path):
    from sae_lens_vision_steer.core.errors import MissingInputError
    from sae_lens_vision_steer.data import check_data_available

    check_data_available("tiny-imagenet,cifar100", f"tiny-imagenet={tmp_path},cifar100={tmp_path}")  # both local
    with pytest.raises(MissingInputError, match=r"cifar100 \(uoft-cs/cifar100\).*--data-dir"):
        check_data_available("tiny-imagenet,cifar100", f"tiny-imagenet={tmp_path}")


def test_an_unreachable_hub_is_detected_without_the_offline_setting(tmp_path, monkeypatch):
    from sae_lens_vision_steer.core.errors import MissingInputError
    from sae_lens_vision_steer.data.hub_access import check_hub_dataset_available, hub_reachable

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _empty_library_caches(tmp_path, monkeypatch)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    assert not hub_reachable()
    with pytest.raises(MissingInputError, match="unreachable.*--data-dir"):
        check_hub_dataset_available("cifar100", "uoft-cs/cifar100")
    (tmp_path / "hf" / "hub" / "datasets--uoft-cs--cifar100" / "snapshots").mkdir(parents=True)
    check_hub_dataset_available("cifar100", "uoft-cs/cifar100")  # in the cache: datasets reads it offline


def test_version():
    out = subprocess.run([sys.executable, "-m", "sae_lens_vision_steer", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"vision-steer {__version__}"
