"""``normfx inspect``: the time to list every site and what each transform would do there.

    python benchmarks/inspect_sites.py            # stores results/inspect.json, renders docs/benchmarks.md
    python benchmarks/inspect_sites.py --quick    # one round
    python benchmarks/inspect_sites.py --label before --no-render   # store results/inspect_before.json

Variants, each in its own process, alternating over rounds, on ResNet-50 and ViT-B/16 (torchvision,
random weights):

* ``inspect``: ``normfx.cli.inspect_model(model)`` as the code stands.
* ``transforms``: the anchor, what ``inspect`` used to do: run every one-liner it shows (Tune,
  Deploy, PRepBN, BN-only freeze, fixed point, EvoNorm, linear attention) on a copy of the model and
  read their reports.

Each process times ``repeats`` calls after one untimed call and reports the median.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

NAME = "inspect"
MODELS = ["resnet50", "vit_b_16"]
VARIANTS = ["transforms", "inspect"]


def _transforms(model: torch.nn.Module) -> None:
    import normfx

    for run in (lambda: normfx.convbn(model, mode="tune"), lambda: normfx.convbn(model, mode="deploy"),
                lambda: normfx.repbn(model, total_steps=1), lambda: normfx.freeze(model),
                lambda: normfx.fixed_point(model), lambda: normfx.evonorm(model),
                lambda: normfx.linear_attention(model)):
        try:
            normfx.last_report(run())
        except (normfx.NormfxError, ValueError):
            pass


def child(model_name: str, variant: str, repeats: int) -> None:
    from _common import latency_ms, torchvision_model

    from normfx.cli import inspect_model

    torch.set_num_threads(1)
    model = torchvision_model(model_name)
    run = (lambda: inspect_model(model)) if variant == "inspect" else (lambda: _transforms(model))
    print(json.dumps({"model": model_name, "variant": variant, "ms": latency_ms(run, repeats, warmup=1)}))


def render() -> str:
    from _common import load, ratio_cell, table

    data = load(NAME)
    raw = data["raw"]
    rows = []
    for model in MODELS:
        ms = {v: [r["ms"] for r in raw[model][v]] for v in VARIANTS}
        ratios = [t / i for t, i in zip(ms["transforms"], ms["inspect"])]
        rows.append([model, f"{statistics.median(ms['transforms']):.0f}", f"{statistics.median(ms['inspect']):.0f}",
                     ratio_cell(ratios)])
    before = ""
    path = Path(__file__).resolve().parent / "results" / "inspect_before.json"
    if path.exists():
        old = json.loads(path.read_text())
        cells = []
        for model in MODELS:
            o, n = old["raw"][model], raw[model]
            was = statistics.median(r["ms"] for r in o["inspect"])
            now = statistics.median(r["ms"] for r in n["inspect"])
            ratio = [t / i for t, i in zip([r["ms"] for r in o["transforms"]], [r["ms"] for r in o["inspect"]])]
            cells.append(f"{model}: {was:.0f} ms, speed-up over the anchor {ratio_cell(ratio)}; now {now:.0f} ms "
                         f"({was / now:.1f}× faster)")
        before = (f"\n\nBefore the dry run (`{old['command']}` at commit {old['config'].get('commit', '?')}, the "
                  "same script), `inspect` ran seven transforms on copies: " + "; ".join(cells)
                  + ". The two runs are separate, so that comparison carries the drift between them; the speed-ups "
                  "over the anchor are each measured within one run.")
    m, v = data["machine"], data["versions"]
    return (
        "## `normfx inspect`: a dry run over the registry\n\n"
        f"`{data['command']}` — {m['cpu']}, {m['cores']} cores, torch {v['torch']}, Python {v['python']}, one "
        f"thread per process; {data['config']['rounds']} rounds, each variant in its own "
        f"process, median of {data['config']['repeats']} calls per process. `transforms` (the anchor) runs the "
        "seven one-liners `inspect` shows on copies and reads their reports, as `inspect` used to; `inspect` is "
        "`normfx.cli.inspect_model`, which matches and plans every registered transform on one analysis of the "
        "model and changes nothing. Speed-up: the anchor's time over `inspect`'s, per round (median [range]).\n\n"
        + table(["model", "transforms (ms)", "inspect (ms)", "speed-up"], rows) + before
    )


def main() -> None:
    from _common import parse_args, record, run_variant, write_section

    def extra(ap):
        ap.add_argument("--label", default="", help="store results/inspect_<label>.json instead")
        ap.add_argument("--no-render", action="store_true", help="do not rewrite docs/benchmarks.md")

    args = parse_args(__doc__, extra)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    rounds, repeats = (1, 3) if args.quick else (5, 7)
    raw: dict = {m: {v: [] for v in VARIANTS} for m in MODELS}
    for r in range(rounds):
        for m in MODELS:
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                raw[m][v].append(run_variant(__file__, m, v, str(repeats)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    record(NAME + (f"_{args.label}" if args.label else ""),
           {"rounds": rounds, "repeats": repeats, "models": MODELS, "commit": commit}, raw)
    if not args.no_render:
        write_section(NAME, render())


if __name__ == "__main__":
    main()
