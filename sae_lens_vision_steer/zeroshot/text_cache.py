"""On-disk cache of zero-shot class weights (the class-prompt text embeddings).

Encoding the prompts is the slow part of setting up a zero-shot head on a CPU (200 classes x 80
templates is 16,000 prompts through the text tower), and it gives the same matrix every time for a
given model, class list and template list. `cached_class_weights` stores that matrix once and reads
it back on the next `eval` / `sweep` / `run` / `zeroshot`.

Where: `default_text_cache_dir()` = `$VISION_STEER_TEXT_CACHE`, else
`$XDG_CACHE_HOME/sae_lens_vision_steer/text`, else `~/.cache/sae_lens_vision_steer/text` (a user cache
dir, so runs into different output folders share it); the CLI's `--text-cache DIR` overrides both and
`--no-text-cache` (or `VISION_STEER_TEXT_CACHE=off`) turns it off.

One file per slot, `<model>-<tag>-<templates>-<digest>.safetensors`; the slot is the declared identity
(model name, pretrained tag, open_clip arguments, template-set name, class names). The file holds
`weights_EC` (float32 `[embed_dim, n_classes]`) and in its header the full key: the slot fields plus
the image-tower fingerprint (`activation_cache.model_fingerprint`), a fingerprint of the rest of the
model's weights (the text tower), the template strings, a format version, and the tensor's sha256.
A file whose key differs from the request (other weights under the same name, other template strings
under the same set name, damage) is refused with one logged line naming the difference and rebuilt.
Writes are atomic (temp file + rename), so concurrent writers of one slot never leave a torn file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core.fileio import write_bytes_atomic
from ..core.identity import model_fingerprint, model_identity, text_fingerprint
from ..core.requests import request_differences

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENV_VAR = "VISION_STEER_TEXT_CACHE"
OFF_VALUES = ("", "0", "off", "none", "false", "no")
# Key fields compared on read; the slot (file name) is built from the first five.
SLOT_FIELDS = ("model_name", "pretrained", "model_kwargs", "templates_name", "classnames")
KEY_FIELDS = SLOT_FIELDS + ("format_version", "model_fingerprint", "text_fingerprint", "templates", "shape")


def default_text_cache_dir() -> Path | None:
    """The cache folder from the environment; None when `VISION_STEER_TEXT_CACHE` turns it off."""
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return None if env.strip().lower() in OFF_VALUES else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae_lens_vision_steer" / "text"


def _slug(text: Any) -> str:
    return "none" if text is None else (re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_")[:40] or "none")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(model: Any, classnames: Sequence[str], templates: Sequence[str], templates_name: str | None) -> dict[str, Any]:

    ident = model_identity(model)
    templates = list(templates)
    return {"model_name": ident["model_name"], "pretrained": ident["pretrained"],
            "model_kwargs": json.loads(json.dumps(ident["model_kwargs"], default=str)),
            "templates_name": templates_name or f"custom-{_digest(templates)[:8]}",
            "classnames": list(classnames), "format_version": FORMAT_VERSION,
            "model_fingerprint": model_fingerprint(model), "text_fingerprint": text_fingerprint(model),
            "templates": templates}


def slot_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    slot = {k: key[k] for k in SLOT_FIELDS}
    name = "-".join(_slug(v) for v in (key["model_name"], key["pretrained"], key["templates_name"]))
    return Path(cache_dir) / f"{name}-{_digest(slot)}.safetensors"


def _describe(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    diffs = []
    for k, a, b in request_differences(found, wanted, KEY_FIELDS, only_wanted=True):  # one short line for a log
        a, b = repr(a), repr(b)
        diffs.append(k if len(a) + len(b) > 80 else f"{k} {a} vs {b}")
    return ", ".join(diffs) or "unknown difference"


def read_cached(path: Path, key: dict[str, Any]) -> tuple[torch.Tensor | None, str | None]:
    """`(weights_EC, None)` on a hit; `(None, why)` when the file is missing (why None) or refused."""
    from safetensors import safe_open

    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            weights = f.get_tensor("weights_EC")
        found = json.loads(header["key"])
    except Exception as e:  # truncated, not safetensors, no key: damaged
        return None, f"unreadable ({type(e).__name__})"
    if hashlib.sha256(weights.contiguous().numpy().tobytes()).hexdigest() != header.get("sha256"):
        return None, "its sha256 does not match its contents"
    wanted = {**key, "shape": found.get("shape")}
    if any(found.get(k) != wanted.get(k) for k in KEY_FIELDS if k != "shape"):
        return None, f"made differently: {_describe(found, wanted)}"
    if list(weights.shape) != [weights.shape[0], len(key["classnames"])]:
        return None, f"wrong shape {list(weights.shape)}"
    return weights, None


def write_cached(path: Path, key: dict[str, Any], weights_EC: torch.Tensor) -> Path:
    from safetensors.torch import save

    weights = weights_EC.detach().float().cpu().contiguous()
    header = {"key": json.dumps({**key, "shape": list(weights.shape)}),
              "sha256": hashlib.sha256(weights.numpy().tobytes()).hexdigest()}
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, save({"weights_EC": weights}, metadata=header))


def cached_class_weights(model: Any, classnames: Sequence[str], templates: Sequence[str], templates_name: str | None,
                         cache_dir: str | Path, build: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, str, Path]:
    """Class weights from `cache_dir` when a file with this exact key is there, else `build()` and
    store them. Returns `(weights_EC, status, path)`, status `hit`, `built` or `rebuilt`."""
    key = cache_key(model, classnames, templates, templates_name)
    path = slot_path(Path(cache_dir), key)
    weights, why = read_cached(path, key)
    if weights is not None:
        return weights, "hit", path
    if why is not None:
        log.warning("text-embedding cache %s refused (%s); re-encoding the prompts and replacing it", path, why)
    weights = build().detach().float().cpu().contiguous()
    try:
        write_cached(path, key, weights)
    except OSError as e:  # a read-only or full cache folder costs the speed-up, never the run
        log.warning("could not write the text-embedding cache %s (%s); continuing without it", path, e)
    return weights, ("rebuilt" if why is not None else "built"), path


__all__ = ["ENV_VAR", "cache_key", "cached_class_weights", "default_text_cache_dir", "read_cached", "slot_path",
           "text_fingerprint", "write_cached"]
