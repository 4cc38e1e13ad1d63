"""Imported SAEs equal their source library's own forward: for each library that installs here, a checkpoint
is written with that library's save code (random weights), read with `load_vision_sae`, and the latents and
reconstructions on the same activations are compared with the library's forward (max |diff| <= 1e-5).

Libraries: eai-sparsify, overcomplete, saev, visaebench (the `[dev]` extra); a test skips, with the reason,
when its library does not import. Formats whose code is not on PyPI (ViT-Prisma's SAEs, saev's current
format) and the Hub layouts: tests/sae/test_sae_format_replicas.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from sae_files import D, M, N, acts, assert_same, randomise, visaebench_checkpoint

from sae_lens_vision_steer.core.errors import InputError, UsageError
from sae_lens_vision_steer.sae.formats import ImportOptions
from sae_lens_vision_steer.sae.loading import load_vision_sae


# ------------------------------------------------------------------------------------------- sparsify
def test_sparsify_checkpoint_equals_sparsify_forward(tmp_path, monkeypatch):
    # sparsify decodes with a Triton kernel unless this (its own switch, read at import) is set: CPU here.
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e .[dev])")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(expansion_factor=M // D, k=8))
    randomise(coder, 1, ("encoder.bias", "b_dec"))
    hookpoint = "vision_model.encoder.layers.1"
    coder.save_to_disk(tmp_path / hookpoint)
    (tmp_path / "config.json").write_text(json.dumps({"model": "openai/clip-vit-base-patch32"}))
    x = acts()
    with torch.no_grad():
        out = coder(x)
    lat_ref = torch.zeros(N, M).scatter(-1, out.latent_indices, out.latent_acts)
    sae, info = load_vision_sae(tmp_path, hookpoint)
    assert info.format == "sparsify" and info.hook_name == "blocks.1.hook_resid_post"
    assert info.model_name == "hf:openai/clip-vit-base-patch32" and sae.cfg.architecture() == "topk"
    assert_same(sae, x, lat_ref, out.sae_out)
    sae, _ = load_vision_sae(tmp_path / hookpoint, options=ImportOptions(hook_name="blocks.0.hook_resid_post"))
    assert sae.cfg.metadata.hook_name == "blocks.0.hook_resid_post"  # the user's hook wins


def test_sparsify_refuses_what_saelens_cannot_represent(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed (pip install -e .[dev])")
    cases = {"groupmax": {"activation": "groupmax", "num_latents": M, "k": 8}, "transcode": {"transcode": True, "k": 8},
             "skip": {"skip_connection": True, "k": 8}}
    for name, kw in cases.items():
        sparsify.SparseCoder(D, sparsify.SparseCoderConfig(**kw)).save_to_disk(tmp_path / name / "layers.0")
        with pytest.raises(InputError, match={"groupmax": "group-max", "transcode": "transcoder",
                                              "skip": "skip"}[name]):
            load_vision_sae(tmp_path / name / "layers.0")


# ------------------------------------------------------------------------------------------- overcomplete
@pytest.fixture
def overcomplete_sae(monkeypatch):
    import matplotlib
    import matplotlib.cm

    # overcomplete 0.3.0's __init__ imports its plotting helpers, which call matplotlib.cm.get_cmap (removed in
    # matplotlib 3.9); give it back for the import. The SAE code under test does not use matplotlib.
    if not hasattr(matplotlib.cm, "get_cmap"):
        monkeypatch.setattr(matplotlib.cm, "get_cmap", matplotlib.colormaps.get_cmap, raising=False)
    return pytest.importorskip("overcomplete.sae", reason="overcomplete is not installed (pip install -e .[dev])")


@pytest.mark.parametrize("cls", ["TopKSAE", "SAE", "JumpSAE", "BatchTopKSAE"])
def test_overcomplete_state_dict_equals_overcomplete_forward(cls, overcomplete_sae, tmp_path):
    torch.manual_seed(0)
    kw = {"top_k": 8} if cls in ("TopKSAE", "BatchTopKSAE") else {}
    model = getattr(overcomplete_sae, cls)(D, M, dictionary_params={"use_multiplier": True}, **kw)
    randomise(model, 2, ("final_block.0.bias", "multiplier", "thresholds"))
    x = acts(1)
    if cls == "BatchTopKSAE":
        model.train()
        model.encode(x)  # sets the running threshold, as training does; then a lower one, for more active latents
        model.running_threshold = model.running_threshold * 0.2
    model.eval()
    with torch.no_grad():
        _, z_ref, rec_ref = model(x)
    # overcomplete has no save function; its models are nn.Modules saved with torch.save(state_dict()).
    torch.save(model.state_dict(), tmp_path / "sae.pt")
    args = {"class": cls, "input_shape": D, "nb_concepts": M, **kw, "dictionary_params": {"use_multiplier": True}}
    if cls == "BatchTopKSAE":
        args["running_threshold"] = float(model.running_threshold)
    (tmp_path / "overcomplete.json").write_text(json.dumps(args))
    sae, info = load_vision_sae(tmp_path / "sae.pt", options=ImportOptions(hook_name="blocks.1.hook_resid_post"))
    assert info.format == "overcomplete"
    assert_same(sae, x, z_ref, rec_ref)


def test_overcomplete_refusals(overcomplete_sae, tmp_path):
    model = overcomplete_sae.TopKSAE(D, M, top_k=4, encoder_module="mlp_ln_1")
    torch.save(model.state_dict(), tmp_path / "sae.pt")
    opts = {"hook_name": "blocks.1.hook_resid_post"}
    args = {"class": "TopKSAE", "input_shape": D, "nb_concepts": M, "top_k": 4, "encoder_module": "mlp_ln_1"}
    with pytest.raises(InputError, match="not affine"):
        load_vision_sae(tmp_path / "sae.pt", format="overcomplete", options=ImportOptions(constructor=args, **opts))
    with pytest.raises(UsageError, match="constructor"):
        load_vision_sae(tmp_path / "sae.pt", format="overcomplete", options=ImportOptions(**opts))
    args = {"class": "BatchTopKSAE", "input_shape": D, "nb_concepts": M, "top_k": 4}
    torch.save(overcomplete_sae.BatchTopKSAE(D, M, top_k=4).state_dict(), tmp_path / "sae.pt")
    with pytest.raises(UsageError, match="running_threshold"):
        load_vision_sae(tmp_path / "sae.pt", format="overcomplete", options=ImportOptions(constructor=args, **opts))


# ------------------------------------------------------------------------------------------- saev
def test_saev_checkpoint_equals_saev_forward(tmp_path):
    saev_nn = pytest.importorskip("saev.nn", reason="saev is not installed (pip install -e .[dev])")
    import saev.config

    torch.manual_seed(0)
    model = saev_nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=D, exp_factor=M // D))
    randomise(model, 3, ("b_enc", "b_dec"))
    path = tmp_path / "sae.pt"
    saev_nn.dump(str(path), model)  # saev's own writer: a JSON header line, then the state dict
    loaded = saev_nn.load(str(path))
    x = acts(2)
    hook = ImportOptions(hook_name="blocks.1.hook_resid_post")
    with pytest.raises(UsageError, match="input_norm"):  # old saev normalised its inputs; the stats are not in the file
        load_vision_sae(path, options=hook)

    sae, info = load_vision_sae(path, options=ImportOptions(hook_name="blocks.1.hook_resid_post", input_norm="none"))
    with torch.no_grad():
        rec_ref, f_ref, _ = loaded(x)
    assert info.format == "saev" and sae.cfg.architecture() == "standard"
    assert_same(sae, x, f_ref, rec_ref)

    # The data loader's (x - mean) / scale folded into the weights: raw activations in, raw reconstruction out.
    mean, scale = torch.randn(D) * 0.5, 1.7
    sae, _ = load_vision_sae(tmp_path, options=ImportOptions(hook_name="blocks.1.hook_resid_post",
                                                            input_norm={"mean": mean.tolist(), "std": scale}))
    with torch.no_grad():
        rec_n, f_ref, _ = loaded((x - mean) / scale)
    assert_same(sae, x, f_ref, rec_n * scale + mean)


# ------------------------------------------------------------------------------------------- ViSAEBench
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu"])
def test_visaebench_checkpoint_equals_visaebench_forward(activation, tmp_path):
    hub = pytest.importorskip("visaebench.hub", reason="visaebench is not installed (pip install -e .[dev])")
    visaebench_checkpoint(tmp_path / "batchtopk_4x_k8", activation, seed=9)
    generic = hub.load_sae(str(tmp_path), subfolder="batchtopk_4x_k8", device="cpu")
    x = acts(4, scale=2.0)
    mean, std = torch.randn(D), 2.5
    torch.save({"mean": mean, "std": std}, tmp_path / "norm_stats.pt")  # as visaebench.data.cache writes it
    with pytest.raises(UsageError, match="norm_stats"):
        load_vision_sae(tmp_path, "batchtopk_4x_k8")
    norm = ImportOptions(input_norm=tmp_path / "norm_stats.pt")
    sae, info = load_vision_sae(tmp_path, "batchtopk_4x_k8", options=norm)
    with torch.no_grad():
        z_ref, rec_ref = generic((x - mean) / std)  # ViSAEBench feeds its SAEs normalised activations
    assert info.format == "visaebench" and info.positions == "patches" and info.hook_name == "blocks.11.hook_resid_post"
    assert_same(sae, x, z_ref, rec_ref * std + mean)
