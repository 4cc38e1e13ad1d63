"""The vision metadata this package stores in a SAELens SAE's `cfg.metadata`, and checks on it.

Keys (all optional for SAEs trained elsewhere): `hook_name`, `model_name`, `pretrained`,
`model_kwargs` (extra `open_clip.create_model` arguments), `model_config` (the tower's real shape),
`model_fingerprint`, `positions`, `dataset` (a portable id), `dataset_path`, `split`,
`dataset_members` (a union's data sets: id, path, split, image count; `union.py`),
`n_training_samples`, `activation_mean` (list of `d_in` floats), `heldout_fvu`, `mean_l0`,
`dead_fraction`, `evaluation` (how many training and held-out rows of how many those three figures come
from), `objective` (`topk` or `pass`), `w_aux`, `source` (an imported SAE's origin: format, library, file;
`formats/`).

SAELens' own metadata fields are filled where they mean something for images: `model_class_name`
(`HookedCLIP`), `model_from_pretrained_kwargs` (= `model_kwargs`), `dataset_path`, `context_size`
(tokens per image) and `seqpos_slice` (the token positions trained on: CLS `[0, 1]`, patches
`[1, None]`, all `[None]`).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any, Iterator

import torch
from sae_lens import SAE

if TYPE_CHECKING:  # the models package imports this module's callers; import HookedCLIP for types only
    from ..models.hooked import HookedViT as HookedCLIP
from ..core.errors import UsageError
from ..core.identity import model_fingerprint, model_label, portable_model_name
from ..core.positions import positions_label, seqpos_slice

VISION_METADATA_KEYS = (
    "hook_name", "model_name", "pretrained", "act_fn", "model_fingerprint", "model_kwargs", "model_config", "positions",
    "dataset",
    "dataset_path", "split", "dataset_members", "n_training_samples", "activation_mean", "heldout_fvu", "mean_l0", "dead_fraction",
    "evaluation", "objective", "w_aux", "source",
)
# The cache request's model fields copied into the SAE metadata (see identity.model_identity).
MODEL_FIELDS = ("model_name", "pretrained", "act_fn", "model_kwargs", "model_config", "model_fingerprint", "model_dir")
# Local paths: kept in local files, dropped from published metadata.
LOCAL_FIELDS = ("data_dir", "model_dir")



@contextlib.contextmanager
def no_language_model_advice() -> Iterator[None]:
    """Silence, inside the block only, SAELens' warning on every SAE built with non-empty
    `model_from_pretrained_kwargs`: its advice is for HookedSAETransformer language models, not image towers.
    (No filter is installed on import: a user's own SAELens calls keep their warnings.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*This SAE has non-empty model_from_pretrained_kwargs")
        yield


def vision_metadata(sae: SAE) -> dict[str, Any]:
    meta = sae.cfg.metadata
    return {k: meta.get(k) for k in VISION_METADATA_KEYS if k in meta}


def training_metadata(request: dict[str, Any], hook_name: str, objective: str,
                      activation_mean: list[float]) -> dict[str, Any]:
    """The metadata of an SAE trained on a cache made with `request` (the single place it is assembled)."""
    positions = request["positions"]
    return {
        "hook_name": hook_name,
        **{k: request.get(k) for k in MODEL_FIELDS if k != "model_dir" or request.get(k)},
        "positions": positions,
        "dataset": request["dataset"],
        "dataset_path": request.get("dataset_path") or request["dataset"],
        "split": request["split"],
        # A union cache (union.py): every member data set, portable (no local folder).
        **({"dataset_members": [{k: m.get(k) for k in ("dataset", "dataset_path", "split", "n_images")}
                                for m in request["members"]]} if request.get("members") else {}),
        "objective": objective,
        "activation_mean": activation_mean,
        # SAELens' fields
        "model_class_name": "HookedCLIP",
        "model_from_pretrained_kwargs": dict(request.get("model_kwargs") or {}),
        "context_size": (request.get("model_config") or {}).get("n_tokens"),
        "seqpos_slice": seqpos_slice(positions, (request.get("model_config") or {}).get("n_prefix_tokens", 1)),
    }


def portable_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata for publishing: no local paths (`local-dir:/home/you/m` -> `local-dir:m`, no `data_dir` or
    `model_dir`; the weights stay identified by `model_fingerprint`)."""
    out = {k: v for k, v in meta.items() if k not in LOCAL_FIELDS}
    if "model_name" in out:
        out["model_name"] = portable_model_name(out["model_name"])
    return out


def sae_hook_name(sae: SAE, hook_name: str | None = None) -> str:
    """The hook an SAE belongs to: the one in its metadata; a different `hook_name` is refused
    (an SAE applied where it was not trained gives silently wrong results)."""
    recorded = sae.cfg.metadata.get("hook_name")
    if hook_name and recorded and hook_name != recorded:
        raise UsageError(f"the SAE was trained on hook {recorded!r}, not {hook_name!r} (--hook); leave --hook out "
                         "to use the SAE's hook, or use an SAE trained on that hook")
    name = hook_name or recorded
    if not name:
        raise UsageError("the SAE's metadata records no hook_name; pass hook_name= explicitly")
    return name


def check_sae_positions(sae: SAE, positions: Any, where: str = "here") -> None:
    """Refuse applying an SAE at token positions it was not trained on. An SAE trained on `all`
    tokens may be applied anywhere; one with no recorded positions is not checked."""
    trained = sae.cfg.metadata.get("positions")
    used = positions_label(positions)
    if trained is None or trained == "all" or trained == used:
        return
    raise UsageError(f"the SAE was trained on positions={trained!r} but is applied to {used!r} tokens {where}; "
                     f"use an SAE trained on {used!r} tokens (vision-steer cache --positions {used})")


def activation_mean(sae: SAE, warn: bool = True) -> torch.Tensor:
    """The training activation mean recorded in the metadata; falls back to `b_dec` with a warning."""
    mean = sae.cfg.metadata.get("activation_mean")
    if mean is not None:
        return torch.as_tensor(mean, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    if warn:
        warnings.warn("SAE metadata has no activation_mean; using b_dec as the mean for FVU", stacklevel=2)
    return sae.b_dec.detach()


def check_sae_fits_hook(sae: SAE, model: HookedCLIP, hook_name: str) -> None:
    """Clear errors for a hook the model lacks or an SAE whose width does not match it."""
    from .match import check_sae_matches_model

    model.check_hook_name(hook_name)
    check_sae_matches_model(sae, model)  # another model, other weights, or another activation: refused
    width = model.hook_width(hook_name)
    if sae.cfg.d_in != width:
        raise UsageError(
            f"SAE d_in={sae.cfg.d_in} does not match hook {hook_name!r} of {model.cfg.model_name}, "
            f"whose width is {width}"
        )


def check_activation_cache_for_sae(cache: Any, sae: SAE, hook_name: str, what: str,
                                   model: HookedCLIP | None = None) -> None:
    """A cache used with an SAE (the FVU gate's `--reference-cache`, VS2++'s `--pool-cache`) must hold
    one CLS row per image at the SAE's hook, made by the same model (weight fingerprint, when `model`
    is given); each difference is named."""

    problems = []
    if cache.positions != "cls":
        problems.append(f"it holds positions={cache.positions!r} (one CLS row per image is needed; cache with "
                        "--positions cls)")
    if hook_name not in cache.hook_names:
        problems.append(f"it holds hooks {cache.hook_names}, not the SAE's hook {hook_name!r}")
    elif cache.d_in(hook_name) != sae.cfg.d_in:
        problems.append(f"its width at {hook_name!r} is {cache.d_in(hook_name)}, the SAE's d_in is {sae.cfg.d_in}")
    req = cache.metadata.get("request", {})
    meta = sae.cfg.metadata
    if meta.get("model_fingerprint") and req.get("model_fingerprint"):
        if meta["model_fingerprint"] != req["model_fingerprint"]:
            problems.append(f"it was made with other weights ({portable_model_name(req.get('model_name'))}, "
                            f"fingerprint {req['model_fingerprint']}) than the SAE's ({meta['model_fingerprint']})")
    elif (meta.get("model_name") and req.get("model_name")
          and portable_model_name(meta.get("model_name")) != portable_model_name(req.get("model_name"))):
        problems.append(f"it was made with {req.get('model_name')!r}, the SAE with {meta.get('model_name')!r}")
    if model is not None and req.get("model_fingerprint") and req["model_fingerprint"] != model_fingerprint(model):
        problems.append(f"it was made with other model weights than the model loaded "
                        f"({model_label(req.get('model_name'), req.get('pretrained'))})")
    if problems:
        raise UsageError(f"{what} {cache.root} does not fit this SAE and model: " + "; ".join(problems))
