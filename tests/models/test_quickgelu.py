"""The pretrained tag decides the activation: `ViT-B-32` + `openai` is built with QuickGELU.

The real tag path runs offline: a replica of the weights repo open_clip resolves for the tag
(`timm/vit_base_patch32_clip_224.openai`, file `open_clip_model.safetensors`, random values of a
shrunk tower) in a temporary HF cache, with `HF_HUB_OFFLINE=1`, in a subprocess so that
huggingface_hub reads the environment at import. open_clip is not mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from conftest import TINY_CLIP_KWARGS
from safetensors.torch import save_file

REPO = "timm/vit_base_patch32_clip_224.openai"
FILE = "open_clip_model.safetensors"

SCRIPT = r"""
import json, sys, warnings
import open_clip, torch
from sae_lens_vision_steer import HookedCLIP
kwargs = json.loads(sys.argv[1])
x = torch.load(sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plain = HookedCLIP.from_pretrained("ViT-B-32", pretrained="openai", **kwargs)
    quick = HookedCLIP.from_pretrained("ViT-B-32-quickgelu", pretrained="openai", **kwargs)
mismatch = [str(w.message) for w in caught if "QuickGELU mismatch" in str(w.message)]
with torch.no_grad():
    torch.save({"plain": plain.encode_image(x), "quick": quick.encode_image(x),
                "act": [plain.cfg.act_fn, quick.cfg.act_fn], "mismatch": mismatch}, sys.argv[3])
"""


@pytest.mark.slow  # an offline-Hub load or an accuracy check on real images (the slow tier)
def test_openai_tag_builds_quick_gelu_offline(tmp_path):
    assert open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"] == REPO + "/"
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, **TINY_CLIP_KWARGS).eval()
    commit = "f" * 40
    repo_dir = tmp_path / "hf" / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / FILE))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"),
           "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY_CLIP_KWARGS), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    assert got["act"] == ["quick_gelu", "quick_gelu"] and got["mismatch"] == []
    torch.testing.assert_close(got["plain"], got["quick"], atol=0, rtol=0)  # one network
    with torch.no_grad():
        expected = reference.encode_image(x)  # the replica's weights in open_clip's QuickGELU model
        gelu = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP_KWARGS).eval()
        gelu.load_state_dict(reference.state_dict())
        wrong = gelu.encode_image(x)  # what open_clip alone builds for "ViT-B-32" + "openai"
    torch.testing.assert_close(got["plain"], expected, atol=1e-5, rtol=0)
    assert (wrong - expected).abs().max() > 1e-4  # the activation matters: the test can fail


def test_tags_without_quick_gelu_keep_gelu():
    from sae_lens_vision_steer.models.families.open_clip_vit import tag_wants_quick_gelu

    assert tag_wants_quick_gelu("ViT-B-32", "openai") and tag_wants_quick_gelu("ViT-L-14", "openai")
    assert not tag_wants_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")
    assert not tag_wants_quick_gelu("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)
    assert not tag_wants_quick_gelu("ViT-B-32", None)
