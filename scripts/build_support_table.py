"""Write docs/support.md from the model-family registry (`--check`: exit 1 if it is stale)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sae_lens_vision_steer.models.support import markdown

OUT = Path(__file__).resolve().parents[1] / "docs" / "support.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    text = markdown()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python scripts/build_support_table.py", file=sys.stderr)
            return 1
        return 0
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(OUT)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
