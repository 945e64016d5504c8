"""PRepBN benchmark: latency of the deployed (LayerNorm-free) model vs the original LayerNorm model.

    python benchmarks/repbn.py            # writes the "repbn" section of docs/benchmarks.md
    python benchmarks/repbn.py --quick

For vit_b_16 and swin_t (random weights, 224×224): the original model, and the same model after
``normfx.repbn`` with λ = 0, randomized statistics and ``normfx.deploy``; torch eager and ONNX
Runtime; batch 1 and 8. Each (model, variant, engine) runs in its own process; variants alternate
over rounds. The torch profiler's share of LayerNorm in the original model's CPU time is measured
too: it bounds the saving.
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
BATCHES = [1, 8]
ORT_THREADS = 2


def build(name: str, variant: str) -> torch.nn.Module:
    import torchvision

    import normfx
    from normfx.nn import ProgressiveRepBN

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    if variant == "ln":
        return model
    m = normfx.repbn(model, total_steps=1)
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, ProgressiveRepBN):
            mod.lam.zero_()
            n = mod.repbn.bn.num_features
            mod.repbn.bn.running_var.uniform_(0.5, 2.0, generator=g)
            mod.repbn.bn.running_mean.normal_(0, 0.1, generator=g)
    return normfx.deploy(m.eval())


def child_export(name: str, variant: str, path: str) -> dict:
    import logging

    import normfx

    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    report = normfx.export(build(name, variant), torch.randn(2, 3, 224, 224), path)
    counts = report.op_counts
    return {"norm_ops": sum(counts.get(k, 0) for k in ("LayerNormalization", "BatchNormalization")),
            "muladd": counts.get("Mul", 0)}


def child_latency(name: str, variant: str, engine: str, path: str, reps: int) -> dict:
    torch.set_num_threads(2)
    out: dict = {}
    if engine == "ort":
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = ORT_THREADS, 1
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


def main() -> None:
    from _common import machine, parse_args, ratio_cell, run_variant, table, write_section

    args = parse_args(__doc__)
    if args.child is not None:
        kind, *rest = args.child
        res = child_export(*rest) if kind == "export" else child_latency(*rest[:4], int(rest[4]))
        print(json.dumps(res))
        return

    rounds, reps = (1, 5) if args.quick else (2, 8)
    me = __file__
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            paths = {v: str(Path(tmp) / f"{name}-{v}.onnx") for v in ("ln", "deployed")}
            ops = {v: run_variant(me, "export", name, v, p) for v, p in paths.items()}
            for engine in ("eager", "ort"):
                runs: dict[str, list[dict]] = {"ln": [], "deployed": []}
                for _ in range(rounds):
                    for v in runs:
                        runs[v].append(run_variant(me, "latency", name, v, engine, paths[v], str(reps)))
                for b in BATCHES:
                    k = f"b{b}_ms"
                    ln = statistics.median(r[k] for r in runs["ln"])
                    dep = statistics.median(r[k] for r in runs["deployed"])
                    ratios = [d[k] / l_[k] for l_, d in zip(runs["ln"], runs["deployed"])]
                    share = statistics.median(r["ln_share"] for r in runs["ln"]) if engine == "eager" else None
                    rows.append([name, engine, str(b), f"{ln:.1f}", f"{dep:.1f}", ratio_cell(ratios),
                                 f"{100 * share:.1f}%" if share is not None else "",
                                 f"{ops['ln']['norm_ops']} / {ops['deployed']['norm_ops']}" if engine == "ort" else ""])
    md = table(["model", "engine", "batch", "LayerNorm model (ms)", "deployed PRepBN (ms)", "deployed ÷ LN",
                "LayerNorm share of CPU time (profiler)", "norm ops in ONNX: LN model / deployed"], rows)
    body = f"""## PRepBN (`benchmarks/repbn.py`)

Machine: {machine()}; ONNX Runtime with {ORT_THREADS} intra-op threads. Each (model, variant, engine)
is its own process; the two variants alternate over {rounds} round(s); times are medians across
rounds of per-process medians; ratios are medians of per-round ratios, [range over rounds].

Target: never slower, the saving close to LayerNorm's profiled share, no normalization op in the
exported graph (swin_t keeps 13 sites as one multiply-add each, see docs/repbn.md; those are `Mul`+`Add`,
not normalization ops).

{md}

GPU (batch 64, where the paper reports its 2.4 ms / 16.2 ms saving) has not been measured: this task
was not lent a GPU machine.
"""
    write_section("repbn", body)
    print(body)


if __name__ == "__main__":
    main()
