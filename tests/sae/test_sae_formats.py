"""Imported SAEs equal their source library's own forward: for each library that installs here, a checkpoint
is written with that library's save code (random weights), read with `load_vision_sae`, and the latents and
reconstructions on the same activations are compared with the library's forward (max |diff| <= 1e-5).

Libraries: eai-sparsify, overcomplete, saev, visaebench (the `[dev]` extra); a test skips, with the reason,
when its library does not import. ViT-Prisma's SAE code is not on PyPI (vit-prisma 0.1.4 has no `sae`
package), so its tests write a replica of its files (names and config keys from ViT-Prisma 2.0's
`sae/config.py` and `sae/sae.py`), in a folder and as a Hub repo in a temporary HF cache read with
HF_HUB_OFFLINE=1, and compare with its forward written out here; if `vit_prisma.sae` imports (installed
from its GitHub source), its own forward is compared too.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from sae_lens_vision_steer.core.errors import InputError, UsageError
from sae_lens_vision_steer.sae.formats import ImportOptions
from sae_lens_vision_steer.sae.loading import load_vision_sae
from sae_lens_vision_steer.steering.hooks import check_affine_decoder

TOL = 1e-5
D, M, N = 32, 128, 48


def acts(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g) * scale


def ours(sae, x):
    with torch.no_grad():
        lat = sae.encode(x)
        return lat, sae.decode(lat)


def assert_same(sae, x, lat_ref, rec_ref, min_l0: float = 1.0):
    lat, rec = ours(sae, x)
    assert (lat_ref != 0).sum(-1).float().mean() >= min_l0  # the comparison is not between two zero tensors
    assert (lat - lat_ref).abs().max() <= TOL and (rec - rec_ref).abs().max() <= TOL
    assert torch.equal(lat != 0, lat_ref != 0)


def randomise(module: torch.nn.Module, seed: int, names: tuple[str, ...]) -> None:
    """Give the parameters the library initialises to zero (biases) random values, so a mapping that drops
    or misplaces them fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(name.endswith(n) for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def offline_hub_snapshot(tmp_path, monkeypatch, repo: str):
    """A temporary HF cache holding one snapshot of `repo` (its folder is returned, to be filled), read with
    HF_HUB_OFFLINE=1: huggingface_hub resolves `main` from the cache and never touches the network."""
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return repo_dir / "snapshots" / commit


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


def write_saev_head(path, activation: dict, state: dict, schema: int = 5) -> None:
    """A replica of saev's current `nn.dump` (src/saev/nn/modeling.py, SCHEMA_VERSION = 5): the header line
    `{"schema", "cfg": {..., "activation": {"cls", "params"}}, "commit", "lib"}`, then torch.save(state)."""
    cfg = {"d_model": D, "d_sae": M, "activation": activation, "reinit_blend": 0.8, "reinit_enc_dec_tranpose": True,
           "remove_parallel_grads": True, "normalize_w_dec": True}
    with open(path, "wb") as f:
        f.write((json.dumps({"schema": schema, "cfg": cfg, "commit": "unknown", "lib": "1.0.0"}) + "\n").encode())
        torch.save(state, f)


def saev_state(seed: int, **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {"W_dec": torch.randn(M, D, generator=g) / D**0.5, "b_dec": torch.randn(D, generator=g) * 0.3,
             "W_enc": torch.randn(D, M, generator=g) / D**0.5, "b_enc": torch.randn(M, generator=g) * 0.3}
    return state | extra


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
def visaebench_checkpoint(folder, activation: str, seed: int) -> dict:
    """A checkpoint in the layout `visaebench.hub.load_sae` reads: `sae.pt` (a torch state dict with its key
    names) + `config.json`. ViSAEBench has no writer of its own."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder.weight": torch.randn(M, D, generator=g) / D**0.5,
             "encoder.bias": torch.randn(M, generator=g) * 0.3,
             "decoder.weight": torch.randn(M, D, generator=g) / D**0.5, "decoder.bias": torch.randn(D, generator=g)}
    cfg = {"activation": activation, "input_dim": D, "hidden_dim": M, "k": 8}
    if activation == "batchtopk":
        state["_running_threshold"] = torch.tensor(0.35)
    if activation == "jumprelu":
        state["jump_thresholds"] = torch.rand(M, generator=g) * 0.5
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "sae.pt")
    (folder / "config.json").write_text(json.dumps(cfg))
    return state


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


def test_visaebench_hub_repo_from_an_offline_hf_cache(tmp_path, monkeypatch):
    """The Hub layout `visaebench/clip-vitb16-saes/batchtopk_16x_k128/` (visaebench/hub/loader.py) in a
    temporary HF cache: the backbone's model and the patch positions come from the repo."""
    repo = "visaebench/clip-vitb16-saes"
    visaebench_checkpoint(offline_hub_snapshot(tmp_path, monkeypatch, repo) / "batchtopk_16x_k128", "topk", seed=10)
    sae, info = load_vision_sae(repo, "batchtopk_16x_k128", options=ImportOptions(input_norm="none"))
    assert info.model_name == "hf:openai/clip-vit-base-patch16" and info.positions == "patches"
    assert info.format == "visaebench" and sae.cfg.metadata.source["library"] == "visaebench"


# ------------------------------------------------------------------------------------------- ViT-Prisma
PRISMA_CONFIG = {  # keys as VisionModelSAERunnerConfig.save_config writes them (ViT-Prisma 2.0, sae/config.py)
    "model_class_name": "HookedViT", "model_name": "open-clip:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
    "vit_model_cfg": None, "model_path": None, "hook_point_layer": 1, "layer_subtype": "hook_resid_post",
    "hook_point_head_index": None, "context_size": 50, "use_cached_activations": False, "use_patches_only": False,
    "cached_activations_path": None, "image_size": 224, "architecture": "standard",
    "b_dec_init_method": "geometric_median", "expansion_factor": M // D, "from_pretrained_path": None,
    "is_transcoder": False, "transcoder_with_skip_connection": True, "out_hook_point_layer": 9,
    "layer_out_subtype": "hook_mlp_out", "d_out": 768, "_device": "cpu", "seed": 42, "_dtype": "float32",
    "d_in": D, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 8}, "cls_token_only": True,
    "max_grad_norm": 1.0, "initialization_method": "independent", "normalize_activations": "layer_norm",
}


def write_prisma(folder, cfg: dict, state: dict, cfg_class: str = "vit_prisma.sae.config.VisionModelSAERunnerConfig"):
    """A replica of a ViT-Prisma SAE repo: config.json + `n_images_<N>.pt`, written as `save_model` does,
    `torch.save({"cfg": <config object>, "state_dict": ...})` (the object pickled under ViT-Prisma's class name)."""
    module_name, cls_name = cfg_class.rsplit(".", 1)
    cls = type(cls_name, (), {"__module__": module_name})
    obj = cls()
    obj.__dict__.update(cfg)
    parts = module_name.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    for n in names:  # pickle finds the class through sys.modules; stand-in modules only while saving
        sys.modules[n] = types.ModuleType(n)
    setattr(sys.modules[module_name], cls_name, cls)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        torch.save({"cfg": obj, "state_dict": state}, folder / "n_images_2600058.pt")
    finally:
        for n, mod in saved.items():
            if mod is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = mod
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))


