"""Error kinds that tell the user what to fix; the CLI maps each to its own exit code (cli/common.py).

All subclass `ValueError`, so code that caught `ValueError` before keeps working.
"""

from __future__ import annotations


class InputError(ValueError):
    """An input file or folder cannot be used (missing parts, corrupt, not what it claims to be)."""


class ConflictError(ValueError):
    """The output folder holds something made differently, or another process is writing it."""


class OutputError(ValueError):
    """The output cannot be written (a file where a folder should be, read-only, disk full)."""


class DeviceError(ValueError):
    """The requested torch device is not available."""
