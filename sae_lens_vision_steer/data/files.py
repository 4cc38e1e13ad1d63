"""Files are files: what a data folder lists is read only if it is a regular file, and every name we
print, hash or store is valid text.

- `open_regular_file(path)`: a FIFO named `x.jpg` would block the reader forever and a device might
  never end, so anything but a regular file (a symbolic link to one included) is refused, naming it,
  before it is read: checked with `stat`, opened without blocking, and checked again on the open file.
- `check_names(paths)`: a file name that is not valid UTF-8 cannot be hashed into a fingerprint, stored
  in JSON or printed as it is; it is refused naming the file (its odd bytes shown as `\\xNN`).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Sequence

from ..core.errors import InputError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class NotRegularFileError(InputError):
    """A path that names a FIFO, a device, a socket or a folder where a file is read (exit 3)."""


def shown_path(path: str | Path) -> str:
    """A path as it can be printed: the bytes of a name that is not valid UTF-8 shown as `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is (`a FIFO (named pipe)`, `a character device`, ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def open_regular_file(path: str | Path) -> BinaryIO:
    """`path` opened for binary reading, or `NotRegularFileError` ("PATH: it is a FIFO (named pipe), not a
    regular file") when it is anything else. A missing file raises the usual `FileNotFoundError`."""
    kind = file_kind(os.stat(path).st_mode)
    if kind is None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            kind = file_kind(os.fstat(fd).st_mode)  # replaced by something else after the check?
            if kind is None:
                return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise NotRegularFileError(f"{shown_path(path)}: it is {kind}, not a regular file")


def check_names(paths: Sequence[str | Path], what: str = "file") -> None:
    """Refuse (`InputError`) a path that is not valid UTF-8, naming it."""
    try:
        "\n".join(map(str, paths)).encode("utf-8")
    except UnicodeEncodeError:
        for p in paths:
            try:
                str(p).encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"the {what} name {shown_path(p)} is not valid UTF-8; rename it (or move it out of "
                                 "the data folder)") from None


__all__ = ["NotRegularFileError", "check_names", "file_kind", "open_regular_file", "shown_path"]
