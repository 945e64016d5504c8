"""Shared plumbing for benchmarks: run each variant in its own process, store the raw measurements
(``benchmarks/results/<name>.json``), render docs/benchmarks.md from what is stored."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, config: dict, raw: dict) -> dict:
    """Store a benchmark's raw measurements (every process's numbers, per round) with the command,
    the configuration, the versions and the machine, as ``results/<name>.json``; returns the record."""
    import normfx

    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        ort = None
    data = {
        "name": name,
        "command": "python " + " ".join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": config,
        "raw": raw,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "normfx": normfx.__version__,
                     "onnxruntime": ort},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    return data


def load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def machine_line(data: dict) -> str:
    """The machine and versions a stored result was measured with."""
    m, v = data["machine"], data["versions"]
    return (f"{m['cpu']}, {m['cores']} cores, torch {v['torch']}, {m['threads']} threads, "
            f"Python {v['python']}")


def median(values) -> float:
    import statistics

    return statistics.median(values)


def run_variant(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in a fresh interpreter; it prints one JSON line last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternating_rounds(script: str, variants: list[str], rounds: int, *args: str) -> dict[str, list[dict]]:
    """``rounds`` rounds of every variant, each in its own process (``run_variant(script, *args[:-1],
    variant, args[-1])``: the variant goes before the last argument), the order reversed every other
    round so no variant always runs first."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(rounds):
        for v in variants if i % 2 == 0 else variants[::-1]:
            runs[v].append(run_variant(script, *args[:-1], v, *args[-1:]))
    return runs


def store_and_render(name: str, config: dict, raw: dict, render) -> None:
    """Store the raw result, render its docs section from what was stored, and print it."""
    record(name, config, raw)
    body = render()
    write_section(name, body)
    print(body)


def parse_args(doc: str | None, extra=None) -> argparse.Namespace:
    """The benchmarks' shared command line: ``--quick`` (one round, a smoke run) and the hidden
    ``--child ARGS`` with which ``run_variant`` starts a variant in its own process; ``extra(parser)``
    adds a script's own options."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round with fewer repeats (a smoke run)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    if extra is not None:
        extra(ap)
    return ap.parse_args()


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section between ``<!-- name:start/end -->`` markers replaced (or appended)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        return re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- name -->`` markers in docs/benchmarks.md."""
    text = DOC.read_text() if DOC.exists() else (
        "# Benchmarks\n\nEvery number here is rendered from a stored raw result in `benchmarks/results/` "
        "(`python benchmarks/render.py`); rerun the script named in a section to measure it again.\n")
    DOC.write_text(replace_section(text, name, body))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def ratio_cell(values: list[float]) -> str:
    """Median of per-round ratios with their range. Rounds run the variants back to back, so a
    round's ratio cancels most of the machine's drift between processes."""
    v = sorted(values)
    med = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{med:.3f} [{v[0]:.2f}–{v[-1]:.2f}]" if len(v) > 1 else f"{v[0]:.3f}"


def torchvision_model(name: str) -> torch.nn.Module:
    """A torchvision architecture with seeded random weights and non-fresh BatchNorm statistics (so
    a folded model is not near-identical to the original), in eval mode."""
    import torchvision

    torch.manual_seed(0)
    m = getattr(torchvision.models, name)()
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.running_var.uniform_(0.5, 2.0, generator=g)
            mod.running_mean.normal_(0, 0.1, generator=g)
    return m.eval()


def latency_ms(run, reps: int, warmup: int = 0) -> float:
    """Median wall time (ms) of ``reps`` calls of ``run()`` after ``warmup`` untimed ones (the caller
    sets the mode: ``torch.inference_mode()``, an ONNX Runtime session)."""
    import statistics
    import time

    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def train_step_ms(model: torch.nn.Module, batch: int, size: int, steps: int, warmup: int = 3) -> float:
    """Median wall time (ms) of one SGD step (forward, cross-entropy on 1000 classes, backward,
    update) on a fixed random batch, after ``warmup`` untimed steps."""
    import statistics
    import time

    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    times = []
    for i in range(steps + warmup):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def interleaved_ratio(run_a, run_b, pairs: int) -> float:
    """Median over ``pairs`` of ``time(run_b()) / time(run_a())``, the two run back to back in one
    process, which goes first alternating: a drift-free cross-check of ratios taken between
    processes (a slow stretch of a shared machine hits both runs of a pair)."""
    import statistics
    import time

    run_a(), run_b()
    ratios = []
    for i in range(pairs):
        t = [0.0, 0.0]
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (run_a, run_b)[j]()
            t[j] = time.perf_counter() - t0
        ratios.append(t[1] / t[0])
    return statistics.median(ratios)
