"""Every registered model family: the hooked forward equals the library's own forward (<= 1e-5), TL's
hooks and shapes are the same, the pooled token is the family's, and unsupported models are refused.
Tiny random configs, built offline; one real repo layout per transformers family loads offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import timm
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from transformers import (
    CLIPConfig,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipModel,
)

from sae_lens_vision_steer import HookedCLIP, VS2Steering
from sae_lens_vision_steer.models.registry import UnsupportedModelError

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
TIMM = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)


def hf_clip():
    return CLIPModel(CLIPConfig(vision_config=dict(TINY, image_size=32, patch_size=8),
                                text_config=dict(TINY, max_position_embeddings=16), projection_dim=32))


def hf_siglip():
    return SiglipModel(SiglipConfig(vision_config=dict(TINY, image_size=32, patch_size=8),
                                    text_config=dict(TINY, vocab_size=100)))


def hf_dinov2():
    return Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14, layerscale_value=0.5))


def open_clip_timm_map():  # an open_clip timm tower with SigLIP's attention-pool head
    return open_clip.create_model("ViT-B-16-SigLIP", pretrained=None, embed_dim=192,
                                  vision_cfg=dict(image_size=224, timm_model_name="vit_tiny_patch16_224",
                                                  timm_pool="map", timm_proj="none"),
                                  text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1,
                                                hf_tokenizer_name=None, no_causal_mask=True, pool_type="last"))


FAMILIES = {  # name -> (builder, family, pooling, has CLS)
    "hf_clip": (hf_clip, "hf_clip", "cls", True),
    "hf_siglip": (hf_siglip, "hf_clip", "map", False),
    "hf_dinov2": (hf_dinov2, "hf_dinov2", "cls", True),
    "timm_siglip": (lambda: timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="map", **TIMM),
                    "timm_vit", "map", False),
    "timm_dinov2_reg": (lambda: timm.create_model("vit_tiny_patch16_224", reg_tokens=4, init_values=0.5,
                                                  global_pool="token", **TIMM), "timm_vit", "cls", True),
    "timm_qknorm": (lambda: timm.create_model("vit_tiny_patch16_224", qk_norm=True, global_pool="token", **TIMM),
                    "timm_vit", "cls", True),
    "open_clip_timm": (open_clip_timm_map, "open_clip_timm_vit", "map", True),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request):
    builder, family, pooling, has_cls = FAMILIES[request.param]
    torch.manual_seed(0)
    model = HookedCLIP(builder().eval())
    size = model.cfg.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return request.param, model, x, (family, pooling, has_cls)


def test_hooked_forward_equals_the_library(built):
    name, model, x, (family, pooling, has_cls) = built
    assert (model.cfg.family, model.cfg.pooling, model.cfg.has_cls_token) == (family, pooling, has_cls)
    with torch.no_grad():
        ref = model.library_encode_image(x)
        torch.testing.assert_close(model.encode_image(x), ref, atol=1e-5, rtol=0)
        # the explicit attention and LN paths (what caching uses) give the same embedding
        out, cache = model.run_with_cache(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    T, H = model.cfg.n_tokens, model.cfg.n_heads
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, H, T, T)
    assert cache["blocks.1.attn.hook_z"].shape == (2, T, H, model.cfg.d_head)
    assert cache["blocks.1.mlp.hook_post"].shape == (2, T, model.cfg.d_mlp)
    parts = cache.decompose_resid()  # TL's own decomposition sums to the residual stream
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    torch.testing.assert_close(parts.sum(0), cache[final], atol=1e-5, rtol=0)
    pooled = model.pooled_hook
    assert pooled == ("hook_ln_post" if pooling == "cls" else "hook_pooled")
    assert cache[pooled].shape == (2, model.cfg.d_model)
    with torch.no_grad():  # the embedding is the projection of the pooled token
        torch.testing.assert_close(model.head_unhooked(cache[pooled]) if pooling != "cls" else
                                   model.head_unhooked(cache[final]), ref, atol=1e-5, rtol=0)


def test_head_ablation_changes_the_output(built):
    _, model, x, _ = built

    def zero(z, hook):
        return torch.zeros_like(z)

    with torch.no_grad():
        clean = model(x)
        ablated = model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_z", zero)])
    assert (ablated - clean).abs().max() > 1e-4


def test_vs2_steers_the_familys_pooled_token(built):
    name, model, x, (_, pooling, has_cls) = built
    hook = model.steer_hook
    assert hook == (f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" if pooling == "cls" else "hook_pooled")
    torch.manual_seed(3)
    cfg = TopKSAEConfig(d_in=model.cfg.d_model, d_sae=128, k=4)
    cfg.metadata.hook_name = hook
    sae = TopKSAE(cfg).requires_grad_(False)
    steer = VS2Steering(sae, lam=2.0, gamma=1.5)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=[hook])
        tok = cache[hook] if cache[hook].ndim == 2 else cache[hook][:, 0]
        code = sae.encode(tok)
        v = 0.5 * code @ sae.W_dec
        expected_tok = (tok + 2.0 * v) * tok.norm(dim=-1, keepdim=True) / (tok + 2.0 * v).norm(dim=-1, keepdim=True)
        steered = model.run_with_hooks(x, fwd_hooks=steer.fwd_hooks(model))
        expected = model.head_unhooked(expected_tok)
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=0)
    if not has_cls:  # `cls` at a block hook of a model without a CLS token is refused, naming hook_pooled
        cfg2 = TopKSAEConfig(d_in=model.cfg.d_model, d_sae=128, k=4)
        cfg2.metadata.hook_name = "blocks.1.hook_resid_post"
        with pytest.raises(ValueError, match="no CLS token.*hook_pooled"):
            VS2Steering(TopKSAE(cfg2), lam=2.0, gamma=1.5).fwd_hooks(model)


def test_sae_of_another_family_is_refused():
    torch.manual_seed(0)
    a = HookedCLIP(hf_dinov2().eval())
    cfg = TopKSAEConfig(d_in=64, d_sae=128, k=4)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    cfg.metadata.model_config = {"family": "open_clip_vit"}
    with pytest.raises(ValueError, match="model family 'open_clip_vit'"):
        a.add_sae(TopKSAE(cfg))


def test_image_only_backbones_refuse_text():
    model = HookedCLIP(hf_dinov2().eval())
    assert not model.has_text
    with pytest.raises(ValueError, match="image-only backbone"):
        model.tokenize(["a photo of a dog."])


@pytest.mark.slow  # an offline-Hub load or an accuracy check on real images (the slow tier)
def test_unsupported_models_are_refused_before_download(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))
    for name, match in (("EVA02-B-16", "Eva ViT"), ("PE-Core-B-16", "Eva ViT"), ("RN50", "ResNet"),
                        ("timm:eva02_base_patch16_clip_224", "Eva ViT")):
        with pytest.raises(UnsupportedModelError, match=match):
            HookedCLIP.from_pretrained(name, pretrained=None)
    with pytest.raises(TypeError, match="fc_norm"):  # a timm ViT that norms after mean pooling
        HookedCLIP(timm.create_model("vit_tiny_patch16_224", global_pool="avg", class_token=False, **TIMM))


OFFLINE_SCRIPT = r"""
import sys, torch
from sae_lens_vision_steer import HookedCLIP
x = torch.load(sys.argv[1])
out = {}
for name in ("hf:openai/clip-vit-base-patch32", "hf:facebook/dinov2-base"):
    m = HookedCLIP.from_pretrained(name)
    with torch.no_grad():
        out[name] = (m.encode_image(x if "clip" in name else x[..., :28, :28]),
                     m.library_encode_image(x if "clip" in name else x[..., :28, :28]), m.cfg.family)
