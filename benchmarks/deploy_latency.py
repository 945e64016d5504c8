"""Deployed models' latency: ``normfx.deploy`` vs ``fuse`` vs the model's own ``reparameterize``.

    python benchmarks/deploy_latency.py            # stores results/deploy_latency.json, renders docs/benchmarks.md
    python benchmarks/deploy_latency.py --quick    # one round (a smoke run)

timm models with random weights and randomized BatchNorm statistics where ``normfx.deploy`` does more
than fold conv → BatchNorm pairs (summed branches merged, a BatchNorm split over a concatenation or
folded through a reshape), and a plain ResNet-50. Variants, each in its own process, alternating over
the rounds: the eval-mode model (``eager``), ``torch.fx.experimental.optimization.fuse``, the
model's own ``timm.utils.model.reparameterize_model`` where it has one (``reparam``), and
``normfx.deploy(model, example_inputs=x)``. Each process measures the variant in eager PyTorch and
in ONNX Runtime (its own export, legacy TorchScript exporter, ORT's default graph optimizations,
which fold Conv+BatchNormalization themselves), batch 1 at 224×224, 2 threads, median of ``reps``
runs after 5 warm-up runs; ratios are medians of per-round ratios (against ``fuse``, and normfx against ``reparam``).
"""
from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

NAME = "deploy_latency"
MODELS = ["resnet50", "repvgg_a0", "mobileone_s0", "repghostnet_050", "mixnet_s", "levit_128s"]
REPARAM = {"repvgg_a0", "mobileone_s0", "repghostnet_050"}   # timm models with their own reparameterize
THREADS = 2


def _model(name: str) -> torch.nn.Module:
    import timm

    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    return randomize_bn(timm.create_model(name), torch.randn(8, 3, 224, 224)).eval()


def _variant(model: torch.nn.Module, variant: str, x: torch.Tensor) -> torch.nn.Module:
    import normfx

    if variant == "eager":
        return model
    if variant == "fuse":
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    if variant == "reparam":
        from timm.utils.model import reparameterize_model

        return reparameterize_model(model)
    return normfx.deploy(model, example_inputs=x)


def child(name: str, variant: str, reps: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from _common import latency_ms

    from tests.conftest import rel_err

    logging.disable(logging.WARNING)
    torch.set_num_threads(THREADS)
    x = torch.randn(1, 3, 224, 224)
    model = _model(name)
    with torch.no_grad():
        ref = model(x)
    out = _variant(model, variant, x)
    # fuse traces through timm's BatchNormAct2d: what it leaves are functional batch_norm calls
    bn_left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in out.modules())
    if hasattr(out, "graph"):
        bn_left += sum(n.op == "call_function" and n.target is torch.nn.functional.batch_norm for n in out.graph.nodes)
    with torch.inference_mode():
        err = rel_err(out(x), ref)
        eager_ms = latency_ms(lambda: out(x), reps, warmup=5)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "m.onnx")
        torch.onnx.export(out, (x,), path, dynamo=False)
        graph = _graph_signature(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = THREADS
        opts.inter_op_num_threads = 1
        s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        feed = {s.get_inputs()[0].name: x.numpy().astype(np.float32)}
        ort_ms = latency_ms(lambda: s.run(None, feed), reps, warmup=5)
    return {"eager_ms": eager_ms, "ort_ms": ort_ms, "bn_left": bn_left, "rel_err": err, "onnx_graph": graph}


def _graph_signature(path: str) -> str:
    """A digest of an ONNX file's graph: its ops in order with their attributes, and its weights'
    shapes (not their values). Two variants with the same digest give ORT the same work."""
    import hashlib

    import onnx

    g = onnx.load(path).graph
    parts = [f"{n.op_type}{sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)}"
             for n in g.node]
    parts += sorted(f"{list(t.dims)}" for t in g.initializer)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def render() -> str:
    """The docs section, from the stored raw result."""
    from _common import load, machine_line, median, ratio_cell, table

    data = load(NAME)
    c = data["config"]
    rows = []
    def cell(runs: dict, v: str, key: str) -> str:
        return f"{median(r[key] for r in runs[v]):.1f}" if v in runs else "—"

    def ratio(runs: dict, v: str, key: str, to: str = "fuse") -> str:
        return ratio_cell([b[key] / a[key] for a, b in zip(runs[to], runs[v])]) if v in runs and to in runs else "—"

    for name, runs in data["raw"]["models"].items():
        bn = " / ".join(str(runs[v][0]["bn_left"]) if v in runs else "—"
                        for v in ("eager", "fuse", "reparam", "normfx"))
        rows.append([name, bn, *(cell(runs, v, "eager_ms") for v in ("eager", "fuse", "reparam", "normfx")),
                     ratio(runs, "normfx", "eager_ms"), ratio(runs, "normfx", "eager_ms", "reparam"),
                     *(cell(runs, v, "ort_ms") for v in ("fuse", "reparam", "normfx")),
                     ratio(runs, "normfx", "ort_ms"), ratio(runs, "normfx", "ort_ms", "reparam")])
    worst = max(max(r["rel_err"] for r in runs["normfx"]) for runs in data["raw"]["models"].values())
    same = [name for name, runs in data["raw"]["models"].items() if "reparam" in runs
            and {r.get("onnx_graph") for r in runs["normfx"] + runs["reparam"]} - {None} and
            len({r.get("onnx_graph") for r in runs["normfx"] + runs["reparam"]}) == 1]
    intro = (f"Deployed models, batch 1 at 224×224, {c['threads']} threads, each variant its own process, "
             f"{c['rounds']} rounds alternating the variants; times are medians across rounds of per-process "
             f"medians of {c['reps']} runs; ratios are medians of per-round ratios [range]. `reparam` is "
             "timm's `reparameterize_model`, for the models that have one. ORT: each variant's own ONNX export "
             "with ORT's default optimizations (which fold Conv+BatchNormalization in every file). Largest "
             f"relative error of normfx's deployed model against the eval-mode model: {worst:.1e}. "
             f"`{data['command']}`; {machine_line(data)}."
             + (f" normfx's and `reparam`'s ONNX files are the same graph (ops, attributes and weight shapes) "
                f"for {', '.join(same)}: their ORT times differ by run-to-run spread only." if same else ""))
    header = ["model", "BN left: eager / fuse / reparam / normfx", "eager (ms)", "fuse (ms)", "reparam (ms)",
              "normfx (ms)", "normfx ÷ fuse", "normfx ÷ reparam", "ORT fuse (ms)", "ORT reparam (ms)",
              "ORT normfx (ms)", "ORT normfx ÷ fuse", "ORT normfx ÷ reparam"]
    return "## Deployed models (`benchmarks/deploy_latency.py`)\n\n" + intro + "\n\n" + table(header, rows)


def main() -> None:
    from _common import alternating_rounds, parse_args, store_and_render

    args = parse_args(__doc__)
    if args.child is not None:
        name, variant, reps = args.child
        print(json.dumps(child(name, variant, int(reps))))
        return
    rounds, reps = (1, 10) if args.quick else (5, 30)
    models: dict[str, dict[str, list[dict]]] = {}
    for name in MODELS:
        variants = ["eager", "fuse", *(["reparam"] if name in REPARAM else []), "normfx"]
        runs = alternating_rounds(__file__, variants, rounds, name, str(reps))
        models[name] = runs
        print(name, {v: round(rs[-1]["eager_ms"], 1) for v, rs in runs.items()}, flush=True)
    store_and_render(NAME, {"rounds": rounds, "reps": reps, "threads": THREADS}, {"models": models}, render)


if __name__ == "__main__":
    main()
