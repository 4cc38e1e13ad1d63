"""`vision-steer` command line. Each subcommand lives in its own module of this package and defines
`HELP`, `add_arguments(parser)` and `run(args)`; modules are found automatically."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

# Listed first, in this order, in `--help`; any other subcommand module follows alphabetically.
ORDER = ["run", "zeroshot", "cache", "train", "eval", "sweep", "publish"]


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
    parser = argparse.ArgumentParser(
        prog="vision-steer",
        description="Hooked CLIP image towers, vision SAEs and Visual Sparse Steering (VS2, VS2++, PASS) on SAELens.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _subcommands():
        mod = importlib.import_module(f"{__name__}.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=_HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        # Bad input: one clear line, not a traceback. VISION_STEER_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("VISION_STEER_DEBUG"):
            raise
        print(f"vision-steer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
