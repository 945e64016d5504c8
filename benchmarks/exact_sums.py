"""What exact sums cost: a fixed-point ResNet-18's eval forward and training step with its conv/linear
sums in float64 (``normfx.nn.exact_sums``) against float32 sums.

    python benchmarks/exact_sums.py            # stores results/exact_sums.json, renders docs/benchmarks.md
    python benchmarks/exact_sums.py --quick    # one round (a smoke run)

``normfx.fixed_point(resnet18, bits=8)``, calibrated on one random batch. Variants, each in its own
process, alternating over the rounds: ``exact`` (as shipped: float64 sums in eval mode) and
``float32`` (the layers' float64 path switched off). Each process times the eval forward
(``torch.inference_mode``) and, for reference, a training step with the exact path forced on in
training mode too (normfx sums in float32 in training; this is what doing otherwise would cost),
batch 32 at 32×32, 2 threads, medians of ``reps`` runs after 3 warm-up runs; ratios are medians of
per-round ratios ``exact ÷ float32``.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

NAME = "exact_sums"
THREADS = 2


def child(variant: str, reps: int) -> dict:
    import torchvision

    import normfx
    from _common import latency_ms
    from normfx.nn import exact_sums

    logging.disable(logging.WARNING)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    q = normfx.fixed_point(torchvision.models.resnet18(num_classes=10), bits=8)
    normfx.calibrate(q, [torch.randn(8, 3, 32, 32)], progress=False)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    if variant == "float32":
        exact_sums.ExactSums._sums_exactly = lambda self, x: False   # type: ignore[method-assign]
    q.eval()
    with torch.inference_mode():
        eval_ms = latency_ms(lambda: q(x), reps, warmup=3)
    if variant == "exact":   # the training step as it would cost with float64 sums in training too
        original = exact_sums.ExactSums._sums_exactly

        def in_training_too(self, x):
            was, self.training = self.training, False
            try:
                return original(self, x)
            finally:
                self.training = was

        exact_sums.ExactSums._sums_exactly = in_training_too   # type: ignore[method-assign]
    q.train()
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(q(x), y).backward()
        opt.step()

    train_ms = latency_ms(step, reps, warmup=3)
    return {"eval_ms": eval_ms, "train_ms": train_ms}


def render() -> str:
    from _common import load, machine_line, median, ratio_cell, table

    data = load(NAME)
    runs = data["raw"]["runs"]
    rows = []
    for key, label in (("eval_ms", "eval forward (as shipped: float64 sums)"),
                       ("train_ms", "training step, float64 sums forced on (normfx trains with float32 sums)")):
        rows.append([label, f"{median(r[key] for r in runs['exact']):.1f}",
                     f"{median(r[key] for r in runs['float32']):.1f}",
                     ratio_cell([a[key] / b[key] for a, b in zip(runs["exact"], runs["float32"])])])
    c = data["config"]
    intro = (f"A calibrated 8-bit `fixed_point(resnet18)`, batch 32 at 32×32, {c['threads']} threads, each variant its "
             f"own process, {c['rounds']} rounds; medians of {c['reps']} runs per process, ratios are medians of "
             f"per-round ratios [range]. `{data['command']}`; {machine_line(data)}.")
    return ("## Exact fixed-point sums (`benchmarks/exact_sums.py`)\n\n" + intro + "\n\n"
            + table(["", "float64 sums (ms)", "float32 sums (ms)", "ratio"], rows))


def main() -> None:
    from _common import alternating_rounds, parse_args, store_and_render

    args = parse_args(__doc__)
    if args.child is not None:
        variant, reps = args.child
        print(json.dumps(child(variant, int(reps))))
        return
    rounds, reps = (1, 3) if args.quick else (3, 10)
    runs = alternating_rounds(__file__, ["exact", "float32"], rounds, str(reps))
    store_and_render(NAME, {"rounds": rounds, "reps": reps, "threads": THREADS}, {"runs": runs}, render)


if __name__ == "__main__":
    main()
