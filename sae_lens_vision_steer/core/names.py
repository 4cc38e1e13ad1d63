"""Names that become path components: one safe pattern, checked in one place.

A grid's backbone and data-set names, a split, an SAE id in a Hub repository: each ends up as a folder name
under an output folder. `safe_component` refuses anything but letters, digits and `-_.` (no leading dot, no
`..`), so no name can climb out of the folder, hide as a dot-file or be absolute; `safe_relative_path` checks
each `/`-separated part; `inside` resolves a path (`..` and absolute parts, lexically: a folder the user
symlinked to another disk stays usable) and asserts it stays under its root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import OutputError, UsageError

SAFE_COMPONENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
MAX_COMPONENT = 200  # bytes; file systems allow 255


def safe_component(name: object, what: str) -> str:
    """`name` if it is a safe single path component, else a `UsageError` naming `what` (e.g. "grid backbone
    name")."""
    if not isinstance(name, str) or not SAFE_COMPONENT_RE.fullmatch(name) or ".." in name \
            or len(name) > MAX_COMPONENT:
        raise UsageError(f"invalid {what} {name!r}: it becomes a folder name, so use letters, digits and - _ . only "
                         f"(no leading dot, no '..', at most {MAX_COMPONENT} characters)")
    return name


def safe_relative_path(name: object, what: str) -> str:
    """`name` if every `/`-separated part is a `safe_component` (e.g. a nested SAE id `blocks.11/topk`)."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"invalid {what} {name!r}: it becomes a folder name")
    for part in name.split("/"):
        safe_component(part, what) if part else safe_component(name, what)
    return name


def slug(text: str, default: str = "x") -> str:
    """A safe component made from any text: other characters become `_`, leading dots and underscores go."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).replace("..", "_").lstrip("._")[:MAX_COMPONENT].rstrip("_")
    return s or default


def inside(root: str | Path, path: str | Path, what: str = "output") -> Path:
    """`path`, made absolute and normalised, after asserting it is `root` or below it."""
    r = Path(os.path.abspath(Path(root).expanduser()))
    p = Path(os.path.abspath(Path(path).expanduser()))
    if p != r and r not in p.parents:
        raise OutputError(f"{what} {path} would be written outside {root} (it resolves to {p}); refused")
    return p


__all__ = ["inside", "safe_component", "safe_relative_path", "slug"]
