"""PRepBN benchmark: latency of the deployed (LayerNorm-free) model vs the original LayerNorm model.

    python benchmarks/repbn.py            # stores results/repbn_<model>_<engine>.json, renders the docs
    python benchmarks/repbn.py --quick
    python benchmarks/repbn.py --only swin_t:eager --rounds 8   # rerun one cell, keep the others

For vit_b_16 and swin_t (random weights, 224×224): the original model, and the same model after
``normfx.repbn`` with λ = 0, randomized statistics and ``normfx.deploy``; torch eager and ONNX
Runtime; batch 1 and 8. Each (model, variant, engine) runs in its own process; variants alternate
over rounds. The torch profiler's share of LayerNorm in the original model's CPU time is measured
too: it bounds the saving. A last process per (model, engine) holds both variants and alternates
single runs: a drift-free cross-check of the per-process ratio.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

MODELS = ["vit_b_16", "swin_t"]
ENGINES = ["eager", "ort"]
BATCHES = [1, 8]
ORT_THREADS = 2


def _quiet_denormals() -> None:
    """Two threads, and subnormal floats flushed to zero. With random weights the two models put
    their attention logits in different ranges, and softmax outputs that underflow to subnormals
    make softmax and the next matmul several times slower on x86 (measured: softmax 3.4×, bmm 1.5×
    in the deployed vit_b_16 without it). That is the random data's cost, not the architecture's,
    so both variants run with denormals flushed (torch and ONNX Runtime alike)."""
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)


def build(name: str, variant: str) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    return model if variant == "ln" else deploy_prepbn(model)


def deploy_prepbn(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` after PRepBN training, as far as speed goes: ``normfx.repbn`` with λ = 0 and randomized
    statistics, then ``normfx.deploy`` (no normalization left)."""
    import normfx
    from normfx.nn import ProgressiveRepBN

    m = normfx.repbn(model, total_steps=1)
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, ProgressiveRepBN):
            mod.lam.zero_()
            mod.repbn.bn.running_var.uniform_(0.5, 2.0, generator=g)
            mod.repbn.bn.running_mean.normal_(0, 0.1, generator=g)
    return normfx.deploy(m.eval())


def child_export(name: str, variant: str, path: str) -> dict:
    import logging

    import normfx

    logging.disable(logging.WARNING)
    _quiet_denormals()
    report = normfx.export(build(name, variant), torch.randn(2, 3, 224, 224), path)
    counts = report.op_counts
    return {"norm_ops": sum(counts.get(k, 0) for k in ("LayerNormalization", "BatchNormalization")),
            "muladd": counts.get("Mul", 0)}