def prisma_forward(cfg: dict, state: dict, x: torch.Tensor):
    """ViT-Prisma 2.0's StandardSparseAutoencoder/GatedSparseAutoencoder encode and decode (sae/sae.py)."""
    mu = std = None
    if cfg["normalize_activations"] == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    sae_in = x - state["b_dec"]
    if cfg["architecture"] == "gated":
        gate = (sae_in @ state["W_enc"] + state["b_gate"] > 0).float()
        z = gate * torch.relu(sae_in @ (state["W_enc"] * state["r_mag"].exp()) + state["b_mag"])
    else:
        h = sae_in @ state["W_enc"] + state["b_enc"]
        if cfg["activation_fn_str"] == "topk":
            top = torch.topk(h, cfg["activation_fn_kwargs"]["k"], dim=-1)
            z = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
        else:
            z = h.relu()
    out = z @ state["W_dec"] + state["b_dec"]
    return z, (out * std + mu if mu is not None else out)


def prisma_state(seed: int, gated: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {"W_dec": torch.randn(M, D, generator=g) / D**0.5, "W_enc": torch.randn(D, M, generator=g) / D**0.5,
             "b_enc": torch.randn(M, generator=g) * 0.3, "b_dec": torch.randn(D, generator=g) * 0.3}
    if gated:
        state |= {"b_gate": torch.randn(M, generator=g) * 0.3, "r_mag": torch.randn(M, generator=g) * 0.1,
                  "b_mag": torch.randn(M, generator=g) * 0.3}
    return state


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
