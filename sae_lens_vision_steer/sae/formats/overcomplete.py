"""overcomplete (Kempner) SAEs: a state dict (`torch.save(sae.state_dict())` or safetensors) plus the
constructor's arguments, which overcomplete does not save.

The arguments come from `ImportOptions.constructor` or from `overcomplete.json` next to the weights:
`{"class": "TopKSAE" | "SAE" | "JumpSAE" | "BatchTopKSAE", "input_shape": d, "nb_concepts": M,
"top_k": k, "encoder_module": null | "linear", "dictionary_params": {"normalization": "l2", ...},
"running_threshold": t}`. `running_threshold` is BatchTopKSAE's inference threshold, a plain attribute
that `state_dict()` does not hold: read it from the model (`float(sae.running_threshold)`).

In eval mode the encoder gives `c = relu(x W^T + b)` (`encoder.final_block.0`); TopKSAE keeps the top k
(SAELens `topk`), SAE keeps `c` (`standard`), JumpSAE keeps `c >= exp(thresholds)` and BatchTopKSAE
`c >= running_threshold` (`jumprelu`, threshold moved one float down: exactly `>=`). The decoder is the
dictionary `normalization(_weights) * exp(multiplier)` (what `DictionaryLayer` fuses at `.eval()`) with
no bias. Refused: other encoders (MLP, attention, ResNet: not affine), tied encoders, custom
normalisation callables, matching-pursuit, archetypal and quantised SAEs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ...core.errors import InputError, UsageError
from .common import ImportOptions, build_sae, check_shapes, import_metadata, threshold_at_or_above, torch_load

NAME = "overcomplete"
DESCRIPTION = "overcomplete: a state dict (.pt/.safetensors) + the constructor arguments (overcomplete.json)"
CONSTRUCTOR_FILE = "overcomplete.json"
CLASSES = {"TopKSAE": "topk", "SAE": "standard", "JumpSAE": "jumprelu", "BatchTopKSAE": "jumprelu"}
_EPS = 1e-8  # overcomplete.sae.dictionary's normalisation epsilon
NORMALIZATIONS = {
    "l2": lambda w: w / (torch.norm(w, p=2, dim=1, keepdim=True) + _EPS),
    "max_l2": lambda w: w / torch.amax(torch.norm(w, p=2, dim=1, keepdim=True), dim=0, keepdim=True),
    "l1": lambda w: w / (torch.norm(w, p=1, dim=1, keepdim=True) + _EPS),
    "max_l1": lambda w: w / torch.amax(torch.norm(w, p=1, dim=1, keepdim=True), dim=0, keepdim=True),
    "identity": lambda w: w,
}
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")


def weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES) if path.is_dir() else []
    if len(found) != 1:
        raise InputError(f"{path}: expected one overcomplete state dict ({', '.join(WEIGHT_SUFFIXES)}); found "
                         f"{[p.name for p in found]}")
    return found[0]


def detect(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent
    return (folder / CONSTRUCTOR_FILE).is_file()


def constructor(path: Path, options: ImportOptions) -> dict[str, Any]:
    if options.constructor is not None:
        return dict(options.constructor)
    folder = path if path.is_dir() else path.parent
    if not (folder / CONSTRUCTOR_FILE).is_file():
        raise UsageError(f"{path}: overcomplete does not save its constructor arguments; pass constructor="
                         f"{{'class': 'TopKSAE', 'input_shape': ..., 'nb_concepts': ..., 'top_k': ...}} or write "
                         f"them to {CONSTRUCTOR_FILE} next to the weights", arguments=("constructor",))
    return json.loads((folder / CONSTRUCTOR_FILE).read_text())


def load(path: Path, options: ImportOptions, where: str, repo_id: str | None = None):
    args = constructor(path, options)
    cls = args.get("class")
    if cls not in CLASSES:
        raise InputError(f"{where}: overcomplete class {cls!r} is not supported (supported: {sorted(CLASSES)}; "
                         "matching-pursuit, archetypal, quantised and relaxed-archetypal SAEs are not SAELens SAEs)")
    if args.get("encoder_module") not in (None, "linear"):
        raise InputError(f"{where}: encoder {args['encoder_module']!r} is not affine (only the default 'linear' "
                         "encoder maps onto a SAELens SAE)")
    dict_params = args.get("dictionary_params") or {}
    norm = dict_params.get("normalization", "l2")
    if norm not in NORMALIZATIONS:
        raise InputError(f"{where}: dictionary normalization {norm!r} is not one of {sorted(NORMALIZATIONS)}")
    d_in, d_sae = args.get("input_shape"), args.get("nb_concepts")
    if not isinstance(d_in, int) or not isinstance(d_sae, int):
        raise InputError(f"{where}: the constructor arguments need integer input_shape and nb_concepts")
    wfile = weights_file(path)
    if wfile.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(wfile))
    else:
        raw = torch_load(wfile, options.allow_pickle)
    if "encoder.weight" in raw and "encoder.final_block.0.weight" not in raw:
        raise InputError(f"{where}: a tied/untied TieableEncoder state dict ('encoder.weight') is not supported")
    expected = {"encoder.final_block.0.weight": (d_sae, d_in), "encoder.final_block.0.bias": (d_sae,),
                "dictionary._weights": (d_sae, d_in), "dictionary.multiplier": ()}
    if cls == "JumpSAE":
        expected["thresholds"] = (d_sae,)
    check_shapes(raw, expected, where)
    dictionary = NORMALIZATIONS[norm](raw["dictionary._weights"].to(torch.float32))
    dictionary = dictionary * torch.exp(raw["dictionary.multiplier"].to(torch.float32))
    weights = {"W_enc": raw["encoder.final_block.0.weight"].T, "b_enc": raw["encoder.final_block.0.bias"],
               "W_dec": dictionary, "b_dec": torch.zeros(d_in)}
    extra: dict[str, Any] = {}
    if cls == "TopKSAE":
        extra["k"] = int(args.get("top_k") or max(d_sae // 10, 1))  # overcomplete's default
    elif cls == "JumpSAE":
        weights["threshold"] = threshold_at_or_above(torch.exp(raw["thresholds"].to(torch.float32)))
    elif cls == "BatchTopKSAE":
        if args.get("running_threshold") is None:
            raise UsageError(f"{where}: BatchTopKSAE's inference threshold (running_threshold) is not in the state "
                             "dict; add it to the constructor arguments (float(sae.running_threshold))",
                             arguments=("constructor",))
        weights["threshold"] = threshold_at_or_above(torch.full((d_sae,), float(args["running_threshold"])))
    source = {"format": NAME, "library": "overcomplete", "class": cls, "file": wfile.name}
    meta = import_metadata(options, {}, source, where)
    return build_sae(CLASSES[cls], weights, meta, where, apply_b_dec_to_input=False, **extra)
