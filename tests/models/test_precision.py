"""Backbone precision (`--precision`): bf16 autocast on the CPU agrees with fp32 within a stated tolerance,
caches record the precision (a cache made in another precision is refused, naming the field), fp16 on a CPU
runs as bf16 with a line saying so, and a cache of a newer format version is refused naming the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_image_folder

from sae_lens_vision_steer.activation_cache import (
    ActivationStore,
    CacheMismatchError,
    CorruptCacheError,
    cache_activations,
)
from sae_lens_vision_steer.core.errors import UsageError
from sae_lens_vision_steer.core.precision import resolve_precision
from sae_lens_vision_steer.data.base import ImageFolderDataset
from sae_lens_vision_steer.zeroshot.classifier import ZeroShotClassifier

HOOK = "blocks.1.hook_resid_post"
# Stated tolerances for bf16 against fp32 (bf16 keeps 8 significant bits: ~0.4% per rounding).
EMBED_REL_TOL = 0.02  # relative L2 error of the image embeddings and of cached activations
AGREEMENT = 0.95  # fraction of images with the same zero-shot top-1 prediction


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_resolve_precision():
    assert resolve_precision("bf16", "cpu") == ("bf16", None)
    assert resolve_precision("fp32", "cpu") == ("fp32", None)
    p, note = resolve_precision("fp16", "cpu")
    assert p == "bf16" and "bf16" in note
    with pytest.raises(UsageError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")


@pytest.fixture
def model(tiny_clip):
    yield tiny_clip.eval()
    tiny_clip.set_precision("fp32")  # the session's model, as it was


def test_bf16_predictions_agree_with_fp32(model):
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    classifier = ZeroShotClassifier(model, [f"thing {i}" for i in range(10)], "single", show_progress=False)
    with torch.no_grad():
        e32 = model.encode_image(x)
        _, c32 = model.run_with_cache(x, names_filter=[HOOK])
        model.set_precision("bf16")
        e16 = model.encode_image(x)
        _, c16 = model.run_with_cache(x, names_filter=[HOOK])
        model.set_precision("fp32")
        assert torch.equal(model.encode_image(x), e32)  # back to fp32: bit for bit
    assert e16.dtype == torch.float32 and c16[HOOK].dtype == torch.bfloat16  # hooks see the autocast dtype
    assert 0 < _rel(e16, e32) < EMBED_REL_TOL  # really computed in bf16, and close
    assert 0 < _rel(c16[HOOK], c32[HOOK]) < EMBED_REL_TOL
    p32, p16 = classifier.logits(e32).argmax(1), classifier.logits(e16).argmax(1)
    assert float((p32 == p16).float().mean()) >= AGREEMENT


def test_cache_records_precision_and_refuses_another(model, tmp_path):
    ds = ImageFolderDataset(write_image_folder(tmp_path / "img", n_classes=2, per_class=3), "all", model.preprocess)
    ref = cache_activations(model, ds, HOOK, tmp_path / "fp32", num_workers=0, show_progress=False, dtype="float32")
    model.set_precision("bf16")
    c = cache_activations(model, ds, HOOK, tmp_path / "bf16", num_workers=0, show_progress=False, dtype="float32")
    assert c.metadata["request"]["precision"] == "bf16" and ref.metadata["request"]["precision"] == "fp32"
    assert c.metadata["format_version"] == 2
    assert 0 < _rel(c.load(HOOK), ref.load(HOOK)) < EMBED_REL_TOL
    model.set_precision("fp32")
    with pytest.raises(CacheMismatchError, match="precision: cache has 'bf16', request has 'fp32'"):
        cache_activations(model, ds, HOOK, tmp_path / "bf16", num_workers=0, show_progress=False, dtype="float32")
    # A cache written before the field existed (format 1) was computed in fp32: reused as such.
    meta_path = tmp_path / "fp32" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["request"]["precision"]
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    again = cache_activations(model, ds, HOOK, tmp_path / "fp32", num_workers=0, show_progress=False, dtype="float32")
    np.testing.assert_array_equal(again.load(HOOK).numpy(), ref.load(HOOK).numpy())
    # A newer format than this reader's is refused, naming the field and what it added.
    meta["format_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CorruptCacheError, match="format_version 3, newer than this reader's 2"):
        ActivationStore.open(tmp_path / "fp32")


def test_cli_fp16_on_cpu_runs_as_bf16(tmp_path, capsys):
    from conftest import TINY_CLIP_KWARGS

    from sae_lens_vision_steer.cli import main

    write_image_folder(tmp_path / "img", n_classes=2, per_class=2)
    rc = main(["cache", "--random-weights", "--model-kwargs", json.dumps(TINY_CLIP_KWARGS), "--device", "cpu",
               "--precision", "fp16", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "img"),
               "--split", "all", "--num-workers", "0", "--out", str(tmp_path / "cache"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "--precision fp16: fp16 autocast is not available on the CPU" in out
    assert "computed in bf16" in out
    assert ActivationStore.open(tmp_path / "cache").metadata["request"]["precision"] == "bf16"
