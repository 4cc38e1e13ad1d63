"""VS2 steering and the reconstruction baselines, checked against formulas written out here and
against no-hook paths (cached activations pushed through `model.head`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sae_lens import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
)
from saes import FINAL, D, K, S, make_topk_sae  # noqa: F401  (shared with other tests)

from sae_lens_vision_steer.steering import (
    SAEReconstruction,
    VS2Steering,
    fvu_threshold_from_reference,
    per_sample_fvu,
    sae_reconstruct,
    vs2_apply,
    vs2_steer,
)


def topk_code_by_hand(x: torch.Tensor, sae: TopKSAE) -> torch.Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals.relu())


def vs2_by_hand(x: torch.Tensor, sae: TopKSAE, lam: float, gamma: float, preserve_norm: bool = True) -> torch.Tensor:
    v = (gamma - 1) * (topk_code_by_hand(x, sae) @ sae.W_dec)  # W_dec is [d_sae, d_in]
    out = x + lam * v
    return out * x.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True) if preserve_norm else out


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- the pure function
@pytest.mark.parametrize("preserve_norm", [True, False])
def test_vs2_matches_formula(preserve_norm):
    sae = make_topk_sae()
    x = 2 * torch.randn(10, D)
    got = vs2_steer(x, sae, lam=2.1, gamma=1.5, preserve_norm=preserve_norm)
    want = vs2_by_hand(x, sae, 2.1, 1.5, preserve_norm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - x).norm() > 0.1  # it does steer
    if preserve_norm:
        torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))


def test_vs2_works_on_leading_dims():
    sae = make_topk_sae()
    x = torch.randn(3, 5, D)
    torch.testing.assert_close(vs2_steer(x, sae), vs2_by_hand(x.reshape(15, D), sae, 2.1, 1.5).reshape(3, 5, D),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", ["topk_rescaled", "standard", "jumprelu"])
def test_vs2_is_decoder_difference_for_other_architectures(make):
    """v = D(gamma c) - D(c) for any affine-decoder SAE (bias cancels, decoder-norm rescale kept)."""
    torch.manual_seed(0)
    if make == "topk_rescaled":
        sae = make_topk_sae(rescale=True)
    elif make == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=S)).requires_grad_(False)
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=S)).requires_grad_(False)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D))
    x = torch.randn(7, D)
    c = sae.encode(x)
    lam, gamma = 1.7, 2.0
    want = x + lam * (sae.decode(gamma * c) - sae.decode(c))
    torch.testing.assert_close(vs2_steer(x, sae, lam, gamma, preserve_norm=False), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lam,gamma", [(0.0, 1.5), (2.1, 1.0)])
def test_no_op_settings_leave_tokens_unchanged(lam, gamma):
    sae = make_topk_sae()
    x = torch.randn(8, D)
    torch.testing.assert_close(vs2_steer(x, sae, lam, gamma), x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_settings_rejected(bad):
    sae = make_topk_sae()
    with pytest.raises(ValueError, match="gamma"):
        vs2_steer(torch.randn(2, D), sae, 2.0, bad)
    with pytest.raises(ValueError, match="lam"):
        vs2_steer(torch.randn(2, D), sae, bad, 1.5)
    with pytest.raises(ValueError, match="lam"):
        VS2Steering(sae, lam=bad)
    with pytest.raises(ValueError, match="gamma"):
        VS2Steering(sae, gamma=bad)


# ---------------------------------------------------------------------------------- FVU and the gate
def test_per_sample_fvu_formula_and_mean():
    sae = make_topk_sae()
    x = torch.randn(12, D)
    mu = torch.tensor(sae.cfg.metadata.activation_mean)
    rec = sae.decode(topk_code_by_hand(x, sae))
    want = ((x - rec) ** 2).sum(-1) / ((x - mu) ** 2).sum(-1)
    torch.testing.assert_close(per_sample_fvu(x, sae), want, atol=1e-5, rtol=1e-5)
    other = torch.randn(D)
    torch.testing.assert_close(per_sample_fvu(x, sae, mean=other), ((x - rec) ** 2).sum(-1) / ((x - other) ** 2).sum(-1),
                               atol=1e-5, rtol=1e-5)


def test_per_sample_fvu_warns_without_recorded_mean():
    sae = make_topk_sae(mean=False)
    x = torch.randn(4, D)
    with pytest.warns(UserWarning, match="activation_mean"):
        fvu = per_sample_fvu(x, sae)
    rec = sae(x)
    torch.testing.assert_close(fvu, ((x - rec) ** 2).sum(-1) / ((x - sae.b_dec) ** 2).sum(-1))


def test_gate_extremes_and_median():
    sae = make_topk_sae()
    x = torch.randn(40, D)
    none = vs2_apply(x, sae, fvu_threshold=0.0)
    assert none.coverage == 0.0 and torch.equal(none.steered, x)
    every = vs2_apply(x, sae, fvu_threshold=math.inf)
    assert every.coverage == 1.0
    torch.testing.assert_close(every.steered, vs2_steer(x, sae))
    fvu = per_sample_fvu(x, sae)
    tau = float(fvu.median())
    half = vs2_apply(x, sae, fvu_threshold=tau)
    expect_mask = fvu <= tau
    assert torch.equal(half.steered_mask, expect_mask) and 0 < half.coverage < 1
    torch.testing.assert_close(half.steered[expect_mask], vs2_steer(x, sae)[expect_mask])
    assert torch.equal(half.steered[~expect_mask], x[~expect_mask])


def test_threshold_from_reference_is_quantile_of_fvu():
    sae = make_topk_sae()
    ref = torch.randn(300, D)
    fvu = per_sample_fvu(ref, sae).numpy()
    for q in (0.5, 0.9, 0.99):
        assert fvu_threshold_from_reference(sae, ref, q, batch_size=64) == pytest.approx(np.quantile(fvu, q), rel=1e-6)
    with pytest.raises(ValueError, match="quantile"):
        fvu_threshold_from_reference(sae, ref, 1.5)
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        fvu_threshold_from_reference(sae, torch.randn(5, 32), 0.9)


# ---------------------------------------------------------------------------------- hooks on the model
def final_cls(model, x: torch.Tensor) -> torch.Tensor:
    return model(x, stop_at_layer=model.cfg.n_layers)[:, 0]


@torch.no_grad()
def test_hook_path_equals_pure_function_on_cached_tokens(tiny_clip):
    sae = make_topk_sae()
    x = images()
    want = tiny_clip.head(vs2_steer(final_cls(tiny_clip, x), sae))
    plain = tiny_clip.encode_image(x)
    steer = VS2Steering(sae)
    with tiny_clip.hooks(fwd_hooks=steer.fwd_hooks(tiny_clip)):
        got = tiny_clip.encode_image(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # steering changed the embedding
    assert steer.coverage == 1.0
    # run_with_hooks and add_hook give the same
    torch.testing.assert_close(tiny_clip.run_with_hooks(x, fwd_hooks=steer.fwd_hooks()), want, atol=1e-5, rtol=1e-5)
    for name, fn in steer.fwd_hooks():
        tiny_clip.add_hook(name, fn)
    try:
        torch.testing.assert_close(tiny_clip.encode_image(x), want, atol=1e-5, rtol=1e-5)
    finally:
        tiny_clip.reset_hooks()
    torch.testing.assert_close(tiny_clip.encode_image(x), plain)  # hooks are gone


@torch.no_grad()
def test_hook_gate_coverage_matches_fvu_of_clean_tokens(tiny_clip):
    sae = make_topk_sae()
    x = images(16)
    cls = final_cls(tiny_clip, x)
    fvu = per_sample_fvu(cls, sae)
    tau = float(fvu.median())
    steer = VS2Steering(sae, fvu_threshold=tau)
    with tiny_clip.hooks(fwd_hooks=steer.fwd_hooks()):
        got = tiny_clip.encode_image(x)
    mask = fvu <= tau
    assert steer.coverage == pytest.approx(mask.float().mean().item())
    want = tiny_clip.head(torch.where(mask[:, None], vs2_steer(cls, sae), cls))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # running totals over two calls
    with tiny_clip.hooks(fwd_hooks=steer.fwd_hooks()):
        tiny_clip.encode_image(x[:5])
    assert steer.coverage == pytest.approx(mask[:5].float().mean().item())
    assert steer.total_coverage == pytest.approx((mask.sum() + mask[:5].sum()).item() / 21)
    for tau_, cov in ((0.0, 0.0), (math.inf, 1.0)):
        s = VS2Steering(sae, fvu_threshold=tau_)
        with tiny_clip.hooks(fwd_hooks=s.fwd_hooks()):
            out = tiny_clip.encode_image(x)
        assert s.coverage == cov
        if tau_ == 0.0:
            torch.testing.assert_close(out, tiny_clip.encode_image(x))


@torch.no_grad()
@pytest.mark.parametrize("positions", ["cls", "patches", "all", [0, 3, 7]])
def test_only_chosen_positions_change(tiny_clip, positions):
    hook = "blocks.0.hook_resid_post"
    sae = make_topk_sae(hook=hook)
    x = images(3)
    _, clean = tiny_clip.run_with_cache(x, names_filter=hook)
    steer = VS2Steering(sae, positions=positions)
    with tiny_clip.hooks(fwd_hooks=steer.fwd_hooks(tiny_clip)):  # the cache hook runs after the steering hook
        _, steered = tiny_clip.run_with_cache(x, names_filter=[hook, "blocks.1.hook_resid_pre"])
    before, after = clean[hook], steered[hook]
    n_tok = before.shape[1]
    named = {"cls": [0], "patches": list(range(1, n_tok)), "all": list(range(n_tok))}
    chosen = named[positions] if isinstance(positions, str) else positions
    other = [t for t in range(n_tok) if t not in chosen]
    assert torch.equal(after[:, other], before[:, other])
    torch.testing.assert_close(after[:, chosen], vs2_steer(before[:, chosen], sae), atol=1e-5, rtol=1e-5)
    assert (after[:, chosen] - before[:, chosen]).abs().max() > 1e-3
    torch.testing.assert_close(steered["blocks.1.hook_resid_pre"], after)  # the next block sees the steered stream


@torch.no_grad()
def test_last_n_steers_each_layer_with_its_own_sae(tiny_clip):
    saes = [make_topk_sae(hook=f"blocks.{i}.hook_resid_post", seed=10 + i) for i in range(2)]
    x = images(4)
    steer = VS2Steering.last_n(saes, model=tiny_clip, lam=1.5, gamma=2.0)
    assert steer.hook_names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with tiny_clip.hooks(fwd_hooks=steer.fwd_hooks()):
        got = tiny_clip.encode_image(x)
    r = tiny_clip(x, stop_at_layer=1).clone()
    r[:, 0] = vs2_steer(r[:, 0], saes[0], 1.5, 2.0)
    r = tiny_clip.run_blocks(r, 1)
    want = tiny_clip.head(vs2_steer(r[:, 0], saes[1], 1.5, 2.0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert set(steer.coverage_by_hook.values()) == {1.0}
    # unrecorded hooks get the last-n names; a recorded mismatch is an error
    bare = [make_topk_sae(hook=None, seed=3)]
    assert VS2Steering.last_n(bare, model=tiny_clip).hook_names == [FINAL]
    with pytest.raises(ValueError, match="last_n"):
        VS2Steering.last_n([make_topk_sae(hook="blocks.0.hook_resid_post")], model=tiny_clip)


# ---------------------------------------------------------------------------------- errors
def test_errors(tiny_clip):
    with pytest.raises(ValueError, match="d_in=32"):
        VS2Steering(make_topk_sae(d_in=32)).fwd_hooks(tiny_clip)
    with pytest.raises(KeyError, match="unknown hook name"):
        VS2Steering(make_topk_sae(hook="blocks.7.hook_resid_post")).validate(tiny_clip)
    with pytest.raises(KeyError, match="unknown hook name"):  # unbound hooks fail when enabled
        with tiny_clip.hooks(fwd_hooks=VS2Steering(make_topk_sae(hook="blocks.1.resid_post")).fwd_hooks()):
            pass
    with pytest.raises(ValueError, match="hook_name"):
        VS2Steering(make_topk_sae(hook=None))
    assert VS2Steering(make_topk_sae(hook=None), hook_name=FINAL).hook_names == [FINAL]
    with pytest.raises(ValueError, match="positions"):
        VS2Steering(make_topk_sae(), positions="middle")
    with pytest.raises(ValueError, match="normalize_activations"):
        sae = make_topk_sae()
        sae.cfg.normalize_activations = "layer_norm"
        VS2Steering(sae)


# ---------------------------------------------------------------------------------- baselines
@torch.no_grad()
def test_reconstruction_baselines_match_no_hook_path(tiny_clip):
    sae = make_topk_sae()
    x = images(5)
    cls = final_cls(tiny_clip, x)
    for gamma in (1.0, 1.5):
        rec = SAEReconstruction(sae, gamma=gamma)
        with tiny_clip.hooks(fwd_hooks=rec.fwd_hooks(tiny_clip)):
            got = tiny_clip.encode_image(x)
        by_hand = (gamma * topk_code_by_hand(cls, sae)) @ sae.W_dec + sae.b_dec
        torch.testing.assert_close(sae_reconstruct(cls, sae, gamma), by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, tiny_clip.head(by_hand), atol=1e-5, rtol=1e-5)
        assert rec.coverage == 1.0
    # SAE-rec all: each layer's CLS replaced, in order
    saes = [make_topk_sae(hook=f"blocks.{i}.hook_resid_post", seed=20 + i) for i in range(2)]
    rec_all = SAEReconstruction(saes)
    with tiny_clip.hooks(fwd_hooks=rec_all.fwd_hooks(tiny_clip)):
        got = tiny_clip.encode_image(x)
    r = tiny_clip(x, stop_at_layer=1).clone()
    r[:, 0] = saes[0](r[:, 0])
    want = tiny_clip.head(saes[1](tiny_clip.run_blocks(r, 1)[:, 0]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_threshold_from_reference_cache(tmp_path, tiny_clip):
    from conftest import write_image_folder

    from sae_lens_vision_steer.activation_cache import (
        ActivationStore,
        cache_activations,
    )
    from sae_lens_vision_steer.data import load_image_dataset

    data = load_image_dataset("imagefolder", data_dir=write_image_folder(tmp_path / "imgs"), transform=tiny_clip.preprocess)
    cache_activations(tiny_clip, data, FINAL, tmp_path / "cache", dtype="float32", num_workers=0, show_progress=False)
    sae = make_topk_sae()
    acts = ActivationStore.open(tmp_path / "cache").load(FINAL)
    fvu = per_sample_fvu(acts, sae).numpy()
    assert len(fvu) == len(data) == 12
    assert fvu_threshold_from_reference(sae, tmp_path / "cache", 0.75) == pytest.approx(np.quantile(fvu, 0.75), rel=1e-5)
