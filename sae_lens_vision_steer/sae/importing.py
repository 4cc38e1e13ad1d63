"""An SAE from another library, written once as a SAELens folder (`cfg.json` + `sae_weights.safetensors`), so
every command that takes an SAE folder (`eval`, `sweep`, `features`, `publish`) and plain
`SAE.load_from_disk` read it. Its metadata keeps `source` (format, library, file); a published model card
credits it."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sae_lens import SAE

from ..core.errors import UsageError
from .formats import ImportOptions
from .loading import VisionSAEInfo, load_vision_sae


@dataclass(frozen=True)
class ImportResult:
    sae: SAE
    info: VisionSAEInfo
    out_dir: Path


def import_sae(source: str | Path, out_dir: str | Path, sae_id: str | None = None, format: str = "auto",
               options: ImportOptions | None = None, revision: str | None = None) -> ImportResult:
    """`load_vision_sae(source, sae_id, format, options=options, revision=revision)`, saved with SAELens'
    `save_model` to `out_dir` (which must not exist or be empty); all files appear at once."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"out_dir {out} exists and is not empty; give a new or empty folder", arguments=("out_dir",))
    sae, info = load_vision_sae(source, sae_id, format, options=options, revision=revision)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        sae.save_model(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(sae, info, out)
