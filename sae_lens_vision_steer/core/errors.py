"""The project's user errors. Each carries the CLI's exit code (docs/cli.md); `vision-steer` maps only these
(and the operating system's file errors) to exit codes. Any other exception is a bug: the CLI prints its
traceback and exits 1.

They subclass the builtin a caller would expect (`ValueError`, `KeyError`, `TypeError`), so code that caught
those before keeps working. Messages name the library argument (`k`); the CLI adds its flag (`--k`).
"""

from __future__ import annotations


class VisionSteerError(Exception):
    """Base of every user error: something the user can fix. `exit_code` is the CLI's exit status.
    `arguments` names the library arguments the message is about (`k`, `overwrite`), so that the CLI can
    add the flag that sets each one."""

    exit_code = 2

    def __init__(self, *args: object, arguments: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.arguments = tuple(arguments)


class UsageError(VisionSteerError, ValueError):
    """A bad argument or value (exit 2)."""


class UnknownNameError(UsageError, KeyError):
    """A name that is not known: a method, a hook, a template set, a grid entry (exit 2)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnsupportedError(UsageError, TypeError):
    """A model or object of a kind this package does not adapt (exit 2)."""


class InputError(VisionSteerError, ValueError):
    """An input file or folder cannot be used (missing parts, corrupt, not what it claims to be) (exit 3)."""

    exit_code = 3


class MissingInputError(VisionSteerError, FileNotFoundError):
    """An input file or folder does not exist (exit 3)."""

    exit_code = 3


class ConflictError(VisionSteerError, ValueError):
    """The output folder holds something made differently, or another process is writing it (exit 4)."""

    exit_code = 4


class OutputError(VisionSteerError, ValueError):
    """The output cannot be written (a file where a folder should be, read-only, disk full) (exit 5)."""

    exit_code = 5


class DeviceError(VisionSteerError, ValueError):
    """The requested torch device is not available (exit 6)."""

    exit_code = 6


__all__ = ["ConflictError", "DeviceError", "InputError", "MissingInputError", "OutputError", "UnknownNameError",
           "UnsupportedError", "UsageError", "VisionSteerError"]