torch.save(out, sys.argv[2])
"""


@pytest.mark.slow  # an offline-Hub load or an accuracy check on real images (the slow tier)
def test_transformers_repos_load_offline_from_the_hf_cache(tmp_path):
    """Replicas of `openai/clip-vit-base-patch32` and `facebook/dinov2-base` (their file names and config
    schema, tiny random values) in a temporary HF cache, loaded with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hf"
    for repo, model in (("openai/clip-vit-base-patch32", hf_clip()), ("facebook/dinov2-base", hf_dinov2())):
        snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("a" * 40)
        model.save_pretrained(snap)  # config.json + model.safetensors, as in the real repos
        assert {"config.json", "model.safetensors"} <= {p.name for p in snap.iterdir()}
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    for name, family in (("hf:openai/clip-vit-base-patch32", "hf_clip"), ("hf:facebook/dinov2-base", "hf_dinov2")):
        ours, theirs, fam = got[name]
        assert fam == family
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.slow  # builds every open_clip config on the meta device (~12 s quiet): the slow tier
def test_support_table_is_current():
    """docs/support.md is generated from the registry (python scripts/build_support_table.py)."""
    from pathlib import Path

    from sae_lens_vision_steer.models.support import markdown, open_clip_rows

    doc = Path(__file__).resolve().parents[2] / "docs" / "support.md"
    assert doc.read_text() == markdown(), "docs/support.md is stale: run python scripts/build_support_table.py"
    rows = {(m, t): s for m, t, s in open_clip_rows()}
    assert rows[("ViT-B-32", "openai")] == "yes" and rows[("ViT-B-16-SigLIP", "webli")] == "yes"
    assert "ResNet" in rows[("RN50", "openai")]


