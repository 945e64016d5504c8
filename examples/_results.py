"""Stored results of the examples: every accuracy the docs publish is written here first (per seed,
with the command and the versions that produced it) and rendered into the docs from here.

    record("fixed_point", config, runs)   # examples/results/fixed_point.json
    load("fixed_point")

``examples/render.py`` turns each stored file into the docs tables; ``tests/test_results.py`` fails
when a docs table and its stored result disagree.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(__file__).resolve().parent / "out" / "results"
"""Where a run writes its JSON unless ``--store`` asks to update ``RESULTS`` (the docs' source)."""


def record(name: str, config: dict, runs: list[dict], results: Path = RESULTS) -> Path:
    """Write ``results/<name>.json``: the runs (one dict per seed), the configuration, the command
    line, the versions and the CPU it ran on."""
    import normfx

    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    data = {
        "name": name,
        "command": "python " + " ".join(["examples/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "runs": runs,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "normfx": normfx.__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def config_of(args: argparse.Namespace, *drop: str) -> dict:
    """The options a result records as its configuration: every option but where files go (``--out``,
    ``--results``) and ``drop``."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "results", "store", "data", *drop)}


def parse(ap: argparse.ArgumentParser, *, out: bool = True, quick: dict | None = None) -> argparse.Namespace:
    """Add the options every example shares (``--seeds``, ``--out`` for plots and files, ``--results``,
    ``--store``, ``--quick``), parse, and set up: warnings-only logging, at most 2 threads, the
    ``--out`` folder. ``quick``: the defaults ``--quick`` swaps in (one seed, fewer epochs; an option
    given on the command line still wins)."""
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    if quick is not None:
        ap.add_argument("--quick", action="store_true",
                        help="a short run to try the example: " + ", ".join(
                            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                            for k, v in quick.items()))
        if "--quick" in sys.argv[1:]:
            ap.set_defaults(**quick)
    if out:
        ap.add_argument("--out", type=Path, default=Path("examples/out"))
    ap.add_argument("--results", type=Path, default=None,
                    help=f"where the per-seed JSON goes (default {SCRATCH.relative_to(RESULTS.parents[1])}; "
                         f"with --store, {RESULTS.relative_to(RESULTS.parents[1])}, which the docs render from)")
    ap.add_argument("--store", action="store_true",
                    help="update the stored results the docs are rendered from (examples/results/)")
    args = ap.parse_args()
    if args.results is None:
        args.results = RESULTS if args.store else SCRATCH
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if out:
        args.out.mkdir(parents=True, exist_ok=True)
    return args


def load(name: str, results: Path = RESULTS) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def mean_std(values: list[float], digits: int = 3, signed: bool = False) -> str:
    """``mean ± std`` (sample standard deviation) over seeds; ``signed`` shows the mean's sign."""
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:{'+' if signed else ''}.{digits}f} ± {s:.{digits}f}"
