"""SAE file formats `load_vision_sae` reads, one module each, and which one a folder holds.

Each module has `NAME`, `DESCRIPTION`, `detect(path) -> bool` and `load(path, options, where, repo_id=None)`
(`repo_id`: the Hub repo it came from, or None), which returns a SAELens `SAE` with our vision metadata
(`common.import_metadata`). docs/sae-sources.md says per format what maps to what and what is refused.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ...core.errors import UnknownNameError
from . import overcomplete, prisma, saelens, saev, sparsify, visaebench
from .common import ImportOptions

# Detection order: the most specific file names first.
FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (saelens, sparsify, prisma, visaebench, saev, overcomplete)}
__all__ = ["FORMATS", "ImportOptions", "detect_format", "find_sae_paths", "format_module", "supported"]


def supported() -> str:
    return "; ".join(f"{name} ({m.DESCRIPTION})" for name, m in FORMATS.items())


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise UnknownNameError(f"unknown SAE format {name!r}; supported: 'auto' or {supported()}",
                               arguments=("format",))
    return FORMATS[name]


def detect_format(path: Path) -> str | None:
    return next((name for name, m in FORMATS.items() if m.detect(path)), None)


def find_sae_paths(root: Path, max_depth: int = 3) -> dict[str, str]:
    """Sub-folders of `root` (relative path -> format) that hold an SAE of a known format."""
    found: dict[str, str] = {}
    frontier = [root]
    for _ in range(max_depth):
        nxt = []
        for folder in frontier:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                fmt = detect_format(sub)
                if fmt:
                    found[sub.relative_to(root).as_posix()] = fmt
                else:
                    nxt.append(sub)
        frontier = nxt
    return found
