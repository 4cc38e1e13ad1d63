"""The one SAE loader: `load_vision_sae` reads an SAE of any supported format (a SAELens folder, sparsify,
ViT-Prisma, saev, ViSAEBench or overcomplete files; `formats/`) from a folder, a file or a Hub repository and
returns the SAELens `SAE` with its vision metadata (`VisionSAEInfo`). Every command and module that reads an
SAE goes through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SPARSITY_FILENAME
from sae_lens.util import str_to_dtype
from safetensors import safe_open

from ..core.errors import InputError, MissingInputError, UsageError
from ..core.names import safe_relative_path
from .checks import check_finite
from .formats import FORMATS, ImportOptions, detect_format, find_sae_paths, format_module, supported
from .metadata import no_language_model_advice, vision_metadata

README = "README.md"
# Formats whose Hub repos hold one SAE at the root (no sae_id needed).
ROOT_LEVEL_FORMATS = ("prisma", "saev")
# Formats whose files do not record the input normalisation their library applied (ImportOptions.input_norm).
INPUT_NORM_FORMATS = ("saev", "visaebench")


@dataclass(frozen=True)
class VisionSAEInfo:
    """Where a loaded SAE came from, and the vision metadata from its `cfg.metadata`."""

    source: str  # Hub repo id or local path, as given
    sae_id: str | None
    folder: Path  # local folder holding cfg.json (in the HF cache for Hub repos)
    revision: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # `sae_metadata.vision_metadata(sae)`
    format: str = "saelens"  # the source's format (`formats.FORMATS`)

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    @property
    def pretrained(self) -> str | None:
        return self.metadata.get("pretrained")

    @property
    def positions(self) -> Any:
        return self.metadata.get("positions")


def check_sae_id(sae_id: str) -> None:
    """An SAE id is a folder of a repository: `/`-separated safe names (`core.names.safe_relative_path`)."""
    safe_relative_path(sae_id, "sae id")
    if sae_id == README:
        raise UsageError(f"sae id {sae_id!r} would clash with the model card")


def _local_root(source: str | Path, sae_id: str | None, revision: str | None, fmt: str) -> tuple[Path, str, str | None]:
    """(local folder or file, a description for messages, the Hub repo id or None)."""
    text = str(source)
    path = Path(source).expanduser()
    if path.exists():
        return path, text, None
    if isinstance(source, str) and text.count("/") == 1 and not text.startswith((".", "/", "~")):
        if sae_id is None and fmt not in ROOT_LEVEL_FORMATS:
            raise UsageError(f"loading from the Hub repo {text!r} needs sae_id (the SAE's folder in the repo), or "
                             f"format= one of {ROOT_LEVEL_FORMATS} for a repo holding one SAE at its root",
                             arguments=("sae_id", "format"))
        if sae_id is not None:
            check_sae_id(sae_id)
        from huggingface_hub import snapshot_download

        patterns = [f"{sae_id}/*"] if sae_id is not None else None
        root = Path(snapshot_download(text, revision=revision, allow_patterns=patterns))
        return root, f"Hub repo {text}" + (f"@{revision}" if revision else ""), text
    raise MissingInputError(f"{text} is neither an existing folder or file nor a Hub repo id (ORG/NAME)")


def _resolve(root: Path, sae_id: str | None, fmt: str, where: str) -> tuple[Path, str | None, str]:
    """(the SAE's folder or file, its id below `root`, its format)."""
    if sae_id is not None:
        check_sae_id(sae_id)
        path = root / sae_id
        if not path.exists():
            found = sorted(find_sae_paths(root))
            raise MissingInputError(f"no SAE {sae_id!r} in {where}" + (f"; it has {found}" if found else ""))
    else:
        path = root
    if fmt != "auto":
        module = format_module(fmt)
        if module.detect(path) or not path.is_dir() or fmt == "overcomplete":  # overcomplete: its load decides
            return path, sae_id, fmt
        below = _one_below(path, sae_id, where, fmt)
        return below or (path, sae_id, fmt)  # none found: the format's own load says what is missing
    detected = detect_format(path)
    if detected:
        return path, sae_id, detected
    below = _one_below(path, sae_id, where) if path.is_dir() else None
    if below:
        return below
    raise MissingInputError(f"{where} holds no SAE of a known format (overcomplete needs format='overcomplete' "
                            f"with its constructor arguments); supported: {supported()}")


def _one_below(path: Path, sae_id: str | None, where: str, fmt: str | None = None) -> tuple[Path, str, str] | None:
    """The one SAE further down `path` (a Hub-like snapshot, a run folder), found without its id."""
    found = {rel: f for rel, f in find_sae_paths(path).items() if fmt is None or f == fmt}
    if len(found) > 1:
        raise UsageError(f"{where} holds several SAEs {sorted(found)}; pass sae_id"
                         + (f" (below {sae_id!r})" if sae_id else ""), arguments=("sae_id",))
    if not found:
        return None
    (rel, detected), = found.items()
    return path / rel, rel if sae_id is None else f"{sae_id}/{rel}", detected


def load_vision_sae(
    source: str | Path,
    sae_id: str | None = None,
    format: str = "auto",
    *,
    options: ImportOptions | None = None,
    device: str = "cpu",
    revision: str | None = None,
    dtype: str | None = None,
) -> tuple[SAE, VisionSAEInfo]:
    """Load a vision SAE, from any supported source, as a SAELens `SAE` with our metadata.

    `source`: a folder or file, or a Hub repo id (downloaded with `huggingface_hub.snapshot_download`,
    which reads the HF cache when `HF_HUB_OFFLINE=1`); `sae_id`: the SAE's sub-folder in it (may be left
    out when it holds one). `format`: `auto` (detected from the files) or one of `formats.FORMATS`:
    `saelens` (this package's own SAEs), `sparsify`, `prisma`, `saev`, `visaebench`, `overcomplete`.
    `options`: what the files may not say (hook, model, positions, input normalisation, pickles; see
    `ImportOptions`). A checkpoint that cannot be represented exactly is refused with the reason.
    """
    opts = options or ImportOptions()
    if format != "auto":
        format_module(format)  # an unknown format is refused before any download
    root, where, repo_id = _local_root(source, sae_id, revision, format)
    path, resolved_id, fmt = _resolve(root, sae_id, format, where)
    module = FORMATS[fmt]
    label = where if resolved_id is None else f"{where} ({resolved_id})"
    if opts.input_norm is not None and fmt not in INPUT_NORM_FORMATS:  # nothing the user passes is ignored
        raise UsageError(f"{label}: input_norm applies to {INPUT_NORM_FORMATS} SAEs, not to {fmt!r} ones",
                         arguments=("input_norm",))
    if opts.constructor is not None and fmt != "overcomplete":
        raise UsageError(f"{label}: constructor applies to overcomplete SAEs, not to {fmt!r} ones",
                         arguments=("constructor",))
    with no_language_model_advice():
        sae = module.load(path, opts, label, repo_id=repo_id)
    check_finite(sae, label)  # NaN or inf weights give numbers that mean nothing, whatever the format
    sae = sae.to(device=device, dtype=str_to_dtype(dtype)) if dtype else sae.to(device)
    folder = path if path.is_dir() else path.parent
    info = VisionSAEInfo(source=str(source), sae_id=resolved_id, folder=folder, revision=revision,
                         metadata=vision_metadata(sae), format=fmt)
    return sae, info


def log_feature_sparsity(info: VisionSAEInfo, device: str = "cpu") -> torch.Tensor | None:
    """The SAE's log10 latent firing rates from `sparsity.safetensors`, if it was published with one."""
    path = info.folder / SPARSITY_FILENAME
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt", device=device) as f:
            return f.get_tensor("sparsity")
    except Exception as e:  # noqa: BLE001 - safetensors' own error types: a damaged or foreign file
        raise InputError(f"{path} is not a safetensors file holding 'sparsity' ({' '.join(str(e).split())})") from None


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE of a local folder (a SAELens SAE folder, or a folder holding exactly one): `load_vision_sae`."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"SAE folder {path} does not exist")
    return load_vision_sae(path, device=str(device))[0]
