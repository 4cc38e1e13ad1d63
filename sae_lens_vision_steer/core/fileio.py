"""Safe file writing shared by the cache, the trainer and the evaluation runner.

- atomic writes: a temp file in the target folder, `fsync`, then `os.replace`; the file gets the
  usual umask permissions (temp files are created 0600);
- `exclusive_writer`: one writer per output folder (an advisory `flock` on `.lock`);
- `check_writable_dir`: fail before hours of work when an output folder cannot be written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import ConflictError, MissingInputError, OutputError, UsageError

LOCK_FILE = ".lock"


class FolderBusyError(ConflictError):
    """Another process is writing into the folder."""


class OutputFolderError(OutputError):
    """The output folder cannot be used: it is a file, read-only, or full."""


def file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        tmp = f.name
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            os.unlink(tmp)  # a full disk leaves no half-written temp file behind
            raise
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any, indent: int = 1, default: Any = None) -> Path:
    return write_bytes_atomic(path, (json.dumps(obj, indent=indent, default=default) + "\n").encode())


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads(..., object_pairs_hook=reject_duplicate_keys)`: a key given twice is an error (`UsageError`
    naming it), not the last one silently winning."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise UsageError(f"key {k!r} appears twice")
        out[k] = v
    return out


def read_json_file(path: str | Path, what: str) -> Any:
    """A user-given JSON file, or a clear error naming it as `what` (e.g. "--costs", "grid file"); a key given
    twice in one object is refused."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(), object_pairs_hook=reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise UsageError(f"{what} {path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {path} is not a UTF-8 text file ({e.reason})") from None
    except UsageError as e:
        raise UsageError(f"{what} {path}: {e}") from None


def remove_temp_files(root: Path) -> list[Path]:
    """Delete the temp files (`.<name>.<random>.tmp`) that an interrupted atomic write left in `root`."""
    removed = []
    for p in root.glob(".*.tmp"):
        if p.is_file():
            p.unlink()
            removed.append(p)
    return removed


def check_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create `path` if needed and check that a file can be written there; a clear error otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{what} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=path, prefix=".write-test.", suffix=".tmp") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputFolderError(f"{what} {path} is not writable: {describe_os_error(e)}") from None
    return path


def describe_os_error(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (read-only folder or file system)"
    return e.strerror or str(e)


@contextlib.contextmanager
def exclusive_writer(root: Path, what: str = "folder", error: type[Exception] = FolderBusyError) -> Iterator[str]:
    """One writer per folder (an advisory `flock` on `root/.lock`, released when the process ends);
    a second writer gets `error` naming the holder's pid. Yields what it wrote into the lock file (the
    pid and a random token), by which other processes can check that they see this very lock
    (`distributed.exclusive_folder`: every rank of a launch in the folder rank 0 locked)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no guard
        yield ""
        return
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = os.pread(fd, 64, 0).decode(errors="replace").split()
            holder = held[0] if held else "unknown"
            raise error(f"another process (pid {holder}) is writing the {what} in {root}; "
                                  "wait for it to finish or use another folder") from None
        token = f"{os.getpid()} {secrets.token_hex(8)}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, token.encode(), 0)
        try:
            yield token
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
