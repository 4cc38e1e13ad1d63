"""SAELens SAE folders: `cfg.json` + `sae_weights.safetensors` (what this package trains and publishes)."""

from __future__ import annotations

from pathlib import Path

from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

from ..checks import check_sae_config, check_weights_file, load_checked
from .common import ImportOptions

NAME = "saelens"
DESCRIPTION = "SAELens: cfg.json + sae_weights.safetensors (this package's own SAEs)"


def detect(folder: Path) -> bool:
    return (folder / SAE_CFG_FILENAME).is_file() and (folder / SAE_WEIGHTS_FILENAME).is_file()


def load(folder: Path, options: ImportOptions, where: str, repo_id: str | None = None):
    check_sae_config(folder)  # numbers in range, architecture-only model kwargs: before SAELens reads anything
    check_weights_file(folder)  # a safetensors file, not a pickle under its name
    sae = load_checked(SAE, folder, "cpu", None)  # tensors match cfg.json, all finite
    given = {"hook_name": options.hook_name, "model_name": options.model_name, "pretrained": options.pretrained,
             "positions": options.positions}
    for key, value in given.items():  # an SAE trained elsewhere with SAELens may lack our vision keys
        if value is not None:
            setattr(sae.cfg.metadata, key, value)
    return sae
