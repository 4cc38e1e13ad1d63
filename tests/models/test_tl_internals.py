"""Attention internals, TL weights, exactness and TransformerLens' own utilities on HookedCLIP.

References are written out here from open_clip's parameters (`reference_forward`), independent of
the hooked components."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLIP_KWARGS
from transformer_lens import ActivationCache, HookedTransformerConfig
from transformer_lens import patching as tl_patching

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.models.patching import get_act_patch_resid_pre


@pytest.fixture(scope="module")
def model() -> HookedCLIP:
    torch.manual_seed(0)
    # layer scale on, so that ls_1/ls_2 are exercised too
    kwargs = dict(TINY_CLIP_KWARGS, vision_cfg=dict(TINY_CLIP_KWARGS["vision_cfg"], ls_init_value=0.5))
    return HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, **kwargs)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference_forward(clip, images, head_mask=None, pattern_fn=None) -> torch.Tensor:
    """open_clip's image tower written out from its parameters: explicit softmax attention per head.
    `head_mask[(layer, head)] = 0` ablates a head's z; `pattern_fn(layer, pattern)` edits patterns."""
    v = clip.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    for layer, blk in enumerate(v.transformer.resblocks):
        B, T, D = x.shape
        H = blk.attn.num_heads
        K = D // H
        h = blk.ln_1(x)
        qkv = h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
        q, k, val = (t.reshape(B, T, H, K).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        pattern = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(K), dim=-1)
        if pattern_fn is not None:
            pattern = pattern_fn(layer, pattern)
        z = pattern @ val  # [B, H, T, K]
        for (l, hd), m in (head_mask or {}).items():
            if l == layer:
                z[:, hd] = z[:, hd] * m
        attn = z.transpose(1, 2).reshape(B, T, D) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        x = x + blk.ls_1(attn)
        x = x + blk.ls_2(blk.mlp.c_proj(blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(x)))))
    return v.ln_post(x[:, 0]) @ v.proj


def test_reference_is_open_clip(model, images):
    with torch.no_grad():
        torch.testing.assert_close(reference_forward(model.clip, images), model.clip.encode_image(images),
                                   atol=1e-5, rtol=0)


def test_exact_with_and_without_pattern_hooks(model, images):
    with torch.no_grad():
        theirs = model.clip.encode_image(images)
        torch.testing.assert_close(model.encode_image(images), theirs, atol=1e-5, rtol=0)
        hooks = [(f"blocks.{i}.attn.hook_pattern", lambda t, hook: t) for i in range(2)]
        hooks += [("blocks.0.ln1.hook_scale", lambda t, hook: t)]
        with model.hooks(fwd_hooks=hooks):
            torch.testing.assert_close(model.encode_image(images), theirs, atol=1e-5, rtol=0)
        out, _ = model.run_with_cache(images)
        torch.testing.assert_close(out, theirs, atol=1e-5, rtol=0)


def test_fused_attention_unless_scores_or_pattern_are_hooked(model, images, monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(images)
        assert len(calls) == 2  # fused in both blocks
        model.run_with_hooks(images, fwd_hooks=[("blocks.1.attn.hook_z", lambda t, hook: t)])
        assert len(calls) == 4  # a hook on z needs no pattern
        model.run_with_hooks(images, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: t)])
        assert len(calls) == 5  # block 1 explicit, block 0 still fused
        model.run_with_cache(images, names_filter=lambda n: n.endswith("hook_attn_scores"))
        assert len(calls) == 5


def test_head_ablation_through_hook_z_equals_hand_written(model, images):
    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    with torch.no_grad():
        ours = model.run_with_hooks(images, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
        ref = reference_forward(model.clip, images, head_mask={(0, 1): 0.0})
        clean = model.clip.encode_image(images)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - clean).abs().max() > 1e-3


def test_editing_the_pattern_changes_the_output_as_written_out(model, images):
    def uniform(p, hook=None):
        return torch.full_like(p, 1.0 / p.shape[-1])

    with torch.no_grad():
        ours = model.run_with_hooks(images, fwd_hooks=[("blocks.1.attn.hook_pattern", uniform)])
        ref = reference_forward(model.clip, images, pattern_fn=lambda l, p: uniform(p) if l == 1 else p)
        clean = model.clip.encode_image(images)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours - clean).abs().max() > 1e-3


