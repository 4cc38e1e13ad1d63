"""Does an SAE belong to this model? Its recorded weights (fingerprint) and architecture against the model's;
and where is the model an SAE records (`find_recorded_model`)?

A model is identified by its weights, not by the path or name it was loaded with: an SAE trained on
`local-dir:assets/tiny-clip` is accepted on `local-dir:../assets/tiny-clip` or an absolute path to the
same folder (or a copy), because the image tower's weight fingerprint is the same.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from sae_lens import SAE

from ..core.errors import MissingInputError, UsageError
from ..core.identity import local_dir_of, model_fingerprint, model_label, portable_model_name
from ..models.families.open_clip_vit import tag_wants_quick_gelu

# The recorded architecture fields compared with the model's (`identity.MODEL_CONFIG_FIELDS`); `eps` and
# `image_size` differences are said through the others or do not change the hook's meaning.
ARCHITECTURE_FIELDS = ("family", "pooling", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_tokens",
                       "n_prefix_tokens", "patch_size", "act_fn")


def _base_name(model_name: str) -> str:
    model_name = portable_model_name(model_name)
    return model_name[: -len("-quickgelu")] if model_name.endswith("-quickgelu") else model_name


def _architecture_differences(recorded: dict[str, Any], cfg: Any) -> list[str]:
    diffs = []
    for key in ARCHITECTURE_FIELDS:
        if key not in recorded or not hasattr(cfg, key):
            continue
        mine = getattr(cfg, key)
        mine = list(mine) if isinstance(mine, tuple) else mine
        if recorded[key] != mine:
            label = "model family" if key == "family" else key
            diffs.append(f"{label} {recorded[key]!r} (this model: {mine!r})")
    return diffs


def check_sae_matches_model(sae: SAE, model: Any) -> None:
    """Refuse an SAE made on another architecture or activation function; warn on other weights.

    The weights decide: an SAE whose recorded `model_fingerprint` equals the model's is accepted whatever
    name or path each was loaded with (only the activation function is still compared: the same weights
    under GELU and QuickGELU are two networks). Otherwise the recorded architecture (`model_config`: family,
    layers, widths, tokens, patch size) and activation must match, and other weights of the same
    architecture (a fine-tune, random weights in a test) give a warning. An SAE without a recorded
    architecture (made elsewhere, or by an old version) is compared by model name instead (`ViT-B-32` and
    `ViT-B-32-quickgelu` are one architecture; `local-dir:` names by their folder's name). Fields the SAE
    (or the model, e.g. a wrapped `custom` one) does not record are not compared.
    """
    meta, cfg = sae.cfg.metadata, model.cfg
    diffs = []
    act = meta.get("act_fn")
    if act and act != getattr(cfg, "act_fn", act):
        diffs.append(f"activation {act!r} (this model: {cfg.act_fn!r})")
    recorded_fp = meta.get("model_fingerprint")
    same_weights = bool(recorded_fp) and recorded_fp == model_fingerprint(model)
    if not same_weights:
        recorded_config = meta.get("model_config") or {}
        name = meta.get("model_name")
        known = cfg.model_name not in (None, "custom")
        if recorded_config:
            diffs += [d for d in _architecture_differences(recorded_config, cfg) if not d.startswith("act_fn")]
        elif name and known and _base_name(name) != _base_name(cfg.model_name):
            diffs.append(f"model {name!r} (this model: {cfg.model_name!r})")
        other_tag = known and "pretrained" in meta and meta.get("pretrained") != cfg.pretrained
        if not diffs and (recorded_fp or other_tag):
            # Same network, other weights (a fine-tune, random weights in a test): allowed, but said.
            what = (f"weights {meta.get('pretrained')!r} of {name}" if meta.get("pretrained") != cfg.pretrained
                    else f"other weights of {name}")
            fps = (f" (weight fingerprint {recorded_fp}; this model's: {model_fingerprint(model)})"
                   if recorded_fp else "")
            warnings.warn(f"this SAE was trained on {what}{fps}; this model is "
                          f"{model_label(cfg.model_name, cfg.pretrained)}", stacklevel=3)
    if diffs:
        raise UsageError("this SAE was trained on a different model: " + "; ".join(diffs)
                         + ". Load the model it names, or pass check_model=False to use it anyway.")
    name = meta.get("model_name")
    if not act and name and meta.get("pretrained"):
        try:
            stale = tag_wants_quick_gelu(name, meta["pretrained"]) and not name.endswith("-quickgelu")
        except Exception:  # a name or tag open_clip does not know
            stale = False
        if stale:
            warnings.warn(f"this SAE records no activation function; {name}/{meta['pretrained']} was built with "
                          "plain GELU by earlier versions of this package (the weights need QuickGELU), so it was "
                          "trained on a slightly different network. Retrain it to be exact.", stacklevel=3)


def model_folder_candidates(meta: dict[str, Any], sae_dir: str | Path | None = None) -> list[Path]:
    """Where a `local-dir:` model an SAE records may be, in the order looked: the absolute folder recorded
    when it was trained (`model_dir`), then the recorded path and the folder's name (also under `assets/`)
    relative to the working directory and to each folder above the SAE's."""
    folder = local_dir_of(meta.get("model_name"))
    if folder is None:
        return []
    out: list[Path] = []
    if meta.get("model_dir"):
        out.append(Path(meta["model_dir"]))
    name = Path(folder).name
    if Path(folder).is_absolute():
        out.append(Path(folder))
    relative = ([] if Path(folder).is_absolute() else [Path(folder)]) + [Path(name), Path("assets") / name]
    bases = [Path.cwd()]
    if sae_dir is not None:
        bases += list(Path(sae_dir).expanduser().resolve().parents)
    for base in bases:
        out += [base / r for r in relative]
    seen, unique = set(), []
    for p in out:
        key = str(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def find_recorded_model(meta: dict[str, Any], sae_dir: str | Path | None = None) -> str | None:
    """The model name to load for an SAE's recorded model: the recorded name itself, except for a
    `local-dir:` model, which is looked for (`model_folder_candidates`) and returned as `local-dir:<found
    folder>`; a folder that is not there is a `MissingInputError` saying where it looked and how to pass
    the model. Whether the found folder holds the same weights is checked when the SAE meets the model
    (`check_sae_matches_model`)."""
    name = meta.get("model_name")
    if local_dir_of(name) is None:
        return name
    candidates = model_folder_candidates(meta, sae_dir)
    for path in candidates:
        if (path / "open_clip_config.json").is_file():
            return f"local-dir:{path}"
    fp = meta.get("model_fingerprint")
    shown = [str(p) for p in candidates[:6]] + (["..."] if len(candidates) > 6 else [])
    raise MissingInputError(
        f"the SAE was trained on {portable_model_name(name)}" + (f" (weight fingerprint {fp})" if fp else "")
        + f", and no folder of that model was found (looked for open_clip_config.json in: {', '.join(shown)}); "
        f"pass --model local-dir:PATH with the folder of those weights")
