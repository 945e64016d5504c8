"""Export benchmarks: ``normfx.export`` vs a bare ``torch.onnx.export`` of the original model.

    python benchmarks/export.py            # stores results/export.json, renders docs/benchmarks.md
    python benchmarks/export.py --quick

Both export with the dynamo exporter, a dynamic batch dimension and the same example input (batch 2);
normfx's time includes deploying a copy, onnx.checker (full check) and the ONNX Runtime comparison
at two batch sizes. ONNX Runtime latency is measured on each file in its own process, with ORT's
thread count fixed, at batch 1; a last process per model alternates single runs of both files, a
drift-free cross-check of the per-process ratio.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

MODELS = ["resnet50", "mobilenet_v3_large"]
ORT_THREADS = 2


def _model(name: str) -> torch.nn.Module:
    from _common import torchvision_model

    return torchvision_model(name)


def child_export(name: str, variant: str, out: str) -> dict:
    import logging

    import normfx

    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    model = _model(name)
    x = torch.randn(2, 3, 224, 224)
    t0 = time.perf_counter()
    if variant == "bare":
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (x,), out, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    else:
        normfx.export(model, (x,), out)
    return {"export_s": time.perf_counter() - t0}


def child_latency(path: str, reps: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    from _common import latency_ms

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.inter_op_num_threads = 1
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)}
    return {"latency_ms": latency_ms(lambda: s.run(None, feed), reps, warmup=5)}


def child_interleaved(path_bare: str, path_normfx: str, pairs: int) -> dict:
    """Both files in one process, single runs alternating: the drift-free cross-check."""
    import numpy as np
    import onnxruntime as ort

    from _common import interleaved_ratio

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.inter_op_num_threads = 1
    a, b = (ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in (path_bare, path_normfx))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for _ in range(5):
        a.run(None, {a.get_inputs()[0].name: x}), b.run(None, {b.get_inputs()[0].name: x})
    return {"ratio": interleaved_ratio(lambda: a.run(None, {a.get_inputs()[0].name: x}),
                                       lambda: b.run(None, {b.get_inputs()[0].name: x}), pairs)}


NAME = "export"


def render() -> str:
    """The docs section, from the stored raw result."""
    from _common import load, machine_line, median, ratio_cell, table

    data = load(NAME)
    c = data["config"]
    rows = []
    for name, r in data["raw"]["models"].items():
        exp, lat = r["export_s"], r["latency_ms"]
        e_ratio = [b / a for a, b in zip(exp["bare"], exp["normfx"])]
        l_ratio = [b / a for a, b in zip(lat["bare"], lat["normfx"])]
        rows.append([name, f"{median(exp['bare']):.1f}", f"{median(exp['normfx']):.1f}", ratio_cell(e_ratio),
                     f"{median(lat['bare']):.2f}", f"{median(lat['normfx']):.2f}", ratio_cell(l_ratio),
                     f"{r['interleaved']:.3f}", f"{r['bn_nodes']['bare']} / {r['bn_nodes']['normfx']}"])
    md = table(["model", "bare export (s)", "normfx.export (s)", "export ÷ bare", "ORT bare (ms)",
                "ORT normfx (ms)", "ORT latency ÷ bare", "same process, interleaved",
                "BatchNormalization nodes: bare / normfx"], rows)
    return f"""## Export (`benchmarks/export.py`)

Machine: {machine_line(data)}; ONNX Runtime {data['versions']['onnxruntime']} with {c['ort_threads']} intra-op
threads. Each export and each latency measurement is its own process; the two variants alternate over
{c['rounds']} export round(s) and {c['lat_rounds']} latency round(s) (which variant runs first
alternates too); times are medians across rounds (latency: of per-process medians of {c['reps']} runs at
batch 1×3×224×224); ratios are medians of per-round ratios, [range over rounds]. "Same process,
interleaved" is a drift-free cross-check: one process loads both files and alternates single runs
({4 * c['reps']} pairs, which goes first alternating); it is the median of per-pair ratios. Both files
have the same operators (normfx's weights come from the float64 fold), so the latency ratio measures
the machine's noise around 1.0. The dynamo exporter's own optimizer already folds
Conv+BatchNormalization in a bare export; what normfx adds is the float64 fold, the sites the
exporter's rewrite does not handle (ConvTranspose with groups, Linear+BatchNorm1d, BN before a conv,
FrozenBatchNorm, Tune blocks) and the verification. `{data['command']}`.

Targets: `normfx.export` time (deploy + export + checker + ORT verification at two batch sizes)
≤ 1.5 × a bare `torch.onnx.export`; ORT latency of normfx's file ≤ 1.0 × the bare file's.

{md}
"""


def main() -> None:
    from _common import parse_args, record, run_variant, write_section

    args = parse_args(__doc__)
    if args.child is not None:
        kind, *rest = args.child
        if kind == "export":
            res = child_export(*rest)
        elif kind == "interleaved":
            res = child_interleaved(rest[0], rest[1], int(rest[2]))
        else:
            res = child_latency(rest[0], int(rest[1]))
        print(json.dumps(res))
        return

    rounds, reps = (1, 20) if args.quick else (5, 50)
    lat_rounds = 1 if args.quick else 11  # latency processes are cheap; the VM drifts between processes
    me = __file__
    models: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            paths = {v: str(Path(tmp) / f"{name}-{v}.onnx") for v in ("bare", "normfx")}
            exp: dict[str, list[float]] = {v: [] for v in paths}
            lat: dict[str, list[float]] = {v: [] for v in paths}
            for _ in range(rounds):
                for v, p in paths.items():
                    exp[v].append(run_variant(me, "export", name, v, p)["export_s"])
            for i in range(lat_rounds):
                order = list(paths.items()) if i % 2 == 0 else list(paths.items())[::-1]  # who goes first alternates
                for v, p in order:
                    lat[v].append(run_variant(me, "latency", p, str(reps))["latency_ms"])
            inter = run_variant(me, "interleaved", paths["bare"], paths["normfx"], str(4 * reps))["ratio"]
            import onnx

            bn = {v: sum(n.op_type == "BatchNormalization" for n in onnx.load(p).graph.node) for v, p in paths.items()}
            models[name] = {"export_s": exp, "latency_ms": lat, "interleaved": inter, "bn_nodes": bn}
    record(NAME, {"rounds": rounds, "lat_rounds": lat_rounds, "reps": reps, "ort_threads": ORT_THREADS},
           {"models": models})
    body = render()
    write_section(NAME, body)
    print(body)


if __name__ == "__main__":
    main()
