"""EvoNorm: training-step time and eval latency of B0/S0 against BatchNorm + ReLU, and the pass's own time.

    python benchmarks/evonorm.py            # stores results/evonorm.json, renders docs/benchmarks.md
    python benchmarks/evonorm.py --quick    # one round

ResNet-18 (torchvision, random weights): one SGD step at batch 16, 64×64, in train mode, and eval
latency at batch 1, 224×224; variants ``bn_relu`` (as built), ``b0`` (``normfx.evonorm(m)``) and
``s0`` (``variant="S0"``), each in its own process, alternating over rounds. The transform time of
``normfx.evonorm`` on ResNet-50 is measured in its own process too (median of repeated calls).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

NAME = "evonorm"
VARIANTS = ["bn_relu", "b0", "s0"]
BATCH, SIZE = 16, 64


def _model(variant: str) -> torch.nn.Module:
    import normfx
    from _common import torchvision_model

    m = torchvision_model("resnet18")
    if variant == "b0":
        m = normfx.evonorm(m, variant="B0")
    elif variant == "s0":
        m = normfx.evonorm(m, variant="S0")
    return m


def child(variant: str, steps: int) -> dict:
    from _common import train_step_ms

    torch.set_num_threads(2)
    model = _model(variant)
    step_ms = train_step_ms(model.train(), BATCH, SIZE, steps)
    import normfx

    model.eval()
    xe = torch.randn(1, 3, 224, 224)
    return {"step_ms": step_ms, "eval_ms": _latency_ms(model, xe, steps),
            "deployed_ms": _latency_ms(normfx.deploy(model), xe, steps)}


def _latency_ms(model: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    """Median of ``steps`` inference runs after 3 warm-up runs."""
    from _common import latency_ms

    with torch.inference_mode():
        return latency_ms(lambda: model(x), steps, warmup=3)


def child_transform(repeats: int) -> dict:
    import logging

    import normfx
    from _common import torchvision_model

    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    model = torchvision_model("resnet50")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        normfx.evonorm(model, variant="B0")
        times.append(time.perf_counter() - t0)
    return {"transform_ms": 1e3 * statistics.median(times), "first_ms": 1e3 * times[0]}


DEPLOYED = (" Deployed: `normfx.deploy` of each eval model: every BatchNorm of `bn_relu` folds into its "
            "conv; in `b0`/`s0` the EvoNorms without nonlinearity (x·γ + β) fold and those with it stay.")


def render() -> str:
    """The docs section, from the stored raw result."""
    from _common import load, machine_line, median, ratio_cell, table

    data = load(NAME)
    runs, c = data["raw"]["runs"], data["config"]
    rows = []
    for v in VARIANTS:
        step = [r["step_ms"] / b["step_ms"] for r, b in zip(runs[v], runs["bn_relu"])]
        ev = [r["eval_ms"] / b["eval_ms"] for r, b in zip(runs[v], runs["bn_relu"])]
        row = [v, f"{median(r['step_ms'] for r in runs[v]):.1f}", ratio_cell(step),
               f"{median(r['eval_ms'] for r in runs[v]):.1f}", ratio_cell(ev)]
        if "deployed_ms" in runs[v][0]:
            dep = [r["deployed_ms"] / b["deployed_ms"] for r, b in zip(runs[v], runs["bn_relu"])]
            row += [f"{median(r['deployed_ms'] for r in runs[v]):.1f}", ratio_cell(dep)]
        rows.append(row)
    deployed = "deployed_ms" in runs["bn_relu"][0]
    header = ["variant", "train step (ms)", "step ÷ bn_relu", "eval latency (ms)", "eval ÷ bn_relu"]
    if deployed:
        header += ["deployed eval latency (ms)", "deployed ÷ bn_relu deployed"]
    tr = data["raw"]["transform"]
    return f"""## EvoNorm (`benchmarks/evonorm.py`)

Machine: {machine_line(data)}. ResNet-18: one SGD step at batch {c['batch']}, {c['size']}×{c['size']}, train
mode, and eval latency at batch 1, 224×224. `bn_relu` is the model as built; `b0` and `s0` are
`normfx.evonorm(model, variant=...)`. Each variant its own process, alternating over {c['rounds']} round(s);
medians of {c['steps']} runs per process, then across rounds; ratios are medians of per-round ratios
[range]. EvoNorm computes its statistics in float32 with plain tensor ops (no fused kernel, as
BatchNorm has), so it is expected to cost more per layer.{DEPLOYED if deployed else ""} `{data['command']}`.

{table(header, rows)}

`normfx.evonorm` on ResNet-50 (53 BatchNorms): {median(r['transform_ms'] for r in tr):.0f} ms per call
(median over {len(tr)} process(es) of {c['repeats']} calls each; the first call in a process
{median(r['first_ms'] for r in tr):.0f} ms).
"""


def main() -> None:
    from _common import parse_args, record, run_variant, write_section

    args = parse_args(__doc__)
    if args.child is not None:
        kind, *rest = args.child
        res = child_transform(int(rest[0])) if kind == "transform" else child(kind, int(rest[0]))
        print(json.dumps(res))
        return
    rounds, steps, repeats = (1, 3, 3) if args.quick else (5, 10, 10)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            runs[v].append(run_variant(__file__, v, str(steps)))
    transform = [run_variant(__file__, "transform", str(repeats)) for _ in range(2 if not args.quick else 1)]
    record(NAME, {"rounds": rounds, "steps": steps, "batch": BATCH, "size": SIZE, "repeats": repeats},
           {"runs": runs, "transform": transform})
    body = render()
    write_section(NAME, body)
    print(body)


if __name__ == "__main__":
    main()