def child_latency(name: str, variant: str, engine: str, path: str, reps: int) -> dict:
    _quiet_denormals()
    out: dict = {}
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = ORT_THREADS, 1
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        run = lambda x: s.run(None, {s.get_inputs()[0].name: x.numpy()})  # noqa: E731
    else:
        model = build(name, variant)
        run = lambda x: model(x)  # noqa: E731
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 3, 224, 224)
            for _ in range(2):
                run(x)
            times = []
            for _ in range(reps if b == 1 else max(3, reps // 3)):
                t0 = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - t0)
            out[f"b{b}_ms"] = 1e3 * statistics.median(times)
        if engine == "eager" and variant == "ln":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(torch.randn(8, 3, 224, 224))
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            ln = sum(e.self_cpu_time_total for e in prof.key_averages() if "layer_norm" in e.key)
            out["ln_share"] = ln / total
    return out


def child_interleaved(name: str, engine: str, path_ln: str, path_dep: str, reps: int) -> dict:
    """Drift-free cross-check: both variants in one process, runs alternating, so a slow stretch of
    the machine hits both. Returns the median of per-pair ratios (deployed ÷ LN) per batch."""
    from _common import interleaved_ratio

    _quiet_denormals()
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = ORT_THREADS, 1
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in (path_ln, path_dep)]
        runs = [(lambda s: lambda x: s.run(None, {s.get_inputs()[0].name: x.numpy()}))(s) for s in sessions]  # noqa: B023
    else:
        runs = [(lambda m: lambda x: m(x))(build(name, v)) for v in ("ln", "deployed")]
    out: dict = {}
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 3, 224, 224)
            pairs = reps if b == 1 else max(3, reps // 3)
            out[f"b{b}_ratio"] = interleaved_ratio(lambda: runs[0](x), lambda: runs[1](x), pairs)  # noqa: B023
    return out


def cell_name(model: str, engine: str) -> str:
    return f"repbn_{model}_{engine}"


def render() -> str:
    """The docs section, from the stored raw result of every (model, engine) cell."""
    from _common import RESULTS, load, machine_line, median, ratio_cell, table

    stored = [load(cell_name(m, e)) for m in MODELS for e in ENGINES if (RESULTS / f"{cell_name(m, e)}.json").exists()]
    rows = []
    for data in stored:
        c, raw = data["config"], data["raw"]
        runs, ops, inter = raw["runs"], raw["ops"], raw["interleaved"]
        for b in BATCHES:
            k = f"b{b}_ms"
            ratios = [d[k] / l_[k] for l_, d in zip(runs["ln"], runs["deployed"])]
            share = median(r["ln_share"] for r in runs["ln"]) if c["engine"] == "eager" else None
            rows.append([c["model"], c["engine"], str(b), f"{median(r[k] for r in runs['ln']):.1f}",
                         f"{median(r[k] for r in runs['deployed']):.1f}", ratio_cell(ratios), str(c["rounds"]),
                         f"{inter[f'b{b}_ratio']:.3f}", f"{100 * share:.1f}%" if share is not None else "",
                         f"{ops['ln']['norm_ops']} / {ops['deployed']['norm_ops']}" if c["engine"] == "ort" else ""])
    md = table(["model", "engine", "batch", "LayerNorm model (ms)", "deployed PRepBN (ms)", "deployed ÷ LN",
                "rounds", "same process, interleaved",
                "LayerNorm share of CPU time (profiler)", "norm ops in ONNX: LN model / deployed"], rows)
    first = stored[0]
    reps = first["config"]["reps"]
    commands = "; ".join(f"`{d['command']}` ({d['config']['model']} {d['config']['engine']})" for d in stored)
    return f"""## PRepBN (`benchmarks/repbn.py`)

Machine: {machine_line(first)}; ONNX Runtime {first['versions']['onnxruntime']} with {first['config']['ort_threads']}
intra-op threads. Each (model, variant, engine) is its own process; the two variants alternate over the
rounds given per row (each (model, engine) cell is stored apart in `benchmarks/results/`); times are
medians across rounds of per-process medians; ratios are medians of per-round ratios, [range over
rounds] (which variant runs first alternates by round). Both variants run with subnormal floats
flushed to zero (torch and ONNX Runtime): with random weights, underflowing softmax outputs slow
one model's attention for reasons of data, not architecture. "Same process, interleaved" is a drift-free
cross-check: one process holds both variants and alternates single runs ({2 * reps} pairs at batch 1,
{max(3, 2 * reps // 3)} at batch 8); it is the median of per-pair ratios. {commands}.

Target: never slower, the saving close to LayerNorm's profiled share, no normalization op in the
exported graph (swin_t keeps 13 sites as one multiply-add each, see docs/repbn.md; those are `Mul`+`Add`,
not normalization ops). The LayerNorm share bounds the saving; where the per-round range is wider
than that share, the row says "not slower", not by how much.

{md}

GPU (batch 64, where the paper reports its 2.4 ms / 16.2 ms saving) is not yet measured.
"""


def main() -> None:
    from _common import parse_args, record, run_variant, write_section

    def options(ap) -> None:
        ap.add_argument("--only", nargs="+", metavar="MODEL:ENGINE",
                        help="rerun these cells (e.g. swin_t:eager); the others keep their stored results")
        ap.add_argument("--rounds", type=int, help="alternating rounds per cell (default 4)")

    args = parse_args(__doc__, options)
    if args.child is not None:
        kind, *rest = args.child
        if kind == "export":
            res = child_export(*rest)
        elif kind == "interleaved":
            res = child_interleaved(*rest[:4], int(rest[4]))
        else:
            res = child_latency(*rest[:4], int(rest[4]))
        print(json.dumps(res))
        return

    rounds, reps = (1, 5) if args.quick else (4, 8)
    rounds = args.rounds or rounds
    cells = [(m, e) for m in MODELS for e in ENGINES]
    if args.only:
        cells = [tuple(c.split(":", 1)) for c in args.only]
        bad = [":".join(c) for c in cells if len(c) != 2 or c[0] not in MODELS or c[1] not in ENGINES]
        if bad:
            raise SystemExit(f"--only: unknown cell(s) {', '.join(bad)}; cells are MODEL:ENGINE with MODEL in "
                             f"{MODELS} and ENGINE in {ENGINES}")
    me = __file__
    with tempfile.TemporaryDirectory() as tmp:
        for name in dict.fromkeys(m for m, _ in cells):
            paths = {v: str(Path(tmp) / f"{name}-{v}.onnx") for v in ("ln", "deployed")}
            ops = {v: run_variant(me, "export", name, v, p) for v, p in paths.items()}
            for engine in [e for m, e in cells if m == name]:
                runs: dict[str, list[dict]] = {"ln": [], "deployed": []}
                for r in range(rounds):
                    for v in (list(runs) if r % 2 == 0 else list(runs)[::-1]):   # who goes first alternates
                        runs[v].append(run_variant(me, "latency", name, v, engine, paths[v], str(reps)))
                inter = run_variant(me, "interleaved", name, engine, paths["ln"], paths["deployed"], str(2 * reps))
                record(cell_name(name, engine), {"model": name, "engine": engine, "rounds": rounds, "reps": reps,
                                                 "ort_threads": ORT_THREADS},
                       {"runs": runs, "interleaved": inter, "ops": ops})
    body = render()
    write_section("repbn", body)
    print(body)


if __name__ == "__main__":
    main()
