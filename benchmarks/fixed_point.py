"""Fixed point (QFX): training-step time of the quantized model vs the float model.

    python benchmarks/fixed_point.py            # stores results/fixed_point.json, renders docs/benchmarks.md
    python benchmarks/fixed_point.py --quick    # one round

ResNet-18 (torchvision, random weights), batch 16 at 64×64, SGD step in train mode. Variants, each
in its own process: ``float``; ``fixed8``: ``normfx.fixed_point(model, bits=8)`` on every target
(weights, biases, activations, BatchNorm, adds) with trainable binary points; ``fixed8_k2``: the same
with 2-hot BatchNorm scales. Target: ≤ 1.5 × the float step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

BATCH, SIZE = 16, 64
VARIANTS = ["float", "fixed8", "fixed8_k2"]


def child(variant: str, steps: int) -> dict:
    import normfx
    from _common import torchvision_model, train_step_ms

    torch.set_num_threads(2)
    model = torchvision_model("resnet18")
    if variant != "float":
        model = normfx.fixed_point(model, bits=8, k_hot=2 if variant.endswith("k2") else None)
        normfx.calibrate(model, [torch.randn(BATCH, 3, SIZE, SIZE)])
    return {"step_ms": train_step_ms(model.train(), BATCH, SIZE, steps)}


NAME = "fixed_point"


def render() -> str:
    """The docs section, from the stored raw result."""
    from _common import load, machine_line, median, ratio_cell, table

    data = load(NAME)
    runs, c = data["raw"]["runs"], data["config"]
    rows = []
    for v in VARIANTS:
        ms = median(r["step_ms"] for r in runs[v])
        ratios = [r["step_ms"] / f["step_ms"] for r, f in zip(runs[v], runs["float"])]
        rows.append([v, f"{ms:.1f}", ratio_cell(ratios)])
    return f"""## Fixed point (`benchmarks/fixed_point.py`)

Machine: {machine_line(data)}. ResNet-18, batch {c['batch']} at {c['size']}×{c['size']}, one SGD step
(forward, backward, update) in train mode; each variant its own process, alternating over {c['rounds']}
round(s); medians of {c['steps']} steps per process, then across rounds; ratios are medians of
per-round ratios [range]. `fixed8`: `normfx.fixed_point(model, bits=8)` on weights, biases,
activations, BatchNorm and residual adds, binary points trainable; `fixed8_k2`: with 2-hot BatchNorm
scales. Target: ≤ 1.5 × float. `{data['command']}`.

{table(["variant", "step (ms)", "÷ float"], rows)}
"""


def main() -> None:
    from _common import parse_args, record, run_variant, write_section

    args = parse_args(__doc__)
    if args.child is not None:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    rounds, steps = (1, 5) if args.quick else (7, 15)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(rounds):
        for v in VARIANTS:
            runs[v].append(run_variant(__file__, v, str(steps)))
    record(NAME, {"rounds": rounds, "steps": steps, "batch": BATCH, "size": SIZE}, {"runs": runs})
    body = render()
    write_section(NAME, body)
    print(body)


if __name__ == "__main__":
    main()
