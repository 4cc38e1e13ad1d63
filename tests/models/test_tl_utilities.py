"""Issue 22 item 9: TransformerLens utilities that failed on HookedCLIP: `get_full_resid_decomposition`
(`accumulated_bias`), `logit_attrs` (class directions) and every by-position patching function (over all
tokens, not the image width). Checked against sums written out here from the model's own caches and
open_clip's parameters."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import TINY_CLIP_KWARGS
from transformer_lens import patching as tl_patching

from sae_lens_vision_steer import HookedCLIP
from sae_lens_vision_steer.models import patching


@pytest.fixture(scope="module")
def model() -> HookedCLIP:
    torch.manual_seed(0)
    m = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, **TINY_CLIP_KWARGS)
    with torch.no_grad():  # open_clip initialises these biases to zero: make them count
        for blk in m.clip.visual.transformer.resblocks:
            blk.attn.out_proj.bias.normal_(0, 0.5)
            blk.mlp.c_proj.bias.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_full_resid_decomposition_sums_to_the_residual_stream(model, images):
    _, cache = model.run_with_cache(images)
    L = model.cfg.n_layers
    targets = {(L, False): cache[f"blocks.{L - 1}.hook_resid_post"], (1, False): cache["blocks.1.hook_resid_pre"],
               (1, True): cache["blocks.1.hook_resid_mid"]}
    for (layer, mlp_input), resid in targets.items():
        for expand in (True, False):
            stack, labels = cache.get_full_resid_decomposition(layer=layer, mlp_input=mlp_input,
                                                               expand_neurons=expand, return_labels=True)
            assert labels[-2:] == ["embed", "bias"] and len(labels) == stack.shape[0]
            torch.testing.assert_close(stack.sum(0), resid, atol=2e-4, rtol=0)
    # TL's definition: the attention and MLP output biases of the blocks before `layer`
    blocks = model.clip.visual.transformer.resblocks
    expected = blocks[0].attn.out_proj.bias + blocks[0].mlp.c_proj.bias + blocks[1].attn.out_proj.bias
    torch.testing.assert_close(model.accumulated_bias(1, mlp_input=True), expected)


@torch.no_grad()
def test_logit_attrs_with_class_directions(model, images):
    _, cache = model.run_with_cache(images)
    class_embeds = torch.nn.functional.normalize(torch.randn(5, model.cfg.embed_dim), dim=-1)
    with pytest.raises(ValueError, match="class_directions"):
        model.tokens_to_residual_directions(0)
    model.class_directions = model.class_residual_directions(class_embeds)
    classes = torch.tensor([0, 3, 4])
    stack = cache.decompose_resid(pos_slice=0)  # [component, batch, d_model]
    attrs = cache.logit_attrs(stack, tokens=classes, pos_slice=0)  # [component, batch]
    # independent: open_clip's ln_post without its bias, the projection, the class embedding
    v = model.clip.visual
    cls = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, 0]
    expected = ((v.ln_post(cls) - v.ln_post.bias) @ v.proj * class_embeds[classes]).sum(-1)
    torch.testing.assert_close(attrs.sum(0), expected, atol=1e-4, rtol=1e-4)
    del model.class_directions


TL_FUNCTIONS = sorted(n for n in dir(tl_patching) if n.startswith("get_act_patch_"))


def test_every_tl_patching_function_has_a_wrapper():
    assert len(TL_FUNCTIONS) >= 18
    missing = [n for n in TL_FUNCTIONS if not callable(getattr(patching, n, None))]
    assert not missing, missing


# The by-position head functions the issue found missing, and one [layer, pos] one: the default tier.
FAST = ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos", "get_act_patch_attn_head_v_by_pos",
        "get_act_patch_attn_head_pattern_by_pos")


def test_by_position_patching_covers_all_tokens_not_the_image_width():
    _check_wrappers(FAST)


@pytest.mark.slow
def test_every_patching_wrapper_covers_all_tokens_not_the_image_width():
    _check_wrappers(TL_FUNCTIONS)


def _check_wrappers(names):
    # 8 px images of 2 px patches: 17 tokens, 8 columns (TL's own functions would patch 8 positions)
    torch.manual_seed(0)
    m = HookedCLIP.from_pretrained("ViT-B-32", pretrained=None, embed_dim=16,
                                   vision_cfg=dict(image_size=8, patch_size=2, width=32, layers=1, head_width=32),
                                   text_cfg=dict(context_length=16, width=32, heads=2, layers=1))
    T, H, L = m.cfg.n_tokens, m.cfg.n_heads, m.cfg.n_layers
    assert (T, H, L) == (17, 1, 1)
    g = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    _, clean_cache = m.run_with_cache(clean)
    with torch.no_grad():
        base = m(corrupted)

    def metric(embed):
        return (embed - base).norm()

    sizes = {"layer": L, "pos": T, "dest_pos": T, "src_pos": T, "head_index": H, "head": H}
    every = {"get_act_patch_block_every": (3, L, T), "get_act_patch_attn_head_all_pos_every": (5, L, H),
             "get_act_patch_attn_head_by_pos_every": (5, L, T, H)}
    results = {}
    for name in names:
        tl_fn = getattr(tl_patching, name)
        shape = every[name] if name in every else tuple(sizes[a] for a in tl_fn.keywords["index_axis_names"])
        results[name] = getattr(patching, name)(m, corrupted, clean_cache, metric)
        assert tuple(results[name].shape) == shape, name
    # the last token, beyond the image width: the grid's value is the patch done by hand
    last = T - 1

    def put_clean(act, hook, pos):
        act[:, pos] = clean_cache[hook.name][:, pos]
        return act

    with torch.no_grad():
        by_hand = metric(m.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre",
                                                                 partial(put_clean, pos=last))]))
    torch.testing.assert_close(results["get_act_patch_resid_pre"][0, last], by_hand)
    assert by_hand > 0
    if "get_act_patch_block_every" in results:
        torch.testing.assert_close(results["get_act_patch_block_every"][0], results["get_act_patch_resid_pre"])
