"""Small random SAELens SAEs shared by several tests (the tiny CLIP of conftest.py has d_model 64, 2 blocks)."""

from __future__ import annotations

import json

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from safetensors.torch import save_file

D, S, K = 64, 256, 8
FINAL = "blocks.1.hook_resid_post"  # the tiny CLIP has 2 blocks


def make_topk_sae(hook: str | None = FINAL, seed: int = 0, d_in: int = D, mean: bool = True,
                  rescale: bool = False) -> TopKSAE:
    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=S, k=K, rescale_acts_by_decoder_norm=rescale)
    if hook:
        cfg.metadata.hook_name = hook
    sae = TopKSAE(cfg)
    with torch.no_grad():  # non-zero biases so that the bias handling is exercised
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
        sae.b_enc.copy_(0.1 * torch.randn(S))
    if mean:
        sae.cfg.metadata.activation_mean = (0.2 * torch.randn(d_in)).tolist()
    return sae.requires_grad_(False)


def write_sparsify(folder, d_in: int = D, seed: int = 0, n_latents: int = 128, k: int = 4,
                   **cfg_changes) -> dict:
    """sparsify's `SparseCoder.save_to_disk` layout: cfg.json (SparseCoderConfig + d_in) and sae.safetensors."""
    g = torch.Generator().manual_seed(seed)
    weights = {"encoder.weight": torch.randn(n_latents, d_in, generator=g) / d_in**0.5,
               "encoder.bias": torch.randn(n_latents, generator=g) * 0.1,
               "W_dec": torch.randn(n_latents, d_in, generator=g) / d_in**0.5,
               "b_dec": torch.randn(d_in, generator=g) * 0.3}
    cfg = {"activation": "topk", "expansion_factor": n_latents // d_in, "normalize_decoder": True, "num_latents": 0,
           "k": k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in} | cfg_changes
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae.safetensors"))
    return weights


class _WritesMarker:
    """A pickle payload: unpickling it calls `open(marker, "w")`, which creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payload_pickle(marker) -> bytes:
    """A real malicious pickle: loading it with `pickle.load` or `torch.load(weights_only=False)` creates `marker`."""
    import pickle

    return pickle.dumps(_WritesMarker(marker), protocol=2)


def hostile_model_dir(root, marker):
    """An open_clip `local-dir:` model (the tiny CLIP's config) whose weights file is a payload pickle."""
    import json
    from pathlib import Path

    import open_clip
    from conftest import TINY_CLIP_KWARGS

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg.update(TINY_CLIP_KWARGS)
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    (root / "open_clip_pytorch_model.bin").write_bytes(payload_pickle(marker))
    return root
