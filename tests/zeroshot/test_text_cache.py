"""The on-disk cache of zero-shot class weights: hits skip the text tower, mismatches are refused and rebuilt."""

import json
import logging

import pytest
import torch
from conftest import TINY_CLIP_KWARGS, make_tiny_clip

import sae_lens_vision_steer.zeroshot.classifier as zeroshot_mod
from sae_lens_vision_steer import ZeroShotClassifier
from sae_lens_vision_steer.cli import main
from sae_lens_vision_steer.zeroshot.text_cache import default_text_cache_dir

NAMES = ["cat", "dog", "owl"]


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    real = ZeroShotClassifier.build_class_weights

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ZeroShotClassifier, "build_class_weights", staticmethod(counting))
    return calls


def test_second_classifier_reads_the_cache(tiny_clip, tmp_path, count_encodes):
    plain = ZeroShotClassifier(tiny_clip, NAMES, "cifar", show_progress=False)
    first = ZeroShotClassifier(tiny_clip, NAMES, "cifar", show_progress=False, text_cache=tmp_path)
    second = ZeroShotClassifier(tiny_clip, NAMES, "cifar", show_progress=False, text_cache=tmp_path)
    assert (plain.text_cache_status, first.text_cache_status, second.text_cache_status) == ("off", "built", "hit")
    assert len(count_encodes) == 2  # plain and first; the second never ran the text tower
    assert second.text_cache_path == first.text_cache_path and first.text_cache_path.parent == tmp_path
    assert first.text_cache_path.name.startswith("ViT-B-32-none-cifar-")
    assert torch.equal(second.weights_EC, plain.weights_EC)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
    # other classes or another template set: their own files, the first one kept
    other = ZeroShotClassifier(tiny_clip, NAMES[:2], "cifar", show_progress=False, text_cache=tmp_path)
    single = ZeroShotClassifier(tiny_clip, NAMES, "single", show_progress=False, text_cache=tmp_path)
    custom = ZeroShotClassifier(tiny_clip, NAMES, ["a {}"], show_progress=False, text_cache=tmp_path)
    assert {other.text_cache_status, single.text_cache_status, custom.text_cache_status} == {"built"}
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert ZeroShotClassifier(tiny_clip, NAMES, "cifar", show_progress=False, text_cache=tmp_path).text_cache_status == "hit"


def test_another_model_of_the_same_name_is_refused_and_rebuilt(tiny_clip, tmp_path, caplog):
    ZeroShotClassifier(tiny_clip, NAMES, "single", show_progress=False, text_cache=tmp_path)
    other = make_tiny_clip(seed=1)  # same name, tag and kwargs: the same slot, other weights
    with caplog.at_level(logging.WARNING, logger="sae_lens_vision_steer.zeroshot.text_cache"):
        clf = ZeroShotClassifier(other, NAMES, "single", show_progress=False, text_cache=tmp_path)
    assert clf.text_cache_status == "rebuilt"
    (msg,) = [r.getMessage() for r in caplog.records if r.name == "sae_lens_vision_steer.zeroshot.text_cache"]
    assert "refused" in msg and "model_fingerprint" in msg and "\n" not in msg
    expected = ZeroShotClassifier.build_class_weights(other, NAMES, ["a photo of a {}."], show_progress=False)
    torch.testing.assert_close(clf.weights_EC, expected)
    assert not torch.allclose(clf.weights_EC, ZeroShotClassifier(tiny_clip, NAMES, "single", show_progress=False).weights_EC)
    # the slot now holds the second model's weights: reading it back for that model is a hit
    assert ZeroShotClassifier(other, NAMES, "single", show_progress=False, text_cache=tmp_path).text_cache_status == "hit"


def test_other_template_strings_under_the_same_name_are_refused(tiny_clip, tmp_path, monkeypatch, caplog):
    ZeroShotClassifier(tiny_clip, NAMES, "single", show_progress=False, text_cache=tmp_path)
    monkeypatch.setattr(zeroshot_mod, "templates_for", lambda name: ["a blurry photo of a {}."])  # the set changed
    with caplog.at_level(logging.WARNING, logger="sae_lens_vision_steer.zeroshot.text_cache"):
        clf = ZeroShotClassifier(tiny_clip, NAMES, "single", show_progress=False, text_cache=tmp_path)
    assert clf.text_cache_status == "rebuilt" and "templates" in caplog.text
    expected = ZeroShotClassifier.build_class_weights(tiny_clip, NAMES, ["a blurry photo of a {}."], show_progress=False)
    torch.testing.assert_close(clf.weights_EC, expected)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_file_is_refused_and_rebuilt(tiny_clip, tmp_path, damage, caplog):
    clf = ZeroShotClassifier(tiny_clip, NAMES, "single", show_progress=False, text_cache=tmp_path)
    path, data = clf.text_cache_path, bytearray(clf.text_cache_path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-5] ^= 0xFF  # a bit flip inside the tensor bytes: only the sha256 sees it
        path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="sae_lens_vision_steer.zeroshot.text_cache"):
        again = ZeroShotClassifier(tiny_clip, NAMES, "single", show_progress=False, text_cache=tmp_path)
    assert again.text_cache_status == "rebuilt" and "refused" in caplog.text
    torch.testing.assert_close(again.weights_EC, clf.weights_EC)


def test_default_dir_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VISION_STEER_TEXT_CACHE", str(tmp_path / "tc"))
    assert default_text_cache_dir() == tmp_path / "tc"
    monkeypatch.setenv("VISION_STEER_TEXT_CACHE", "off")
    assert default_text_cache_dir() is None
    monkeypatch.delenv("VISION_STEER_TEXT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_text_cache_dir() == tmp_path / "xdg" / "sae_lens_vision_steer" / "text"


def test_cli_second_run_hits_and_flags_override(tmp_path, tiny_imagenet_dir, monkeypatch):
    base = ["zeroshot", "--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--dataset", "tiny-imagenet",
            "--data-dir", str(tiny_imagenet_dir), "--limit", "8", "--num-workers", "0", "--device", "cpu",
            "--templates", "single", "--no-progress"]
    monkeypatch.setenv("VISION_STEER_TEXT_CACHE", str(tmp_path / "env"))
    status = []
    for i, extra in enumerate([[], [], ["--text-cache", str(tmp_path / "flag")], ["--no-text-cache"]]):
        out = tmp_path / f"zs{i}.json"
        assert main([*base, *extra, "--out", str(out)]) == 0
        status.append(json.loads(out.read_text())["text_cache"])
    assert status == ["built", "hit", "built", "off"]
    assert len(list((tmp_path / "env").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "flag").glob("*.safetensors"))) == 1
