"""What every SAE format module shares: the import options, safe reading of torch files, building a
SAELens `SAE` from named weights with shape checks, and folding a recorded input normalisation.

A format module maps a library's files onto one of SAELens' inference architectures (`standard`,
`topk`, `jumprelu`, `gated`) and returns that SAE with our metadata. Anything it cannot represent exactly is
refused with the reason (`InputError`); nothing is approximated.
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE

from ...core.errors import InputError, MissingInputError, UsageError
from ...core.positions import POSITION_NAMES, seqpos_slice


@dataclass(frozen=True)
class ImportOptions:
    """What the user tells the loader that a file may not say (each overrides what the file records).

    `hook_name`: the hook on our `HookedCLIP` the SAE reads (e.g. `blocks.11.hook_resid_post`).
    `model_name` / `pretrained`: the model it was trained on, in our naming (`ViT-B-32` + `openai`,
    `hf-hub:<repo>`, `hf:<repo>`, `timm:<name>`). `positions`: `cls`, `patches` or `all`.
    `input_norm`: the normalisation the source applied to activations before its SAE when the file does
    not record it (saev, ViSAEBench): `"none"`, or `{"mean": [d_in floats] or a float, "std": float}`, or a
    path to a `.pt` (weights_only) / `.json` file holding those keys; it is folded into the weights.
    `allow_pickle`: read a torch file that needs full unpickling (runs code from the file; trusted files only).
    `constructor`: overcomplete's constructor arguments (see `formats/overcomplete.py`).
    """

    hook_name: str | None = None
    model_name: str | None = None
    pretrained: str | None = None
    positions: str | None = None
    input_norm: Any = None
    allow_pickle: bool = False
    constructor: dict[str, Any] | None = None


def torch_load(path: Path, allow_pickle: bool = False, stubs: dict[str, type] | None = None) -> Any:
    """`torch.load(weights_only=True)`; `stubs` maps pickled class names (`module.Class`) to inert classes
    that receive the object's attributes without running its code. Anything else that needs full unpickling
    is refused naming the file, unless `allow_pickle`."""
    globs = [(cls, name) for name, cls in (stubs or {}).items()]
    try:
        with torch.serialization.safe_globals(globs):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needs = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not needs:  # not a pickle torch.load understands at all
            raise InputError(f"{path} cannot be read as a torch file ({_last_line(e)})") from None
        if not allow_pickle:
            raise InputError(f"{path} needs full unpickling (it holds a pickled {needs.group(1)}), which can run code "
                             "from the file; it was not loaded. Pass allow_pickle=True only if you trust it",
                             arguments=("allow_pickle",)) from None
    except (RuntimeError, EOFError) as e:  # a damaged or truncated torch file
        raise InputError(f"{path} cannot be read as a torch file ({_last_line(e)})") from None
    return torch.load(path, map_location="cpu", weights_only=False)


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 and lines[0].startswith("Weights only") else lines[0] if lines else
            type(e).__name__)[:200]


class Opaque:
    """Stands in for a pickled object of a library we do not import: keeps its attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def check_shapes(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor present and of the shape the config implies; each difference is named."""
    problems = []
    for name, shape in expected.items():
        if name not in weights:
            problems.append(f"{name} is missing")
        elif tuple(weights[name].shape) != tuple(shape):
            problems.append(f"{name} has shape {list(weights[name].shape)}, the config implies {list(shape)}")
    if problems:
        raise InputError(f"{where}: the weights do not match the config: " + "; ".join(problems))


def build_sae(architecture: str, weights: dict[str, torch.Tensor], metadata: dict[str, Any], where: str,
              **cfg: Any) -> SAE:
    """A SAELens SAE of `architecture` holding `weights` (W_enc [d_in, d_sae] etc.), in float32 on CPU."""
    d_in, d_sae = weights["W_enc"].shape
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "gated":
        expected |= {"b_gate": (d_sae,), "r_mag": (d_sae,), "b_mag": (d_sae,)}
    else:
        expected["b_enc"] = (d_sae,)
    if architecture == "jumprelu":
        expected["threshold"] = (d_sae,)
    check_shapes(weights, expected, where)
    if "k" in cfg and not 0 < int(cfg["k"]) <= d_sae:
        raise InputError(f"{where}: k={cfg['k']} is not between 1 and the number of latents ({d_sae})")
    sae = SAE.from_dict({"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32",
                         "device": "cpu", "metadata": metadata, **cfg})
    state = {k: weights[k].detach().to(torch.float32).contiguous() for k in expected}
    sae.load_state_dict(state, strict=True)
    return sae


def threshold_at_or_above(t: torch.Tensor) -> torch.Tensor:
    """A JumpReLU threshold for a source that keeps `h >= t`: SAELens keeps `h > threshold`, and for
    float32 `h > nextafter(t, -inf)` holds exactly when `h >= t`."""
    t = t.to(torch.float32)
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def read_input_norm(spec: Any, d_in: int, where: str) -> tuple[torch.Tensor, float] | None:
    """`None` for `"none"`, else (mean [d_in], scale) from a dict or a `.pt` / `.json` file."""
    if isinstance(spec, str) and spec == "none":
        return None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise MissingInputError(f"input normalisation file {path} not found")
        if path.suffix == ".json":
            import json

            spec = json.loads(path.read_text())
        else:
            spec = torch_load(path)
    if not isinstance(spec, dict) or "mean" not in spec or not ({"std", "scale"} & set(spec)):
        raise UsageError(f"{where}: input_norm must be 'none', or hold 'mean' and 'std' (or 'scale'); "
                         f"got {spec!r:.200}", arguments=("input_norm",))
    mean = torch.as_tensor(spec["mean"], dtype=torch.float64)
    mean = mean.expand(d_in) if mean.ndim == 0 else mean.reshape(-1)
    scale = float(torch.as_tensor(spec.get("std", spec.get("scale"))).reshape(()))
    if mean.shape[0] != d_in or not math.isfinite(scale) or scale <= 0:
        raise UsageError(f"{where}: input_norm needs a mean of {d_in} values and a positive std; "
                         f"got {mean.shape[0]} values and std {scale}", arguments=("input_norm",))
    return mean, scale


def fold_input_norm(sae: SAE, norm: tuple[torch.Tensor, float]) -> None:
    """The source fed its SAE `(x - mean) / scale`: fold that affine map into the weights with SAELens'
    own `fold_activation_whitening`, so the SAE reads raw activations and reconstructs them."""
    mean, scale = norm
    eye = torch.eye(sae.cfg.d_in, dtype=torch.float64)
    sae.fold_activation_whitening(mean, eye / scale, eye * scale)
    sae.to(torch.float32)


def import_metadata(options: ImportOptions, recorded: dict[str, Any], source: dict[str, Any],
                    where: str) -> dict[str, Any]:
    """Our vision metadata for an imported SAE: what the source records, overridden by `options`, and
    `source` (format, library, file; it is credited when the SAE is re-published)."""
    given = {"hook_name": options.hook_name, "model_name": options.model_name, "pretrained": options.pretrained,
             "positions": options.positions}
    meta = {k: v for k, v in recorded.items() if v is not None}
    meta.update({k: v for k, v in given.items() if v is not None})
    if meta.get("positions") not in (None, *POSITION_NAMES):
        raise UsageError(f"{where}: positions must be one of {POSITION_NAMES}, got {meta['positions']!r}",
                         arguments=("positions",))
    if not meta.get("hook_name"):
        raise UsageError(f"{where}: the {source['format']} files do not say which hook of our model the SAE reads; "
                         "pass hook_name (e.g. 'blocks.11.hook_resid_post')" + source.get("hook_hint", ""),
                         arguments=("hook_name",))
    source = {k: v for k, v in source.items() if k != "hook_hint"}
    meta["source"] = source
    meta["model_class_name"] = "HookedCLIP"
    if meta.get("positions"):
        meta["seqpos_slice"] = seqpos_slice(meta["positions"])  # a tower's register tokens are not recorded
    return meta
