"""SAE formats whose current code is not on PyPI, or Hub layouts, tested on replicas of their files: saev's
current format (schema 5; PyPI has saev 0.1.0), ViT-Prisma (PyPI vit-prisma 0.1.4 has no SAE code), and the Hub
repos of saev, ViSAEBench and ViT-Prisma in a temporary HF cache read with HF_HUB_OFFLINE=1. File names and
config keys come from each project's code; the forwards are written out here from it. Where ViT-Prisma's SAE
code imports (installed from its GitHub source), its own forward is compared too."""

from __future__ import annotations

import pytest
import torch
from sae_files import (
    PRISMA_CONFIG,
    M,
    acts,
    assert_same,
    offline_hub_snapshot,
    prisma_forward,
    prisma_state,
    saev_state,
    visaebench_checkpoint,
    write_prisma,
    write_saev_head,
)

from sae_lens_vision_steer.core.errors import InputError, UsageError
from sae_lens_vision_steer.sae.formats import ImportOptions
from sae_lens_vision_steer.sae.loading import load_vision_sae
from sae_lens_vision_steer.steering.hooks import check_affine_decoder


# ------------------------------------------------------------------------------------------- saev
def test_saev_current_format_replica(tmp_path):
    """saev's current format (schema 5) is not on PyPI (saev 0.1.0 is the old code): a replica of its files,
    compared with its forward as written in src/saev/nn/modeling.py: h = x W_enc + b_enc (no b_dec
    subtraction since 2025-09), ReLU or, at inference, BatchTopK's `h if h > threshold else 0`."""
    x, opts = acts(3), ImportOptions(hook_name="blocks.1.hook_resid_post")
    relu = {"cls": "Relu", "params": {"key": "relu", "sparsity": {"cls": "L1Sparsity", "params": {}}}}
    state = saev_state(4)
    write_saev_head(tmp_path / "relu.pt", relu, state)
    h = x @ state["W_enc"] + state["b_enc"]
    sae, info = load_vision_sae(tmp_path / "relu.pt", options=opts)
    assert info.format == "saev" and not sae.cfg.apply_b_dec_to_input
    assert_same(sae, x, h.relu(), h.relu() @ state["W_dec"] + state["b_dec"])

    btk = {"cls": "BatchTopK", "params": {"key": "batch-top-k", "top_k": 8, "momentum": 0.1}}
    state = saev_state(5, **{"activation.threshold": torch.tensor(0.4)})
    write_saev_head(tmp_path / "btk.pt", btk, state)
    h = x @ state["W_enc"] + state["b_enc"]
    f = torch.where(h > 0.4, h, torch.zeros_like(h))
    sae, _ = load_vision_sae(tmp_path / "btk.pt", options=opts)
    assert sae.cfg.architecture() == "jumprelu"
    assert_same(sae, x, f, f @ state["W_dec"] + state["b_dec"])

    write_saev_head(tmp_path / "topk.pt", {"cls": "TopK", "params": {"key": "top-k", "top_k": 8}}, saev_state(6))
    with pytest.raises(InputError, match="with their sign"):
        load_vision_sae(tmp_path / "topk.pt", options=opts)
    write_saev_head(tmp_path / "s2.pt", relu, saev_state(7), schema=2)
    with pytest.raises(InputError, match="2025-09-05"):
        load_vision_sae(tmp_path / "s2.pt", options=opts)
    bad = saev_state(8)
    bad["W_dec"] = bad["W_dec"][:, :-1]
    write_saev_head(tmp_path / "bad.pt", relu, bad)
    with pytest.raises(InputError, match=r"W_dec has shape \[128, 31\], the config implies \[128, 32\]"):
        load_vision_sae(tmp_path / "bad.pt", options=opts)


def test_saev_hub_repo_from_an_offline_hf_cache(tmp_path, monkeypatch):
    """saev's CLIP/DINOv2 repos hold `sae.pt` at the root (osunlp/SAE_CLIP_24K_ViT-B-16_IN1K, saev's docs):
    a replica in a temporary HF cache, read with HF_HUB_OFFLINE=1; `format="saev"` needs no sae_id."""
    repo = "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K"
    state = saev_state(17)
    relu = {"cls": "Relu", "params": {"key": "relu"}}
    snapshot = offline_hub_snapshot(tmp_path, monkeypatch, repo)
    snapshot.mkdir(parents=True)
    write_saev_head(snapshot / "sae.pt", relu, state)
    sae, info = load_vision_sae(repo, format="saev", options=ImportOptions(hook_name="blocks.10.hook_resid_post"))
    x = acts(7)
    h = (x @ state["W_enc"] + state["b_enc"]).relu()
    assert info.format == "saev" and info.sae_id is None and info.hook_name == "blocks.10.hook_resid_post"
    assert_same(sae, x, h, h @ state["W_dec"] + state["b_dec"])


