"""SAEs and transcoders spliced into HookedCLIP, checked against SAELens' semantics written out here:
with the error term the output is the clean output; without it, the reconstruction written out by hand
replaces the activation at the positions the SAE was trained on."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_clip
from sae_lens import TopKSAE, TopKSAEConfig, Transcoder, TranscoderConfig

from sae_lens_vision_steer import HookedCLIP, VS2Steering

D, S, K, T = 64, 128, 8, 17
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture()
def model() -> HookedCLIP:  # a fresh model per test: splices must not leak into the shared fixture
    return make_tiny_clip()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def make_sae(hook: str = HOOK, positions: str | None = "cls", seed: int = 0, **meta) -> TopKSAE:
    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=D, d_sae=S, k=K)
    cfg.metadata.hook_name = hook
    if positions:
        cfg.metadata.positions = positions
    for k, v in meta.items():
        setattr(cfg.metadata, k, v)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(0.3 * torch.randn(D))
        sae.b_enc.copy_(0.1 * torch.randn(S))
    return sae.requires_grad_(False)


def code_by_hand(x: torch.Tensor, sae: TopKSAE) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(K, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def rest_of_tower(model: HookedCLIP, resid_after_block0: torch.Tensor) -> torch.Tensor:
    """Block 1 and the head, from open_clip's own modules (no hooks involved)."""
    v = model.clip.visual
    x = v.transformer.resblocks[1](resid_after_block0)
    return v.ln_post(x[:, 0]) @ v.proj


def clean_block0(model, images):
    _, cache = model.run_with_cache(images, names_filter=HOOK)
    return cache[HOOK]


@torch.no_grad()
def test_error_term_gives_the_clean_output(model, images):
    clean = model.clip.encode_image(images)
    for positions in ("cls", "all"):
        out = model.run_with_saes(images, saes=[make_sae(positions=positions)], use_error_term=True)
        torch.testing.assert_close(out, clean, atol=1e-5, rtol=0)


@torch.no_grad()
def test_cls_sae_replaces_cls_only_by_the_reconstruction(model, images):
    sae = make_sae(positions="cls")
    resid = clean_block0(model, images)
    expected_resid = resid.clone()
    expected_resid[:, 0] = code_by_hand(resid[:, 0], sae) @ sae.W_dec + sae.b_dec
    expected = rest_of_tower(model, expected_resid)
    out, cache = model.run_with_cache_with_saes(images, saes=[sae])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out, model.clip.encode_image(images), atol=1e-3)
    # SAELens' cache keys; a CLS SAE holds only the CLS position
    acts = cache[HOOK + ".hook_sae_acts_post"]
    assert acts.shape == (4, 1, S)
    torch.testing.assert_close(acts[:, 0], code_by_hand(resid[:, 0], sae), atol=1e-5, rtol=0)
    for key in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_recons", "hook_sae_output"):
        assert HOOK + "." + key in cache.keys()
    # the hook point itself stays, sees the spliced output, and patch tokens pass through
    torch.testing.assert_close(cache[HOOK], expected_resid, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache[HOOK][:, 1:], resid[:, 1:])
    assert model.acts_to_saes == {}  # run_with_saes detached it again


@torch.no_grad()
def test_all_token_sae_and_token_mask(model, images):
    sae = make_sae(positions="all")
    resid = clean_block0(model, images)
    recon = code_by_hand(resid, sae) @ sae.W_dec + sae.b_dec
    mask = torch.zeros(T, dtype=torch.bool)
    mask[[0, 5]] = True  # bypass CLS and token 5
    model.add_sae(sae, token_mask=mask)
    try:
        out, cache = model.run_with_cache(images, names_filter=lambda n: n.startswith(HOOK))
    finally:
        model.reset_saes()
    expected_resid = torch.where(mask[:, None], resid, recon)
    torch.testing.assert_close(cache[HOOK], expected_resid, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, rest_of_tower(model, expected_resid), atol=1e-5, rtol=0)
    assert cache[HOOK + ".hook_sae_acts_post"].shape == (4, T, S)
    assert model.acts_to_saes == {} and HOOK + ".hook_sae_acts_post" not in model.hook_dict


@torch.no_grad()
def test_error_term_keeps_edits_to_latents(model, images):
    """SAELens: with the error term, an edit to the latents changes the output by exactly the decoded edit."""
    sae = make_sae(positions="cls")
    resid = clean_block0(model, images)

    def kill_latents(acts, hook):
        return torch.zeros_like(acts)

    model.add_sae(sae, use_error_term=True)
    try:
        out = model.run_with_hooks(images, fwd_hooks=[(HOOK + ".hook_sae_acts_post", kill_latents)])
    finally:
        model.reset_saes()
    code = code_by_hand(resid[:, 0], sae)
    expected_resid = resid.clone()
    expected_resid[:, 0] = resid[:, 0] - code @ sae.W_dec  # x - recon(x) + recon(0), recon(0) = b_dec
    torch.testing.assert_close(out, rest_of_tower(model, expected_resid), atol=1e-5, rtol=0)


