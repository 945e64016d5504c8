"""Rewrite the registry's table of transforms in docs/index.md (``python docs/render.py``; ``--check``
exits 1 when the page differs from what the registry renders)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from normfx.passes.registry import markdown_table

PAGE = Path(__file__).resolve().parent / "index.md"
START, END = "<!-- transforms:start -->", "<!-- transforms:end -->"


def rendered(text: str) -> str:
    return re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{markdown_table()}\n{END}", text,
                  flags=re.S)


def main() -> int:
    text = PAGE.read_text()
    new = rendered(text)
    if "--check" in sys.argv[1:]:
        return int(new != text)
    PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
