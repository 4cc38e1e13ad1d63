"""Per source library: the largest difference between `load_vision_sae`'s SAE and the library's own forward.

    python scripts/check_sae_imports.py [--d-in 768] [--d-sae 3072] [--k 64] [--n 512]

For each library that imports (eai-sparsify, overcomplete, saev, visaebench; vit_prisma from its GitHub
source, it is not on PyPI), a checkpoint with random weights is written with the library's own code (or,
where it has none, in the layout its loader reads), loaded with `load_vision_sae`, and both forwards run on
the same random activations. Prints one line per source: max |latents - library|, max |reconstruction -
library|, and the largest |value| of each for scale. Sources whose library does not import are listed as
skipped. Results: docs/sae-sources.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's own switch: its eager decoder on CPU


def _lib_overcomplete():
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):  # overcomplete 0.3.0 imports a helper removed in matplotlib 3.9
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    import overcomplete.sae

    return overcomplete.sae


def _dense(indices, values, d_sae):
    return torch.zeros(indices.shape[0], d_sae).scatter(-1, indices, values)


def sparsify_case(tmp: Path, a, x):
    import sparsify

    coder = sparsify.SparseCoder(a.d_in, sparsify.SparseCoderConfig(num_latents=a.d_sae, k=a.k))
    with torch.no_grad():
        coder.b_dec.normal_(0, 0.3)
        coder.encoder.bias.normal_(0, 0.1)
    coder.save_to_disk(tmp / "layers.11")
    out = coder(x)
    return (tmp, "layers.11", {}), _dense(out.latent_indices, out.latent_acts, a.d_sae), out.sae_out


def overcomplete_case(tmp: Path, a, x, cls: str):
    oc = _lib_overcomplete()
    kw = {"top_k": a.k} if cls in ("TopKSAE", "BatchTopKSAE") else {}
    model = getattr(oc, cls)(a.d_in, a.d_sae, dictionary_params={"use_multiplier": True}, **kw)
    with torch.no_grad():
        model.encoder.final_block[0].bias.normal_(0, 0.1)
        model.dictionary.multiplier.fill_(0.3)
        if cls == "JumpSAE":
            model.thresholds.normal_(-3, 0.5)
    if cls == "BatchTopKSAE":
        model.train()
        model.encode(x)
        model.running_threshold = model.running_threshold * 0.2
    model.eval()
    with torch.no_grad():
        _, z, rec = model(x)
    torch.save(model.state_dict(), tmp / "sae.pt")
    args = {"class": cls, "input_shape": a.d_in, "nb_concepts": a.d_sae, **kw,
            "dictionary_params": {"use_multiplier": True}}
    if cls == "BatchTopKSAE":
        args["running_threshold"] = float(model.running_threshold)
    (tmp / "overcomplete.json").write_text(json.dumps(args))
    return (tmp / "sae.pt", None, {}), z, rec


def saev_case(tmp: Path, a, x):
    import saev.config
    import saev.nn

    model = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=a.d_in, exp_factor=a.d_sae // a.d_in))
    with torch.no_grad():
        model.b_dec.normal_(0, 0.3)
        model.b_enc.normal_(0, 0.1)
    saev.nn.dump(str(tmp / "sae.pt"), model)
    mean, scale = torch.randn(a.d_in) * 0.5, 1.7
    with torch.no_grad():
        rec, f, _ = saev.nn.load(str(tmp / "sae.pt"))((x - mean) / scale)
    return (tmp / "sae.pt", None, {"input_norm": {"mean": mean.tolist(), "std": scale}}), f, rec * scale + mean


def visaebench_case(tmp: Path, a, x, activation: str):
    from visaebench.hub import load_sae

    g = torch.Generator().manual_seed(1)
    state = {"encoder.weight": torch.randn(a.d_sae, a.d_in, generator=g) / a.d_in**0.5,
             "encoder.bias": torch.randn(a.d_sae, generator=g) * 0.1,
             "decoder.weight": torch.nn.functional.normalize(torch.randn(a.d_sae, a.d_in, generator=g), dim=-1),
             "decoder.bias": torch.randn(a.d_in, generator=g) * 0.3}
    if activation == "batchtopk":
        state["_running_threshold"] = torch.tensor(0.5)
    if activation == "jumprelu":
        state["jump_thresholds"] = torch.rand(a.d_sae, generator=g)
    (tmp / "cfg").mkdir()
    torch.save(state, tmp / "cfg" / "sae.pt")
    (tmp / "cfg" / "config.json").write_text(json.dumps({"activation": activation, "k": a.k}))
    mean, std = torch.randn(a.d_in), 2.5
    with torch.no_grad():
        z, rec = load_sae(str(tmp), subfolder="cfg", device="cpu")((x - mean) / std)
    return (tmp, "cfg", {"input_norm": {"mean": mean.tolist(), "std": std}}), z, rec * std + mean


def prisma_case(tmp: Path, a, x, norm: str):
    from vit_prisma.sae.config import VisionModelSAERunnerConfig
    from vit_prisma.sae.sae import SparseAutoencoder, StandardSparseAutoencoder

    cfg = VisionModelSAERunnerConfig(d_in=a.d_in, expansion_factor=a.d_sae // a.d_in, activation_fn_str="topk",
                                     activation_fn_kwargs={"k": a.k}, cls_token_only=True, normalize_activations=norm,
                                     _device="cpu", log_to_wandb=False, hook_point_layer=11, checkpoint_path=str(tmp))
    model = StandardSparseAutoencoder(cfg)
    with torch.no_grad():
        model.b_dec.normal_(0, 0.3)
        model.b_enc.normal_(0, 0.1)
    model.save_model(str(tmp / "n_images_100.pt"))  # ViT-Prisma's own writers
    cfg.save_config(str(tmp / "config.json"))
    lib = SparseAutoencoder.load_from_pretrained(str(tmp / "n_images_100.pt"))
    with torch.no_grad():
        _, z = lib.encode(x)
        rec = lib.decode(z)
    return (tmp, None, {}), z, rec


CASES = {
    "sparsify (topk)": ("sparsify", sparsify_case, ()),
    "overcomplete TopKSAE": ("overcomplete", overcomplete_case, ("TopKSAE",)),
    "overcomplete SAE (relu)": ("overcomplete", overcomplete_case, ("SAE",)),
    "overcomplete JumpSAE": ("overcomplete", overcomplete_case, ("JumpSAE",)),
    "overcomplete BatchTopKSAE": ("overcomplete", overcomplete_case, ("BatchTopKSAE",)),
    "saev 0.1 relu (+ input norm folded)": ("saev", saev_case, ()),
    "visaebench topk (+ norm folded)": ("visaebench", visaebench_case, ("topk",)),
    "visaebench batchtopk (+ norm folded)": ("visaebench", visaebench_case, ("batchtopk",)),
    "visaebench jumprelu (+ norm folded)": ("visaebench", visaebench_case, ("jumprelu",)),
    "vit-prisma topk": ("vit_prisma", prisma_case, ("none",)),
    "vit-prisma topk, run-time layer_norm": ("vit_prisma", prisma_case, ("layer_norm",)),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--n", type=int, default=512)
    a = p.parse_args(argv)
    from sae_lens_vision_steer.sae.formats import ImportOptions
    from sae_lens_vision_steer.sae.loading import load_vision_sae

    torch.manual_seed(0)
    x = torch.randn(a.n, a.d_in) * 2 + torch.randn(a.d_in)
    print(f"d_in={a.d_in} d_sae={a.d_sae} k={a.k} n={a.n}; torch {torch.__version__}")
    for name, (lib, fn, extra) in CASES.items():
        try:
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
                (source, sae_id, opts), lat_ref, rec_ref = fn(Path(tmp), a, x, *extra)
                sae, _ = load_vision_sae(source, sae_id, options=ImportOptions(hook_name="blocks.11.hook_resid_post",
                                                                               **opts))
                lat = sae.encode(x)
                rec = sae.decode(lat)
        except ImportError as e:
            print(f"{name:38s} skipped: {lib} does not import ({e})")
            continue
        same = bool(torch.equal(lat != 0, lat_ref != 0))
        print(f"{name:38s} latents {float((lat - lat_ref).abs().max()):.2e} "
              f"(max |.| {float(lat_ref.abs().max()):7.2f}, "
              f"L0 {float((lat_ref != 0).sum(-1).float().mean()):6.1f}, same support {same})  "
              f"recon {float((rec - rec_ref).abs().max()):.2e} (max |.| {float(rec_ref.abs().max()):7.2f})")


if __name__ == "__main__":
    sys.exit(main())