@torch.no_grad()
def test_transcoder(model, images):
    torch.manual_seed(3)
    cfg = TranscoderConfig(d_in=D, d_sae=S, d_out=D, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized"
    cfg.metadata.hook_name_out = "blocks.1.hook_mlp_out"
    cfg.metadata.positions = "all"
    tc = Transcoder(cfg).requires_grad_(False)
    with torch.no_grad():
        tc.b_enc.copy_(0.1 * torch.randn(S))
    _, clean = model.run_with_cache(images)
    x_in = clean["blocks.1.ln2.hook_normalized"]
    pre = x_in @ tc.W_enc + tc.b_enc
    mlp_out = pre.relu() @ tc.W_dec + tc.b_dec
    resid = clean["blocks.1.hook_resid_mid"] + mlp_out
    v = model.clip.visual
    expected = v.ln_post(resid[:, 0]) @ v.proj
    out = model.run_with_saes(images, saes=[tc])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out_err = model.run_with_saes(images, saes=[tc], use_error_term=True)
    torch.testing.assert_close(out_err, model.clip.encode_image(images), atol=1e-5, rtol=0)
    assert model.acts_to_saes == {} and not model.hook_dict["blocks.1.ln2.hook_normalized"].fwd_hooks


@torch.no_grad()
def test_steering_composes_with_a_spliced_sae(model, images):
    steer = VS2Steering(make_sae(hook="blocks.1.hook_resid_post", seed=4), lam=2.0, gamma=1.5)
    alone = model.run_with_hooks(images, fwd_hooks=steer.fwd_hooks(model))
    # an SAE with the error term at the steered hook and one at another hook: the steering sees clean tokens
    with model.saes([make_sae(), make_sae(hook="blocks.1.hook_resid_post", seed=5)], use_error_term=True):
        both = model.run_with_hooks(images, fwd_hooks=steer.fwd_hooks(model))
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
    # without the error term, the steering acts on the reconstruction
    with model.saes([make_sae()]):
        on_recon = model.run_with_hooks(images, fwd_hooks=steer.fwd_hooks(model))
    assert not torch.allclose(on_recon, alone, atol=1e-3)


def test_saes_context_restores_the_previous_splice(model, images):
    first, second = make_sae(seed=0), make_sae(seed=1)
    model.add_sae(first)
    with model.saes([second]):
        assert model.acts_to_saes[HOOK] is second
    assert model.acts_to_saes[HOOK] is first
    model.reset_saes()
    assert model.acts_to_saes == {}
    assert not model.hook_dict[HOOK].fwd_hooks


def test_bad_requests_are_refused_and_nothing_is_attached(model):
    before = set(model.hook_dict)
    narrow_cfg = TopKSAEConfig(d_in=32, d_sae=S, k=K)
    narrow_cfg.metadata.hook_name = HOOK
    bad = [
        (make_sae(hook="blocks.0.hook_resid_pst"), {}, KeyError, "Did you mean"),
        (TopKSAE(narrow_cfg), {}, ValueError, "d_in=32"),
        (make_sae(positions="cls"), {"positions": "all"}, ValueError, "trained on 'cls'"),
        (make_sae(positions="patches"), {"positions": [0, 3]}, ValueError, "trained on 'patches'"),
        (make_sae(model_name="ViT-L-14"), {}, ValueError, "different model.*ViT-L-14"),
        (make_sae(act_fn="quick_gelu"), {}, ValueError, "activation 'quick_gelu'"),
    ]
    for sae, kwargs, exc, match in bad:
        with pytest.raises(exc, match=match):
            model.add_sae(sae, **kwargs)
        assert model.acts_to_saes == {} and set(model.hook_dict) == before
    cfg = TranscoderConfig(d_in=D, d_sae=S, d_out=D, apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = HOOK, "blocks.9.hook_mlp_out"
    with pytest.raises(KeyError, match="output hook 'blocks.9.hook_mlp_out'"):
        model.add_sae(Transcoder(cfg))
    with pytest.warns(UserWarning, match="weights 'openai'"):  # other weights of the same network: said, allowed
        model.add_sae(make_sae(pretrained="openai"))
    model.reset_saes()
    model.add_sae(make_sae())
    with pytest.raises(ValueError, match="already spliced"):
        model.add_sae(make_sae(seed=1))
    model.add_sae(make_sae(seed=1), replace=True)
    assert len(model.acts_to_saes) == 1
    model.reset_saes()
    # the recorded model check can be skipped on purpose
    model.add_sae(make_sae(model_name="ViT-L-14"), check_model=False)
    model.reset_saes()
    assert set(model.hook_dict) == before


def test_steering_refuses_an_sae_of_another_activation(model, images):
    steer = VS2Steering(make_sae(hook="blocks.1.hook_resid_post", act_fn="quick_gelu"), lam=2.0, gamma=1.5)
    with pytest.raises(ValueError, match="activation 'quick_gelu'"):
        steer.fwd_hooks(model)