def test_weights_are_views_of_open_clip_parameters(model, images):
    attn, mha = model.blocks[0].attn, model.clip.visual.transformer.resblocks[0].attn
    H, D, K = 2, 64, 32
    assert attn.W_Q.shape == (H, D, K) and attn.W_O.shape == (H, K, D) and attn.b_Q.shape == (H, K)
    assert model.blocks[0].mlp.W_in.shape == (D, 256) and model.blocks[0].mlp.W_out.shape == (256, D)
    for view in (attn.W_Q, attn.W_K, attn.W_V, attn.b_V):
        assert view.untyped_storage().data_ptr() == mha.in_proj_weight.untyped_storage().data_ptr() or \
            view.untyped_storage().data_ptr() == mha.in_proj_bias.untyped_storage().data_ptr()
    assert attn.W_O.untyped_storage().data_ptr() == mha.out_proj.weight.untyped_storage().data_ptr()
    # TL's einsums with these weights give the cached q and z->attn_out
    _, cache = model.run_with_cache(images)
    x = cache["blocks.0.ln1.hook_normalized"] * model.blocks[0].ln1.w + model.blocks[0].ln1.b
    torch.testing.assert_close(torch.einsum("btd,hdk->bthk", x, attn.W_Q) + attn.b_Q, cache["blocks.0.attn.hook_q"],
                               atol=1e-5, rtol=0)
    z = cache["blocks.0.attn.hook_z"]
    gamma = model.clip.visual.transformer.resblocks[0].ls_1.gamma
    torch.testing.assert_close((torch.einsum("bthk,hkd->btd", z, attn.W_O) + attn.b_O) * gamma,
                               cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=0)


def test_attention_pattern_is_softmax_of_scores(model, images):
    _, cache = model.run_with_cache(images, names_filter=lambda n: n.startswith("blocks.0.attn"))
    q, k = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_k"]
    scores = torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(32)
    torch.testing.assert_close(cache["blocks.0.attn.hook_attn_scores"], scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(3, 2, 17))


# ------------------------------------------------------------------------------- TL cache semantics
def test_cfg_is_a_transformer_lens_config(model):
    cfg = model.cfg
    assert isinstance(cfg, HookedTransformerConfig)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_ctx) == (2, 64, 2, 32, 256, 17)
    assert cfg.normalization_type == "LN" and cfg.act_fn == "gelu" and cfg.device == "cpu"
    assert cfg.dtype == torch.float32 and cfg.n_tokens == 17 and cfg.embed_dim == 32


def test_run_with_cache_options(model, images):
    _, cache = model.run_with_cache(images)
    assert isinstance(cache, ActivationCache)
    _, d = model.run_with_cache(images, return_cache_object=False, names_filter=["hook_ln_post"])
    assert type(d) is dict and list(d) == ["hook_ln_post"]
    # pos_slice slices positions (TL keeps the dimension), never the batch of the pooled hooks
    _, sl = model.run_with_cache(images, pos_slice=0)
    assert sl["blocks.0.hook_resid_post"].shape == (3, 1, 64) and sl["hook_ln_post"].shape == (3, 64)
    assert sl["blocks.0.attn.hook_z"].shape == (3, 1, 2, 32)
    torch.testing.assert_close(sl["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"][:, :1])
    torch.testing.assert_close(sl["hook_ln_post"], cache["hook_ln_post"])
    # remove_batch_dim on one image, pooled hooks included
    _, one = model.run_with_cache(images[:1], remove_batch_dim=True)
    assert one["hook_ln_post"].shape == (64,) and one["hook_image_embed"].shape == (32,)
    assert one["blocks.1.attn.hook_pattern"].shape == (2, 17, 17) and not one.has_batch_dim
    torch.testing.assert_close(one["hook_image_embed"], cache["hook_image_embed"][0], atol=1e-5, rtol=0)


def test_incl_bwd_caches_gradients(model, images):
    _, cache = model.run_with_cache(images, incl_bwd=True, backward_fn=lambda e: e[:, 0].sum(),
                                    names_filter=["blocks.1.hook_resid_post", "hook_image_embed"])
    g = cache["hook_image_embed_grad"]
    expected = torch.zeros_like(g)
    expected[:, 0] = 1
    torch.testing.assert_close(g, expected)
    assert cache["blocks.1.hook_resid_post_grad"][:, 1:].abs().max() == 0  # only CLS reaches the head
    with pytest.raises(ValueError, match="backward_fn"):
        model.run_with_cache(images, incl_bwd=True)
    model.zero_grad(set_to_none=True)


