"""The one SAE loader: `load_vision_sae` reads a SAELens SAE folder, a Hub-like folder or a Hub repository
and returns the SAELens `SAE` with its vision metadata (`VisionSAEInfo`). Every command and module that
reads an SAE goes through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SPARSITY_FILENAME
from safetensors import safe_open

from ..core.errors import InputError, MissingInputError, UsageError
from ..core.names import safe_relative_path
from .checks import check_sae_config, check_weights_file, load_checked
from .metadata import no_language_model_advice, vision_metadata

README = "README.md"


@dataclass(frozen=True)
class VisionSAEInfo:
    """Where a loaded SAE came from, and the vision metadata from its `cfg.metadata`."""

    source: str  # Hub repo id or local path, as given
    sae_id: str | None
    folder: Path  # local folder holding cfg.json (in the HF cache for Hub repos)
    revision: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # `sae_metadata.vision_metadata(sae)`

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


def sae_folders(root: Path) -> list[str]:
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob(SAE_CFG_FILENAME) if p.parent != root)


def resolve_sae_folder(root: Path, sae_id: str | None, source: str) -> Path:
    if sae_id is not None:
        check_sae_id(sae_id)
        folder = root / sae_id
        if not (folder / SAE_CFG_FILENAME).is_file():
            found = sae_folders(root)
            raise MissingInputError(f"no SAE {sae_id!r} in {source}" + (f"; it has {found}" if found else ""))
        return folder
    if (root / SAE_CFG_FILENAME).is_file():
        return root
    found = sae_folders(root)
    if len(found) == 1:
        return root / found[0]
    if not found:
        raise MissingInputError(f"{source} is not a SAELens SAE folder and holds none ({SAE_CFG_FILENAME} not found)")
    raise UsageError(f"{source} holds several SAEs {found}; pass sae_id")


def load_vision_sae(
    repo_id_or_path: str | Path,
    sae_id: str | None = None,
    device: str = "cpu",
    revision: str | None = None,
    dtype: str | None = None,
) -> tuple[SAE, VisionSAEInfo]:
    """Load a vision SAE and its metadata from a SAE folder, a Hub-like folder or a Hub repository.

    `repo_id_or_path`: a SAELens SAE folder (`cfg.json` inside); a folder laid out like the Hub
    (`<root>/<sae_id>/cfg.json`; `sae_id` may be left out if it holds one SAE); or a Hub repo id
    (`sae_id` required), downloaded with `huggingface_hub.snapshot_download`, which reads the HF cache
    when `HF_HUB_OFFLINE=1`. `revision`: branch, tag or commit of the Hub repo.
    """
    source = str(repo_id_or_path)
    root = Path(repo_id_or_path).expanduser()
    if root.exists():
        if not root.is_dir():
            raise UsageError(f"{root} is a file; give the SAE folder")
    elif isinstance(repo_id_or_path, str) and repo_id_or_path.count("/") == 1 and not repo_id_or_path.startswith(
            (".", "/", "~")):
        if sae_id is None:
            raise UsageError(f"loading from the Hub repo {source!r} needs sae_id (the SAE's folder in the repo)")
        check_sae_id(sae_id)
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id_or_path, revision=revision, allow_patterns=[f"{sae_id}/*"]))
        source = f"Hub repo {repo_id_or_path}" + (f"@{revision}" if revision else "")
    else:
        raise MissingInputError(f"{source} is neither an existing folder nor a Hub repo id (ORG/NAME)")
    folder = resolve_sae_folder(root, sae_id, source)
    check_sae_config(folder)  # numbers in range, architecture-only model kwargs: before SAELens reads anything
    check_weights_file(folder)  # a safetensors file, not a pickle under its name
    with no_language_model_advice():
        sae = load_checked(SAE, folder, device, dtype)  # tensors match cfg.json, all finite
    resolved_id = sae_id if sae_id is not None else (None if folder == root else folder.relative_to(root).as_posix())
    info = VisionSAEInfo(source=str(repo_id_or_path), sae_id=resolved_id, folder=folder, revision=revision,
                         metadata=vision_metadata(sae))
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