OFFLINE_TAGS_SCRIPT = r"""
import json, sys, torch
from sae_lens_vision_steer import HookedCLIP
kwargs = json.loads(sys.argv[1])
x = torch.load(sys.argv[2])
siglip = HookedCLIP.from_pretrained("ViT-B-16-SigLIP", pretrained="webli", **kwargs)
dino = HookedCLIP.from_pretrained("timm:vit_small_patch14_dinov2", pretrained="lvd142m", depth=2, img_size=98)
with torch.no_grad():
    out = {"siglip": (siglip.encode_image(x), siglip.cfg.family, siglip.cfg.pooling),
           "dino": (dino.encode_image(x[..., :98, :98]), dino.cfg.family, dino.cfg.pooling)}
torch.save(out, sys.argv[3])
"""


@pytest.mark.slow  # an offline-Hub load or an accuracy check on real images (the slow tier)
def test_open_clip_timm_tag_and_timm_pretrained_load_offline(tmp_path):
    """The real tag paths of `ViT-B-16-SigLIP` + `webli` (open_clip: `timm/ViT-B-16-SigLIP`,
    `open_clip_model.safetensors`) and `timm:vit_small_patch14_dinov2` (timm:
    `timm/vit_small_patch14_dinov2.lvd142m`, `model.safetensors`), from replicas with random values of
    shrunk towers, with HF_HUB_OFFLINE=1. The references load the same files by hand."""
    from safetensors.torch import save_file

    assert open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli")["hf_hub"] == "timm/ViT-B-16-SigLIP/"
    torch.manual_seed(0)
    siglip_ref = open_clip_timm_map().eval()
    dino_ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, num_classes=0).eval()
    cache = tmp_path / "hf"
    for repo, file, sd in (("timm/ViT-B-16-SigLIP", "open_clip_model.safetensors", siglip_ref.state_dict()),
                           ("timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors", dino_ref.state_dict())):
        snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / ("b" * 40)
        snap.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(snap / file))
        (snap.parents[1] / "refs").mkdir()
        (snap.parents[1] / "refs" / "main").write_text("b" * 40)
    kwargs = dict(embed_dim=192, vision_cfg=dict(image_size=224, timm_model_name="vit_tiny_patch16_224",
                                                 timm_pool="map", timm_proj="none"),
                  text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=1, hf_tokenizer_name=None,
                                no_causal_mask=True, pool_type="last"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_TAGS_SCRIPT, json.dumps(kwargs), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        siglip_expected = siglip_ref.encode_image(x)
        dino_model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=98,
                                       num_classes=0).eval()
        sd = dino_ref.state_dict()
        from timm.models.vision_transformer import checkpoint_filter_fn

        dino_model.load_state_dict(checkpoint_filter_fn(sd, dino_model))  # timm's own pos-embed resampling
        dino_expected = dino_model(x[..., :98, :98])
    assert got["siglip"][1:] == ("open_clip_timm_vit", "map") and got["dino"][1:] == ("timm_vit", "cls")
    torch.testing.assert_close(got["siglip"][0], siglip_expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["dino"][0], dino_expected, atol=1e-5, rtol=0)
