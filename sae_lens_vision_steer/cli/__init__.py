"""`vision-steer` command line. Each subcommand lives in its own module of this package and defines
`HELP`, `add_arguments(parser)` and `run(args)` (and optionally `interrupted(args)`: what a Ctrl-C
left saved); modules are found automatically. User errors end in one line and a distinct exit code
(see `common.EXIT_CODES`); set VISION_STEER_DEBUG=1 for the traceback."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

# Listed first, in this order, in `--help`; any other subcommand module follows alphabetically.
ORDER = ["run", "zeroshot", "cache", "train", "eval", "sweep", "features", "publish"]


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
    from .common import EXIT_CODES

    parser = argparse.ArgumentParser(
        prog="vision-steer", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes:\n" + "\n".join(f"  {k:>3}  {v}" for k, v in EXIT_CODES.items()),
        description="Hooked CLIP image towers, vision SAEs and Visual Sparse Steering (VS2, VS2++, PASS) on SAELens.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _subcommands():
        mod = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=_HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run, _interrupted=getattr(mod, "interrupted", None))
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from .common import EXIT_INTERRUPTED, error_exit_code, error_message, resolve_device

    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "device"):
            args.device = resolve_device(args.device)
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
        print(f"vision-steer {args.command}: error: {error_message(e)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
