"""`vision-steer` command line. Each subcommand lives in its own module of this package and defines
`HELP`, `add_arguments(parser)` and `run(args)` (and optionally `interrupted(args)`: what a Ctrl-C
left saved); modules are found automatically (module `sae_eval` is command `sae-eval`). User errors end in one line and a distinct exit code
(see `common.EXIT_CODES`); set VISION_STEER_DEBUG=1 for the traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..core.errors import UsageError

# Listed first, in this order, in `--help`; any other subcommand module follows alphabetically.
ORDER = ["run", "zeroshot", "cache", "train", "eval", "sae_eval", "sweep", "reproduce", "features", "publish"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default unless its help already states one or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _subcommands() -> list[str]:
    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and m.name != "common"]
    return sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__
    from .common import EXIT_CODES

    parser = argparse.ArgumentParser(
        prog="vision-steer", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items()),
        description="Hooked CLIP image towers, vision SAEs and Visual Sparse Steering (VS2, VS2++, PASS) on SAELens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _subcommands():
        mod = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name.replace("_", "-"), help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=_HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _interrupted=getattr(mod, "interrupted", None),
                       _flags=getattr(mod, "ARGUMENT_FLAGS", {}))
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from .common import EXIT_INTERRUPTED, error_exit_code, error_message, resolve_device

    args = build_parser().parse_args(argv)
    from ..core import distributed

    started = distributed.launched() and not distributed.active()  # end only a group this call starts
    try:
        if hasattr(args, "device"):
            args.device = resolve_device(args.device)
        if distributed.launched():  # torchrun / accelerate launch: see docs/distributed.md
            _start_distributed(args)
        return int(args._run(args) or 0)
    except KeyboardInterrupt as e:
        saved = args._interrupted(args) if args._interrupted else None
        note = str(e) if str(e) else ""
        print(f"vision-steer {args.command}: interrupted. " + (saved or note or "nothing was saved"), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        code = error_exit_code(e)
        if code is None or os.environ.get("VISION_STEER_DEBUG"):
            raise  # a bug, not a user error: keep the traceback
        if not getattr(e, "reported_by_main", False):  # rank 0's error, raised on every rank: printed once
            rank = f" (rank {distributed.rank()})" if distributed.active() else ""
            print(f"vision-steer {args.command}{rank}: error: {error_message(e, args._flags)}", file=sys.stderr)
        return code
    finally:
        if started:
            distributed.shutdown()


DISTRIBUTED_COMMANDS = ("cache", "eval", "sweep", "run")


def _start_distributed(args: argparse.Namespace) -> None:
    """Join the process group; ranks other than 0 print nothing to stdout and show no progress bars."""
    import os

    from ..core import distributed

    if args.command not in DISTRIBUTED_COMMANDS:
        err = UsageError(f"vision-steer {args.command} runs in one process; under torchrun / accelerate launch "
                         f"only {', '.join(DISTRIBUTED_COMMANDS)} are supported")
        err.reported_by_main = int(os.environ.get("RANK", "0")) != 0  # every rank refuses; rank 0 says so once
        raise err
    args.device = distributed.init(getattr(args, "device", "cpu"))
    if not distributed.is_main():
        if hasattr(args, "no_progress"):
            args.no_progress = True
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the summary; errors still reach stderr


if __name__ == "__main__":
    sys.exit(main())
