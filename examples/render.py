"""Render the docs tables from the stored results (``examples/results/*.json``).

    python examples/render.py          # rewrite every table between its markers in docs/
    python examples/render.py --check  # exit 1 if a docs table differs from its rendering

A table lives in a docs page between ``<!-- results: NAME -->`` and ``<!-- /results: NAME -->``;
NAME is a stored result with a renderer below.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import load, mean_std  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKER = re.compile(r"(<!-- results: (\w+) -->\n)(.*?)(<!-- /results: \2 -->)", re.S)


def fixed_point(data: dict) -> str:
    runs = data["runs"]
    bits = data["config"]["bits"]
    rows = [("float", "float"), ("PTQ (calibrate only)", "PTQ"),
            ("QAT (weights trained, binary points fixed at calibration)", "QAT"),
            ("QFX (weights and binary points trained)", "QFX")]
    lines = [f"| test accuracy, mean ± std over {len(runs)} seeds | " + " | ".join(f"W = {b}" for b in bits) + " |",
             "|---|" + "---|" * len(bits)]
    for label, key in rows:
        cells = [mean_std([r[key][str(b)] for r in runs]) for b in bits]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    moved = " | ".join(f"{sum(r['QFX_moved'][str(b)] for r in runs)} of {sum(r['casts'][str(b)] for r in runs)}"
                       for b in bits)
    lines.append(f"| binary points QFX training moved (over seeds) | {moved} |")
    lines.append("")
    lines.append(f"`{data['command']}`; seeds {', '.join(str(r['seed']) for r in runs)}; "
                 f"torch {data['versions']['torch']}.")
    return "\n".join(lines) + "\n"


def prepbn_vit(data: dict) -> str:
    runs = data["runs"]
    r0 = runs[0]
    rows = [("LayerNorm", "LayerNorm"), ("PRepBN (λ = 0)", "PRepBN"),
            ("PRepBN after `recalibrate_bn`", "PRepBN_recalibrated"),
            (f"deployed ({r0['folded']} RepBNs folded, {r0['normalization_left']} normalization modules left)",
             "deployed")]
    lines = [f"| model | test accuracy, mean ± std over {len(runs)} seeds |", "|---|---|"]
    lines += [f"| {label} | {mean_std([r[key] for r in runs])} |" for label, key in rows]
    onnx = r0["onnx"]
    lines += ["", f"Deployed vs PRepBN model: at most {max(r['deploy_rel_err'] for r in runs):.1e} relative (over "
              f"seeds). ONNX export of seed {r0['seed']}: {onnx['LayerNormalization']} `LayerNormalization`, "
              f"{onnx['BatchNormalization']} `BatchNormalization`, ONNX Runtime vs PyTorch max rel err "
              f"{onnx['max_rel']:.1e}. `{data['command']}`; seeds {', '.join(str(r['seed']) for r in runs)}; "
              f"torch {data['versions']['torch']}."]
    return "\n".join(lines) + "\n"





def bn_only() -> str:
    short, long = load("bn_only_15ep"), load("bn_only_30ep")
    labels = {"all": "all parameters", "bn_only": 'BN only (`keep=("norm",)`)',
              "random": f"random control (`keep=(), random={short['runs'][0]['bn_only']['trainable']}`)",
              "head_only": 'head only (`keep=("head",)`)'}
    n = len(short["runs"])
    lines = [f"| config | trainable entries | test accuracy, {short['config']['epochs']} epochs | test accuracy, "
             f"{long['config']['epochs']} epochs | \\|γ\\| < 0.01 (largest over seeds, {short['config']['epochs']} "
             "epochs) |", "|---|---|---|---|---|"]
    for key, label in labels.items():
        disabled = max(r[key]["disabled"] for r in short["runs"])
        lines.append(f"| {label} | {short['runs'][0][key]['trainable']:,} | "
                     f"{mean_std([r[key]['accuracy'] for r in short['runs']])} | "
                     f"{mean_std([r[key]['accuracy'] for r in long['runs']])} | {100 * disabled:.1f}% |")
    lines += ["", f"Mean ± std over {n} seeds (each its own initial weights, batch order and random draw); "
              f"`{short['command']}` and `{long['command']}`; torch {short['versions']['torch']}."]
    return "\n".join(lines) + "\n"


# Each docs table: how to render it, and the stored results it is rendered from.
RENDERERS: dict[str, tuple] = {
    "fixed_point": (lambda: fixed_point(load("fixed_point")), ["fixed_point"]),
    "prepbn_vit": (lambda: prepbn_vit(load("prepbn_vit")), ["prepbn_vit"]),
    "bn_only": (bn_only, ["bn_only_15ep", "bn_only_30ep"]),
}


def render_page(text: str) -> str:
    def sub(m: re.Match) -> str:
        render, _ = RENDERERS[m.group(2)]
        return m.group(1) + render() + m.group(4)
    return MARKER.sub(sub, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args()
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        new = render_page(text)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print("docs tables differ from their stored results: " + ", ".join(stale))
        return 1
    print(("rewrote " if stale else "up to date: ") + (", ".join(stale) or "every results table"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
