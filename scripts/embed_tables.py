"""Put each committed table file into the Markdown that shows it, between its markers:

    <!-- NAME table: PATH -->
    ... the contents of PATH (relative to the repository root) ...
    <!-- end NAME table -->

    python scripts/embed_tables.py BENCHMARKS.md           # rewrite every marked block
    python scripts/embed_tables.py BENCHMARKS.md --check   # exit 1 naming each block out of date

A study's ``--table`` writes its table file; this keeps the document and the file the same
(tests/test_benchmarks.py checks it)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?P<open><!-- (?P<name>[\w -]+?) table: (?P<path>\S+) -->\n)(?P<body>.*?)(?P<close>[ \t]*<!-- end (?P=name) table -->)",
                   re.S)


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def embedded(text: str) -> str:
    """``text`` with every marked block holding its file's current contents."""
    def fill(m: re.Match) -> str:
        source = ROOT / m["path"]
        if not source.is_file():
            raise SystemExit(f"the {m['name']} table names {m['path']}, which does not exist: "
                             "write it with its study's --table or fix the marker")
        body = source.read_text()
        return m["open"] + body + ("" if body.endswith("\n") else "\n") + m["close"]

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("document", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = ap.parse_args(argv)
    text = args.document.read_text()
    new = embedded(text)
    stale = [m["name"] for m, n in zip(blocks(text), blocks(new)) if m["body"] != n["body"]]
    if args.check:
        for name in stale:
            print(f"{args.document}: the {name} table is not its file's contents "
                  f"(python scripts/embed_tables.py {args.document})")
        return 1 if stale else 0
    if stale:
        args.document.write_text(new)
    print(f"{args.document}: {len(blocks(text))} tables, {len(stale)} updated" + (f" ({', '.join(stale)})" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