def test_decompose_resid_and_stack_head_results(model, images):
    _, cache = model.run_with_cache(images)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    torch.testing.assert_close(parts.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    heads, head_labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert head_labels == ["L0H0", "L0H1", "L1H0", "L1H1"] and heads.shape == (4, 3, 17, 64)
    # per layer: heads + b_O, times layer scale, is attn_out
    for layer in range(2):
        gamma = model.clip.visual.transformer.resblocks[layer].ls_1.gamma
        recon = (heads[2 * layer:2 * layer + 2].sum(0) + model.blocks[layer].attn.b_O) * gamma
        torch.testing.assert_close(recon, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5, rtol=0)


def test_use_attn_result_hook(images):
    torch.manual_seed(0)
    m = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, use_attn_result=True, **TINY_CLIP_KWARGS)
    out, cache = m.run_with_cache(images)
    assert cache["blocks.0.attn.hook_result"].shape == (3, 17, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(out, m.clip.encode_image(images), atol=1e-5, rtol=0)


def test_logit_lens_with_apply_ln_to_stack(model, images):
    """accumulated_resid + apply_ln_to_stack at the CLS token, projected onto class-prompt directions:
    the last layer's lens equals the model's own zero-shot logits."""
    _, cache = model.run_with_cache(images)
    stack, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=0, return_labels=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
    normed = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=0)
    ln = model.ln_final
    with torch.no_grad():
        text = model.encode_text(model.tokenize(["a photo of a cat.", "a photo of a dog.", "a photo of a car."]),
                                 normalize=True)
        lens = (normed * ln.w + ln.b) @ model.visual.proj @ text.T  # [layers, batch, classes]
        logits = model.encode_image(images) @ text.T
    torch.testing.assert_close(lens[-1], logits, atol=1e-5, rtol=0)
    assert not torch.allclose(lens[0], logits, atol=1e-3)


def test_activation_patching_with_transformer_lens(model, images):
    """Two images that differ in one patch: patching resid_pre of that patch's token at layer 0 restores the
    clean output exactly; patching any other token there changes nothing."""
    clean = images[:1]
    corrupted = clean.clone()
    corrupted[:, :, 8:16, 0:8] = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    token = 1 + 1 * 4 + 0  # patch row 1, column 0 of the 4x4 grid, after CLS
    _, clean_cache = model.run_with_cache(clean)
    with torch.no_grad():
        clean_embed, corrupted_embed = model(clean), model(corrupted)

    def metric(embed):
        return (embed - corrupted_embed).norm() / (clean_embed - corrupted_embed).norm()

    result = get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (2, 17)
    torch.testing.assert_close(result[0, token], torch.tensor(1.0), atol=1e-4, rtol=0)
    others = torch.cat([result[0, :token], result[0, token + 1:]])
    assert others.abs().max() < 1e-4
    assert 0 < result[1].max() < 1.5  # layer 1: every position exists and was patched
    # TL's own function, given the index explicitly, agrees
    df = tl_patching.make_df_from_ranges([2, 17], ["layer", "pos"])
    flat = tl_patching.generic_activation_patch(model, corrupted, clean_cache, metric, tl_patching.layer_pos_patch_setter,
                                                "resid_pre", index_df=df)
    torch.testing.assert_close(flat.reshape(2, 17), result)


def test_non_square_images_and_patch_dropout_off_at_eval():
    torch.manual_seed(0)
    kwargs = dict(TINY_CLIP_KWARGS, vision_cfg=dict(TINY_CLIP_KWARGS["vision_cfg"], image_size=(32, 48),
                                                    patch_dropout=0.5))
    m = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, **kwargs)
    x = torch.randn(2, 3, 32, 48)
    assert m.cfg.n_tokens == 1 + 4 * 6 and m.cfg.image_size == (32, 48)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x), m.clip.encode_image(x), atol=1e-5, rtol=0)
        _, cache = m.run_with_cache(x)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 2, 25, 25)
