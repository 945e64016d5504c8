"""Every Python example in the README and docs/ runs as written, and prints what it says it prints.

A line ``print(...)  # text`` documents its output: the first line printed must equal ``text``, or
start with it when ``text`` ends with ``...``. (A comment that describes rather than shows goes on
its own line.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks():
    for page in PAGES:
        for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
            yield pytest.param(code, id=f"{page.name}-{i}")


_DOCUMENTED = re.compile(r"^(\s*)print\((.*)\)\s+#\s?(.*)$")


def _expect(expected: str, *args: object) -> None:
    text = " ".join(str(a) for a in args)
    print(text)
    first = text.splitlines()[0] if text else ""
    if expected.endswith("..."):
        assert first.startswith(expected[:-3].rstrip(" ,")), f"documented {expected!r}, printed {first!r}"
    else:
        assert first == expected, f"documented {expected!r}, printed {first!r}"


def _checked(code: str) -> str:
    """``print(x)  # out`` -> ``_expect("out", x)``: the documented output is compared."""
    return "\n".join(_DOCUMENTED.sub(lambda m: f"{m[1]}_expect({m[3].strip()!r}, {m[2]})", line)
                     for line in code.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize("code", list(_blocks()))
def test_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    exec(compile(_checked(code), "<docs>", "exec"), {"__name__": "__docs__", "_expect": _expect})


def test_documented_outputs_are_checked():
    assert _checked("print(r.summary())   # fold: 3 sites") == "_expect('fold: 3 sites', r.summary())"
    with pytest.raises(AssertionError, match="documented"):
        _expect("a", "b")
