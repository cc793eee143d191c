"""Regenerate the zoo table of README.md from src/kernel_distill/zoo/index.json (never edited by hand).

The table sits between ``<!-- generated: zoo -->`` and ``<!-- end generated -->``.

    .venv/bin/python tools/zoo_table.py           # rewrite README.md
    .venv/bin/python tools/zoo_table.py --check   # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"(<!-- generated: zoo -->\n)(.*?)(<!-- end generated -->)", re.S)


def render(text: str) -> str:
    from kernel_distill import zoo

    if not MARKER.search(text):
        raise SystemExit(f"{README}: no '<!-- generated: zoo -->' ... '<!-- end generated -->' block")
    return MARKER.sub(lambda m: m.group(1) + zoo.markdown_table() + m.group(3), text, count=1)


def write() -> bool:
    """Rewrite README.md; returns whether it changed."""
    text = README.read_text()
    new = render(text)
    if new != text:
        README.write_text(new)
    return new != text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's zoo table is out of date")
    args = parser.parse_args()
    if args.check:
        text = README.read_text()
        if render(text) != text:
            print("README.md's zoo table is out of date: run tools/zoo_table.py", file=sys.stderr)
            return 1
        return 0
    print("README.md zoo table " + ("rewritten" if write() else "already up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