# ------------------------------------------------------------------------------------------- ViSAEBench
def test_visaebench_hub_repo_from_an_offline_hf_cache(tmp_path, monkeypatch):
    """The Hub layout `visaebench/clip-vitb16-saes/batchtopk_16x_k128/` (visaebench/hub/loader.py) in a
    temporary HF cache: the backbone's model and the patch positions come from the repo."""
    repo = "visaebench/clip-vitb16-saes"
    visaebench_checkpoint(offline_hub_snapshot(tmp_path, monkeypatch, repo) / "batchtopk_16x_k128", "topk", seed=10)
    sae, info = load_vision_sae(repo, "batchtopk_16x_k128", options=ImportOptions(input_norm="none"))
    assert info.model_name == "hf:openai/clip-vit-base-patch16" and info.positions == "patches"
    assert info.format == "visaebench" and sae.cfg.metadata.source["library"] == "visaebench"


# ------------------------------------------------------------------------------------------- ViT-Prisma
def test_prisma_repo_replica_equals_prisma_forward(tmp_path):
    x = acts(5, scale=3.0)
    state = prisma_state(11)
    write_prisma(tmp_path / "topk", PRISMA_CONFIG, state)
    sae, info = load_vision_sae(tmp_path / "topk")
    z_ref, rec_ref = prisma_forward(PRISMA_CONFIG, state, x)
    assert info.format == "prisma" and info.positions == "cls" and info.hook_name == "blocks.1.hook_resid_post"
    assert info.model_name == "hf-hub:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"
    assert sae.cfg.normalize_activations == "layer_norm"
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):  # steering refuses it by name
        check_affine_decoder(sae)
    assert_same(sae, x, z_ref, rec_ref)

    gated_cfg = PRISMA_CONFIG | {"architecture": "gated", "activation_fn_str": "relu", "activation_fn_kwargs": {},
                                 "normalize_activations": "none", "cls_token_only": False, "use_patches_only": True}
    state = prisma_state(12, gated=True)
    write_prisma(tmp_path / "gated", gated_cfg, state)
    with pytest.warns(UserWarning, match="centres the weights writing to the residual stream"):
        sae, info = load_vision_sae(tmp_path / "gated")  # no run-time layer norm: the centring caveat is said
    z_ref, rec_ref = prisma_forward(gated_cfg, state, x)
    assert sae.cfg.architecture() == "gated" and info.positions == "patches"
    check_affine_decoder(sae)  # an affine decoder: steerable
    assert_same(sae, x, z_ref, rec_ref)

    try:  # ViT-Prisma's own forward, where its SAE code is installed (it is not on PyPI)
        from vit_prisma.sae.sae import SparseAutoencoder
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return
    prisma = SparseAutoencoder.load_from_pretrained(str(tmp_path / "topk" / "n_images_2600058.pt"))
    with torch.no_grad():
        _, z_lib = prisma.encode(x)
        rec_lib = prisma.decode(z_lib)
    assert_same(load_vision_sae(tmp_path / "topk")[0], x, z_lib, rec_lib)


def test_prisma_refusals_and_pickles(tmp_path):
    for name, change, match in (("tc", {"is_transcoder": True}, "transcoder"),
                                ("tanh", {"activation_fn_str": "tanh-relu"}, "tanh-relu"),
                                ("head", {"hook_point_head_index": 3}, "one attention head")):
        write_prisma(tmp_path / name, PRISMA_CONFIG | change, prisma_state(13))
        with pytest.raises(InputError, match=match):
            load_vision_sae(tmp_path / name)
    # A weights file that needs another class unpickled is refused, naming the file, unless allow_pickle.
    write_prisma(tmp_path / "other", PRISMA_CONFIG, prisma_state(14), cfg_class="someone.else.Config")
    with pytest.raises(InputError, match=r"n_images_2600058\.pt needs full unpickling.*allow_pickle"):
        load_vision_sae(tmp_path / "other")
    wrong = prisma_state(15)
    wrong["W_enc"] = wrong["W_enc"][:, : M // 2]
    write_prisma(tmp_path / "shape", PRISMA_CONFIG, wrong)
    with pytest.raises(InputError, match="d_in . expansion_factor = 128"):
        load_vision_sae(tmp_path / "shape")


def test_prisma_hub_repo_from_an_offline_hf_cache(tmp_path, monkeypatch):
    """ViT-Prisma's Hub repos hold one SAE at the root (config.json + the weights file, as
    vit_prisma/utils/load_model.py downloads them): a replica in a temporary HF cache, read offline."""
    repo = "Prisma-Multimodal/sae-top_k-64-cls_only-layer_11-hook_resid_post"
    state = prisma_state(16)
    write_prisma(offline_hub_snapshot(tmp_path, monkeypatch, repo), PRISMA_CONFIG | {"hook_point_layer": 11}, state)
    with pytest.raises(UsageError, match="needs sae_id.*format="):
        load_vision_sae(repo)
    sae, info = load_vision_sae(repo, format="prisma")
    x = acts(6, scale=3.0)
    assert info.hook_name == "blocks.11.hook_resid_post" and info.source == repo and info.format == "prisma"
    assert_same(sae, x, *prisma_forward(PRISMA_CONFIG, state, x))
