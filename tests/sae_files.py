"""Helpers of the SAE import tests (tests/sae/test_sae_formats.py, test_sae_format_replicas.py): random
activations, the exactness check, an offline HF cache, and files in saev's, ViSAEBench's and ViT-Prisma's
layouts."""

from __future__ import annotations

import json
import sys
import types

import torch

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
