"""The browser's output folder: what may be replaced, and the swap that puts a finished build in place.

The build is written into a temporary folder next to `--out` (`.<name>.<random>.tmp`, made by
`tempfile.mkdtemp`) and renamed into place, so an interrupted build leaves the previous browser
untouched. The previous browser is first renamed onto a second empty folder of our own
(`.<name>.<random>.old`, also from `mkdtemp`) and deleted only after the new one is in place. Only
folders this process created are ever deleted; a user's own `.<name>.old` or similar is left alone."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..core.errors import ConflictError, OutputError
from ..core.fileio import file_mode

MARKER = "features.json"


def check_destination(out: Path) -> list[str]:
    """Files of the previous build in `out` (to be replaced), or a ConflictError for a foreign folder."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the feature browser")
    # everything but real folders: files, links, FIFOs (a link to a folder is not followed)
    entries = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_symlink() or not p.is_dir()]
    if not entries:
        return []
    if not (out / MARKER).is_file():
        raise ConflictError(f"{out} holds other files ({', '.join(sorted(entries)[:3])}, ...) and no "
                            f"{MARKER}; give an empty or new folder for the feature browser")
    try:
        previous = set(json.loads((out / MARKER).read_text()).get("files", []))
    except (ValueError, AttributeError):
        raise ConflictError(f"{out / MARKER} is unreadable; give another --out") from None
    foreign = [e for e in entries if e not in previous and e != MARKER]
    if foreign:
        raise ConflictError(f"{out} holds files that the previous feature browser did not write "
                            f"({', '.join(sorted(foreign)[:3])}); move them or give another --out")
    return entries


def new_build_folder(out: Path) -> Path:
    """An empty folder of our own next to `out`, for the build."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.absolute().parent))


def set_modes(root: Path) -> None:
    """The usual umask permissions (mkdtemp makes the folder 0700)."""
    fmode = file_mode()
    dmode = fmode | ((fmode & 0o444) >> 2)  # r -> x for folders
    os.chmod(root, dmode)
    for p in root.rglob("*"):
        os.chmod(p, dmode if p.is_dir() else fmode)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished build `tmp` to `out`, replacing a previous browser there (checked again
    just before, so that files added during the build are not lost)."""
    if not (out.exists() and any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
        return
    check_destination(out)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.absolute().parent))
    try:
        os.rename(out, old)  # onto our own empty folder (POSIX rename replaces an empty directory)
    except OSError:
        os.rmdir(old)
        raise
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous browser back
        raise
    shutil.rmtree(old, ignore_errors=True)
