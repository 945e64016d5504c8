"""Render docs/benchmarks.md from the stored raw results (``benchmarks/results/*.json``).

    python benchmarks/render.py          # rewrite every section from what is stored
    python benchmarks/render.py --check  # exit 1 if a section differs from its rendering

Each benchmark script stores every process's measurements with its command and versions, and its
``render()`` turns them into the section between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DOC, replace_section  # noqa: E402

SECTIONS = {"convbn": "convbn", "deploy_latency": "deploy_latency", "export": "export", "repbn": "repbn",
            "fixed_point": "fixed_point", "evonorm": "evonorm", "linear_attention": "linear_attention",
            "inspect": "inspect_sites", "exact_sums": "exact_sums"}


def render_page(text: str) -> str:
    for section, module in SECTIONS.items():
        text = replace_section(text, section, importlib.import_module(module).render())
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args()
    text = DOC.read_text()
    new = render_page(text)
    if new == text:
        print("up to date: docs/benchmarks.md")
        return 0
    if args.check:
        print("docs/benchmarks.md differs from the stored benchmark results: run python benchmarks/render.py")
        return 1
    DOC.write_text(new)
    print("rewrote docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
