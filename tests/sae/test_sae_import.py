"""`load_vision_sae` on other libraries' files: format detection, bad input refused with the reason, and an
imported SAE spliced into HookedCLIP like one of ours. The files here are replicas written by hand in each
library's layout (no library needed); tests/sae/test_sae_formats.py compares with the libraries themselves."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_clip
from saes import write_sparsify
from safetensors.torch import save_file

from sae_lens_vision_steer.core.errors import InputError, UnknownNameError, UsageError
from sae_lens_vision_steer.sae.formats import ImportOptions
from sae_lens_vision_steer.sae.loading import load_vision_sae
from sae_lens_vision_steer.steering.vs2 import VS2Steering

D, M, K = 64, 128, 4  # D = the tiny CLIP's width; M, K as saes.write_sparsify
HOOK = "blocks.1.hook_resid_post"


def by_hand(x: torch.Tensor, w: dict) -> torch.Tensor:
    """sparsify's encoder: top-k of relu(encoder(x - b_dec))."""
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def test_unknown_and_undetectable_formats_list_the_supported_ones(tmp_path):
    listed = "unknown SAE format 'nope'.*saelens.*sparsify.*prisma.*visaebench.*saev.*overcomplete"
    with pytest.raises(UnknownNameError, match=listed):
        load_vision_sae(tmp_path, format="nope")
    (tmp_path / "notes.txt").write_text("no SAE here")
    with pytest.raises(FileNotFoundError, match="no SAE of a known format.*supported: saelens"):
        load_vision_sae(tmp_path)


def test_shapes_that_contradict_the_config_are_named(tmp_path):
    weights = write_sparsify(tmp_path / "layers.1")
    weights["W_dec"] = weights["W_dec"][:, :-2].contiguous()
    save_file(weights, str(tmp_path / "layers.1" / "sae.safetensors"))
    with pytest.raises(InputError, match=r"W_dec has shape \[128, 62\], the config implies \[128, 64\]"):
        load_vision_sae(tmp_path / "layers.1")


def test_several_saes_need_an_id_and_a_wrong_id_lists_them(tmp_path):
    write_sparsify(tmp_path / "layers.0")
    write_sparsify(tmp_path / "layers.1", seed=1)
    with pytest.raises(ValueError, match="several SAEs"):
        load_vision_sae(tmp_path)
    with pytest.raises(FileNotFoundError, match="layers.0"):
        load_vision_sae(tmp_path, "layers.7")
    with pytest.raises(ValueError, match="several SAEs"):
        load_vision_sae(tmp_path, format="sparsify")
    write_sparsify(tmp_path / "one" / "run" / "layers.1", seed=2)
    _, info = load_vision_sae(tmp_path / "one", format="sparsify")  # a given format also finds its one SAE
    assert info.sae_id == "run/layers.1" and info.format == "sparsify"
    _, info = load_vision_sae(tmp_path, "layers.0")
    assert info.sae_id == "layers.0" and info.hook_name == "blocks.0.hook_resid_post"


def test_a_hook_the_files_do_not_name_must_be_given(tmp_path):
    write_sparsify(tmp_path / "model.embed")
    with pytest.raises(UsageError, match="pass hook_name.*hookpoint is 'model.embed'"):
        load_vision_sae(tmp_path / "model.embed")
    with pytest.raises(UsageError, match="positions must be one of"):
        load_vision_sae(tmp_path / "model.embed", options=ImportOptions(hook_name=HOOK, positions="middle"))
    with pytest.raises(UsageError, match="input_norm applies to .*saev.*visaebench.*not to 'sparsify'"):
        load_vision_sae(tmp_path / "model.embed", options=ImportOptions(hook_name=HOOK, input_norm="none"))


@torch.no_grad()
def test_imported_cls_sae_splices_at_cls_only_and_steers(tmp_path):
    weights = write_sparsify(tmp_path / "layers.1")
    model = make_tiny_clip()
    sae, info = load_vision_sae(tmp_path / "layers.1",
                                options=ImportOptions(model_name="ViT-B-32", pretrained=None, positions="cls"))
    assert info.hook_name == HOOK and info.positions == "cls"
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    _, clean = model.run_with_cache(images, names_filter=HOOK)
    _, cache = model.run_with_cache_with_saes(images, saes=[sae], use_error_term=True)
    acts = cache[HOOK + ".hook_sae_acts_post"]
    assert acts.shape == (3, 1, M)  # the CLS token only
    torch.testing.assert_close(acts[:, 0], by_hand(clean[HOOK][:, 0], weights), atol=1e-5, rtol=0)
    # VS2 with the imported SAE: at the hook, the CLS token becomes x + lam (gamma - 1) W_dec c, rescaled to |x|.
    steer = VS2Steering(sae, lam=2.0, gamma=1.5)
    seen = {}
    with model.hooks(fwd_hooks=steer.fwd_hooks(model) + [(HOOK, lambda a, hook: seen.setdefault("x", a.clone()))]):
        model.encode_image(images)
    x = clean[HOOK][:, 0]
    v = x + 2.0 * 0.5 * (by_hand(x, weights) @ weights["W_dec"])
    torch.testing.assert_close(seen["x"][:, 0], v * x.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(seen["x"][:, 1:], clean[HOOK][:, 1:])  # patches untouched


def test_imported_sae_for_another_width_or_model_is_refused(tmp_path):
    model = make_tiny_clip()
    write_sparsify(tmp_path / "narrow" / "layers.1", d_in=32)
    sae, _ = load_vision_sae(tmp_path / "narrow" / "layers.1")
    with pytest.raises(ValueError, match="d_in=32 does not match hook 'blocks.1.hook_resid_post'"):
        model.add_sae(sae)
    write_sparsify(tmp_path / "other" / "layers.1")
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model": "openai/clip-vit-large-patch14"}))
    sae, info = load_vision_sae(tmp_path / "other" / "layers.1")
    assert info.model_name == "hf:openai/clip-vit-large-patch14"
    with pytest.raises(ValueError, match="different model.*hf:openai/clip-vit-large-patch14"):
        model.add_sae(sae)
