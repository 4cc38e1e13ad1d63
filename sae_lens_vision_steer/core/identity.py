"""What a cache, an SAE and a results file record about the CLIP model and the data they came from, and
every fingerprint: weights (`model_fingerprint`, `text_fingerprint`, `tensors_fingerprint`), data
(`dataset_fingerprint`) and preprocessing (`stable_repr`). Duck-typed: nothing here imports a model.

`model_identity(model)` is the single place where the model's identity fields are assembled; the
activation cache's request, the SAE metadata and `results.json` all take them from here, so a new
field (e.g. the tower's activation function) added here is recorded everywhere.

Data set ids are portable (`cifar100`, `uoft-cs/cifar100`, `imagefolder:photos`): they go into
published metadata. The local folder a data set was read from is recorded only in local files
(`data_dir` in a cache's `metadata.json`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

# Model schemas whose weights come from the name itself (open_clip ignores `pretrained` for them).
WEIGHTS_FROM_NAME = ("hf-hub:", "local-dir:")


# The tower's shape and activation, from `HookedCLIPConfig` (a full TL config has ~90 fields).
MODEL_CONFIG_FIELDS = ("family", "pooling", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "n_tokens",
                       "n_prefix_tokens", "embed_dim", "image_size", "patch_size", "act_fn", "eps")


def model_identity(model: Any) -> dict[str, Any]:
    """`model_name` (portable: `local-dir:<folder name>`, whatever path the model was loaded from),
    `pretrained`, `act_fn` (`gelu` or `quick_gelu`: `ViT-B-32` with the `openai` tag is built with
    QuickGELU), `model_kwargs` (the extra `open_clip.create_model` arguments, when known), `model_config`
    (the tower's real shape: layers, widths, patch size, ...), `model_fingerprint` (the image tower's
    weights: what identifies the model) and, for a `local-dir:` model, `model_dir` (the absolute folder:
    local files only, dropped when published; where `eval --sae` looks for the model first)."""
    cfg = model.cfg
    config = {k: getattr(cfg, k) for k in MODEL_CONFIG_FIELDS if hasattr(cfg, k)}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    folder = local_dir_of(cfg.model_name)
    return {
        "model_name": portable_model_name(cfg.model_name),
        "pretrained": cfg.pretrained,
        "act_fn": getattr(cfg, "act_fn", None),
        "model_kwargs": dict(getattr(cfg, "model_kwargs", None) or {}),
        "model_config": config,
        "model_fingerprint": model_fingerprint(model),
        **({"model_dir": str(Path(folder).expanduser().resolve())} if folder else {}),
    }


def local_dir_of(model_name: str | None) -> str | None:
    """The folder of a `local-dir:DIR` name (as written), else None."""
    if model_name and model_name.startswith("local-dir:"):
        return model_name.split(":", 1)[1]
    return None


def weights_from_name(model_name: str | None) -> bool:
    return bool(model_name) and model_name.startswith(WEIGHTS_FROM_NAME)


def portable_model_name(model_name: str | None) -> str | None:
    """`local-dir:/home/you/ckpt`, `local-dir:../ckpt` -> `local-dir:ckpt`: the folder's name only (no local
    path in recorded or published files; the weights are identified by their fingerprint)."""
    folder = local_dir_of(model_name)
    if folder is not None:
        return "local-dir:" + Path(folder).expanduser().resolve().name
    return model_name


def model_label(model_name: str | None, pretrained: str | None) -> str:
    """`ViT-B-32/openai`; `local-dir:m` alone (its weights come with the name); `ViT-B-32 (random weights)`."""
    if pretrained:
        return f"{model_name}/{pretrained}"
    return str(model_name) if weights_from_name(model_name) else f"{model_name} (random weights)"


def stock_config_differences(model_name: str | None, model_config: dict[str, Any] | None) -> dict[str, Any]:
    """Fields of `model_config` that differ from open_clip's stock config of `model_name` (e.g. a
    `--model-kwargs` that shrinks the tower); empty when unknown or equal."""
    if not model_name or not model_config:
        return {}
    try:
        import open_clip

        stock = open_clip.get_model_config(model_name)
    except Exception:
        return {}
    if not stock:
        return {}
    vision = stock.get("vision_cfg", {})
    image_size = vision.get("image_size")
    expected = {"n_layers": vision.get("layers"), "d_model": vision.get("width"), "embed_dim": stock.get("embed_dim"),
                "patch_size": vision.get("patch_size"),
                "image_size": image_size[0] if isinstance(image_size, (list, tuple)) else image_size}
    return {k: model_config[k] for k, v in expected.items()
            if v is not None and k in model_config and model_config[k] != v}


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """`dataset` (portable id), `dataset_path` (where it comes from, portable: a Hub repo or the id),
    `split`, and `data_dir` (the local folder, absolute; for local files only)."""
    dataset_id = getattr(dataset, "dataset_id", type(dataset).__name__)
    data_dir = getattr(dataset, "data_dir", None)
    return {"dataset": dataset_id, "dataset_path": getattr(dataset, "hub_repo", None) or dataset_id,
            "split": getattr(dataset, "split", None), "data_dir": None if data_dir is None else str(data_dir)}


# ---------------------------------------------------------------------------------- fingerprints
def tensors_fingerprint(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over named tensors' names and bytes (hashed in place, no copy): 16 hex digits."""
    h = hashlib.sha256()
    for name, t in (tensors.items() if isinstance(tensors, Mapping) else tensors):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def model_fingerprint(model: Any) -> str:
    """sha256 over the image tower's weights: tells apart two random-weight models of one name, and
    recognises one model's weights whatever path they were loaded from. Remembered on the model until a
    weight tensor is replaced or changed in place (torch's version counters), so checks repeat for free."""
    tensors = model.vision_state_dict()
    key = tuple((name, t.data_ptr(), t._version, t.dtype) for name, t in tensors.items())
    memo = getattr(model, "_vision_steer_fingerprint", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    fingerprint = tensors_fingerprint(tensors)
    try:
        object.__setattr__(model, "_vision_steer_fingerprint", (key, fingerprint))
    except (AttributeError, TypeError):  # a model that takes no attributes: computed each time
        pass
    return fingerprint


def text_fingerprint(model: Any) -> str:
    """sha256 over the model's weights outside the image tower (text tower, projection, logit scale)."""
    vision = {t.data_ptr() for t in model.vision_state_dict().values()}
    h = hashlib.sha256()
    for name, t in model.clip.state_dict().items():
        if t.data_ptr() in vision and t.numel():
            continue
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def dataset_fingerprint(dataset: Any) -> str:
    """sha256 over the selected items and their labels (changes with `limit` and with the split)."""
    if callable(getattr(dataset, "fingerprint", None)):  # a union (data/union.py): combined from its members'
        return dataset.fingerprint()
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    indices = getattr(dataset, "indices", None)
    if indices is not None:
        h.update(np.asarray(indices, dtype=np.int64).tobytes())
    files = getattr(dataset, "relative_paths", None)
    if files is not None:  # folder data sets: which files, relative to the data folder (portable)
        h.update("\n".join(files).encode())
    labels = getattr(dataset, "subset_labels", None)
    if labels is not None:
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def stable_repr(obj: Any) -> str:
    """`repr` without memory addresses (a Lambda transform's repr has one), so it compares across runs."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))
