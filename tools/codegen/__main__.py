"""Generate the schema's three targets; `--check` fails when any committed file is stale.

python -m tools.codegen           # write the generated files
python -m tools.codegen --check   # exit 1 and name the stale files
"""

from __future__ import annotations

import argparse
import sys

from . import targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.codegen", description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    stale = []
    for path, text in targets.render().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    for path in stale:
        print(f"stale: {path} (run python -m tools.codegen)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
