import open_clip
import pytest
import torch
from conftest import TINY_CLIP_KWARGS

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.models.hooked import BLOCK_HOOKS


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def test_encode_image_matches_open_clip(tiny_clip, images):
    with torch.no_grad():
        ours = tiny_clip.encode_image(images)
        theirs = tiny_clip.clip.encode_image(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny_clip.encode_image(images, normalize=True).norm(dim=-1), torch.ones(3))


def test_wrapping_existing_model_matches(images):
    torch.manual_seed(3)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP_KWARGS)
    model = HookedCLIP(clip)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), clip.encode_image(images), atol=1e-5, rtol=0)
    assert model.preprocess is not None and model.tokenizer is not None
    tokens = model.tokenize(["a photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), clip.encode_text(tokens))


def test_cfg(tiny_clip):
    cfg = tiny_clip.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.embed_dim, cfg.n_tokens, cfg.image_size) == (2, 64, 32, 17, 32)


def test_run_with_cache_shapes_every_hook(tiny_clip, images):
    _, cache = tiny_clip.run_with_cache(images)
    B, T, D, H, K, M = 3, 17, 64, 2, 32, 256
    expected = {"hook_patch_embed": (B, T - 1, D), "ln_pre.hook_scale": (B, T, 1), "ln_pre.hook_normalized": (B, T, D),
                "hook_embed": (B, T, D), "ln_final.hook_scale": (B, T, 1), "ln_final.hook_normalized": (B, T, D),
                "hook_ln_post": (B, D), "hook_image_embed": (B, 32)}
    for i in range(2):
        for h in BLOCK_HOOKS:
            expected[f"blocks.{i}.{h}"] = (B, T, D)
        for ln in ("ln1", "ln2"):
            expected[f"blocks.{i}.{ln}.hook_scale"] = (B, T, 1)
            expected[f"blocks.{i}.{ln}.hook_normalized"] = (B, T, D)
        for h in ("q", "k", "v", "z"):
            expected[f"blocks.{i}.attn.hook_{h}"] = (B, T, H, K)
        for h in ("attn_scores", "pattern"):
            expected[f"blocks.{i}.attn.hook_{h}"] = (B, H, T, T)
        for h in ("pre", "post"):
            expected[f"blocks.{i}.mlp.hook_{h}"] = (B, T, M)
    assert {k: tuple(v.shape) for k, v in cache.items()} == expected  # no hook_result unless use_attn_result
    # the residual stream decomposes as TransformerLens defines it
    b = "blocks.1."
    torch.testing.assert_close(cache[b + "hook_resid_mid"], cache[b + "hook_resid_pre"] + cache[b + "hook_attn_out"])
    torch.testing.assert_close(cache[b + "hook_resid_post"], cache[b + "hook_resid_mid"] + cache[b + "hook_mlp_out"])
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    # hook_embed is ln_pre's output, the start of the residual stream
    torch.testing.assert_close(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    v = tiny_clip.visual
    torch.testing.assert_close(cache["hook_patch_embed"], v.conv1(images).flatten(2).transpose(1, 2))
    # ln hooks: TL's LayerNorm written out
    x = cache[b + "hook_resid_pre"]
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + v.transformer.resblocks[1].ln_1.eps).sqrt()
    torch.testing.assert_close(cache[b + "ln1.hook_scale"], scale)
    torch.testing.assert_close(cache[b + "ln1.hook_normalized"], centred / scale)
    # MLP hooks: open_clip's c_fc and activation
    mlp = v.transformer.resblocks[1].mlp
    ln2_out = v.transformer.resblocks[1].ln_2(cache[b + "hook_resid_mid"])
    torch.testing.assert_close(cache[b + "mlp.hook_pre"], mlp.c_fc(ln2_out))
    torch.testing.assert_close(cache[b + "mlp.hook_post"], mlp.gelu(mlp.c_fc(ln2_out)))
    # hook_ln_post is the CLS token after ln_post; the image embed is its projection
    torch.testing.assert_close(cache["hook_ln_post"], v.ln_post(cache[b + "hook_resid_post"][:, 0]))
    torch.testing.assert_close(cache["hook_image_embed"], cache["hook_ln_post"] @ v.proj)


def test_stop_at_layer_stops_early(tiny_clip, images):
    seen = []
    hooks = [(f"blocks.{i}.hook_resid_post", lambda t, hook: seen.append(hook.name)) for i in range(2)]
    with tiny_clip.hooks(fwd_hooks=hooks):
        out, cache = tiny_clip.run_with_cache(images, stop_at_layer=1, names_filter="blocks.0.hook_resid_post")
    assert seen == ["blocks.0.hook_resid_post"]  # block 1 never ran
    assert list(cache.keys()) == ["blocks.0.hook_resid_post"]
    torch.testing.assert_close(out, cache["blocks.0.hook_resid_post"])
    _, full = tiny_clip.run_with_cache(images)
    torch.testing.assert_close(out, full["blocks.0.hook_resid_post"])


def test_hooks_context_changes_output_and_is_removed(tiny_clip, images):
    with torch.no_grad():
        before = tiny_clip.encode_image(images)

        def zero_cls(t, hook):
            t = t.clone()
            t[:, 0] = 0
            return t

        with tiny_clip.hooks(fwd_hooks=[("blocks.1.hook_resid_post", zero_cls)]):
            steered = tiny_clip.encode_image(images)
        after = tiny_clip.encode_image(images)
        # an independent computation of what zeroing the final CLS gives: ln_post(0) @ proj
        zeros = torch.zeros(3, tiny_clip.cfg.d_model)
        expected = tiny_clip.visual.ln_post(zeros) @ tiny_clip.visual.proj
    torch.testing.assert_close(steered, expected)
    assert not torch.allclose(steered, before)
    torch.testing.assert_close(after, before)
    assert all(len(hp.fwd_hooks) == 0 for hp in tiny_clip.hook_points())


def test_run_with_hooks_and_add_hook(tiny_clip, images):
    calls = []
    tiny_clip.run_with_hooks(images, fwd_hooks=[("hook_embed", lambda t, hook: calls.append(t.shape))])
    assert calls == [torch.Size([3, 17, 64])]
    tiny_clip.add_hook("hook_ln_post", lambda t, hook: calls.append("ln"))
    try:
        tiny_clip(images)
    finally:
        tiny_clip.reset_hooks()
    tiny_clip(images)
    assert calls[-1] == "ln" and calls.count("ln") == 1


def test_unknown_hook_name_lists_valid_names(tiny_clip, images):
    with pytest.raises(KeyError, match="blocks.1.hook_resid_post"):
        tiny_clip.run_with_hooks(images, fwd_hooks=[("blocks.1.hook_resid_pst", lambda t, hook: t)])
    with pytest.raises(KeyError, match="Valid hook names"):
        tiny_clip.add_hook("blocks.7.hook_resid_post", lambda t, hook: t)


def test_non_vit_tower_is_refused():
    clip = open_clip.create_model("RN50", pretrained=None, embed_dim=32,
                                  vision_cfg=dict(image_size=32, layers=[1, 1, 1, 1], width=8),
                                  text_cfg=dict(context_length=16, width=32, heads=2, layers=1))
    with pytest.raises(TypeError, match="no model family handles a CLIP; supported: open_clip_vit"):
        HookedCLIP(clip)


@pytest.mark.parametrize("name", ["RN50", "convnext_base"])
def test_unsupported_towers_are_refused_from_the_config_before_download(name, monkeypatch):
    import huggingface_hub

    def no_download(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    with pytest.raises(TypeError, match=r"ResNet|ConvNeXt|convnext") as err:
        HookedCLIP.from_pretrained(name, pretrained="openai" if name == "RN50" else "laion400m_s13b_b51k")
    assert "Supported families" in str(err.value) and "Nearest supported" in str(err.value)


@pytest.mark.parametrize("name", ["ViT-B-16-quickgelu", "ViT-L-14"])
def test_other_vit_configs_match(name, images):
    # Same tower structure as the full models, shrunk so the test stays fast.
    torch.manual_seed(0)
    kwargs = dict(TINY_CLIP_KWARGS, vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=3, head_width=32))
    model = HookedCLIP.from_pretrained(name, pretrained=None, **kwargs)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), model.clip.encode_image(images), atol=1e-5, rtol=0)
    assert model.cfg.n_tokens == 5


def test_encode_text_trimmed_equals_open_clip():
    torch.manual_seed(0)
    model = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, embed_dim=32,
                                       vision_cfg=TINY_CLIP_KWARGS["vision_cfg"],
                                       text_cfg=dict(context_length=77, width=32, heads=2, layers=2))
    tokens = model.tokenize(["a photo of a cat.", "a very blurry black and white photo of the big dog."])
    assert tokens.shape[1] == 77
    with torch.no_grad():
        ours = model.encode_text(tokens, normalize=True)
        theirs = model.clip.encode_text(tokens, normalize=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
