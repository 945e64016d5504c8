"""Every results table in docs/ equals its rendering from the stored result (examples/results/*.json):
a number in the docs that its stored result does not give fails here."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
_spec = importlib.util.spec_from_file_location("normfx_examples_render", ROOT / "examples" / "render.py")
render = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render)  # type: ignore[union-attr]

PAGES = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_docs_tables_equal_their_stored_results(page):
    text = page.read_text()
    assert render.render_page(text) == text, f"{page.name}: run python examples/render.py after the example"


def test_every_marker_has_a_result_and_a_renderer():
    names = {m.group(2) for page in PAGES for m in render.MARKER.finditer(page.read_text())}
    assert names, "no results table in docs/"
    for name in names:
        assert name in render.RENDERERS, name
        for source in render.RENDERERS[name][1]:
            data = json.loads((ROOT / "examples" / "results" / f"{source}.json").read_text())
            assert len(data["runs"]) >= 3, f"{source}: accuracies need at least 3 seeds"
            assert data["command"] and data["versions"]


def test_a_changed_number_is_caught(tmp_path, monkeypatch):
    page = next(p for p in PAGES if "<!-- results: fixed_point -->" in p.read_text())
    text = page.read_text()
    tampered = re.sub(r"(\| float \| )(\d)", lambda m: m.group(1) + str((int(m.group(2)) + 1) % 10), text, count=1)
    assert tampered != text and render.render_page(tampered) != tampered


# --- benchmarks ---------------------------------------------------------------------------------------

_bspec = importlib.util.spec_from_file_location("normfx_benchmarks_render", ROOT / "benchmarks" / "render.py")
bench_render = importlib.util.module_from_spec(_bspec)
_bspec.loader.exec_module(bench_render)  # type: ignore[union-attr]


def test_benchmarks_page_equals_its_stored_results():
    """docs/benchmarks.md is what the stored raw measurements render to (python benchmarks/render.py)."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert bench_render.render_page(text) == text, "run python benchmarks/render.py after a benchmark"


def test_benchmark_results_are_raw_with_command_and_versions():
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for f in files:
        data = json.loads(f.read_text())
        assert data["command"].startswith("python benchmarks/"), f.name
        assert data["raw"] and data["versions"]["torch"] and data["machine"]["cores"], f.name
    for f in sorted((ROOT / "benchmarks" / "results" / "zoo").glob("*.json")):   # one record per model
        data = json.loads(f.read_text())
        assert data["command"] == f"python benchmarks/zoo.py --models {data['src']}:{data['model']}", f.name
        assert data["status"] and data["versions"]["torch"] and data["machine"]["cores"], f.name
    # nothing in benchmarks/results that is not a raw JSON record (or the zoo's folder of them)
    results = ROOT / "benchmarks" / "results"
    assert not [p.name for p in results.rglob("*") if p.is_file() and p.suffix != ".json"]
    assert [p.name for p in results.iterdir() if p.is_dir()] in ([], ["zoo"])


def test_coverage_page_equals_the_stored_zoo_results():
    """docs/coverage.md is what benchmarks/results/zoo/*.json render to (python benchmarks/zoo.py --render)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    _zspec = importlib.util.spec_from_file_location("normfx_benchmarks_zoo", ROOT / "benchmarks" / "zoo.py")
    zoo = importlib.util.module_from_spec(_zspec)
    _zspec.loader.exec_module(zoo)  # type: ignore[union-attr]
    from _common import replace_section

    text = (ROOT / "docs" / "coverage.md").read_text()
    assert replace_section(text, "zoo", zoo.render()) == text, "run python benchmarks/zoo.py --render"


def test_a_changed_benchmark_number_is_caught():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    tampered = re.sub(r"(\| tune \| )(\d)", lambda m: m.group(1) + str((int(m.group(2)) + 1) % 10), text, count=1)
    assert tampered != text and bench_render.render_page(tampered) != tampered
