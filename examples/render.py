"""Render the docs tables from the stored results (``examples/results/*.json``).

    python examples/render.py          # rewrite every table between its markers in docs/
    python examples/render.py --check  # exit 1 if a docs table differs from its rendering

A table lives in a docs page between ``<!-- results: NAME -->`` and ``<!-- /results: NAME -->``;
NAME is a stored result with a renderer below.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import load, mean_std  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARKER = re.compile(r"(<!-- results: (\w+) -->\n)(.*?)(<!-- /results: \2 -->)", re.S)


def _dataset(data: dict) -> str:
    """The data a result was trained on: the configuration's ``dataset``; a run with ``train``/``test``
    subset sizes and no name is a Fashion-MNIST run; older runs are scikit-learn's digits."""
    c = data["config"]
    return c.get("dataset") or ("Fashion-MNIST" if "train" in c and "test" in c else "scikit-learn's digits")


def _source(data: dict) -> str:
    """What a table's footnote ends with: the data, the command that stored the result and torch's version."""
    return f"{_dataset(data)}; `{data['command']}`; torch {data['versions']['torch']}."


def fixed_point(data: dict) -> str:
    runs, c = data["runs"], data["config"]
    keys = [str(b) for b in c["bits"]] + [f"w{wb}a{c['wide']}" for wb in c.get("weight_bits", [])]
    heads = [f"W = {b}" for b in c["bits"]] + [f"weights {wb}, rest {c['wide']}" for wb in c.get("weight_bits", [])]
    rows = [("float", "float"), ("PTQ (calibrate only)", "PTQ"),
            ("QAT (weights trained, binary points fixed at calibration)", "QAT"),
            ("QFX (weights and binary points trained)", "QFX"),
            ("LSQ anchor (free trained scales, not powers of two)", "LSQ"),
            (f"PTQ, calibrated on one batch of {data['config']['few']}", "PTQ_few"),
            ("QAT from that calibration", "QAT_few"),
            ("QFX from that calibration", "QFX_few"),
            ("PTQ, binary K-hot scales (`k_hot_code=\"binary\"`)", "PTQ_binary"),
            ("QFX, binary K-hot scales", "QFX_binary")]
    lines = [f"| test accuracy, mean ± std over {len(runs)} seeds | " + " | ".join(heads) + " |",
             "|---|" + "---|" * len(keys)]
    for label, key in [(label, key) for label, key in rows if key in runs[0]]:
        cells = [mean_std([r[key][k] for r in runs]) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    moved = " | ".join(f"{sum(r['QFX_moved'][k] for r in runs)} of {sum(r['casts'][k] for r in runs)}" for k in keys)
    lines.append(f"| casts whose binary point QFX training moved (over seeds) | {moved} |")
    few = " | ".join(f"{sum(r['QFX_few_moved'][k] for r in runs)} of {sum(r['casts'][k] for r in runs)}"
                     for k in keys)
    lines.append(f"| the same, from the one-batch calibration | {few} |")
    shift = " | ".join(", ".join(f"{r['QFX_shift'][k]:+d}" for r in runs) for k in keys)
    lines.append(f"| largest shift of a binary point in QFX, bits (per seed) | {shift} |")
    for code in [c for c in ("csd", "binary") if f"terms_{c}" in runs[0]]:
        cells = " | ".join(f"{sum(r[f'terms_{code}'][k] for r in runs) / len(runs):.2f}" for k in keys)
        lines.append(f"| mean terms per BN scale after QFX, `{code}` count | {cells} |")
    lines.append("")
    lines.append(f"{_dataset(data)}; `{data['command']}`; seeds {', '.join(str(r['seed']) for r in runs)}; "
                 f"binary points' learning "
                 f"rate {data['config']['binary_point_lr']} (`normfx.param_groups`); "
                 f"torch {data['versions']['torch']}.")
    return "\n".join(lines) + "\n"


PREPBN_LABELS = {
    "PRepBN": "PRepBN: λ 1 → 0 over the first 3/4 of training",
    "PRepBN_ramp50": "PRepBN: λ 1 → 0 over the first half",
    "PRepBN_warm": "PRepBN: λ = 1 for the first quarter (SLAB's `warm`), then 1 → 0 by 3/4",
    "RepBN": "RepBN from the first step (λ = 0 throughout; SLAB's DeiT-T config)",
}


def prepbn_vit(data: dict) -> str:
    runs = data["runs"]
    r0 = runs[0]
    variants = [v for v in PREPBN_LABELS if v in r0]
    lines = ["| model | test accuracy at the end of training | after `recalibrate_bn` | "
             "difference to LayerNorm (after recalibration) |", "|---|---|---|---|"]
    ln = [r["LayerNorm"] for r in runs]
    lines.append(f"| LayerNorm | {mean_std(ln)} | — | — |")
    for v in variants:
        diff = [r[f"{v}_recalibrated"] - r["LayerNorm"] for r in runs]
        lines.append(f"| {PREPBN_LABELS[v]} | {mean_std([r[v] for r in runs])} | "
                     f"{mean_std([r[f'{v}_recalibrated'] for r in runs])} | {mean_std(diff, signed=True)} |")
    lines.append(f"| PRepBN deployed ({r0['folded']} RepBNs folded, {r0['normalization_left']} normalization "
                 f"modules left) | {mean_std([r['deployed'] for r in runs])} | — | — |")
    onnx = r0["onnx"]
    lines += ["", f"Mean ± std over {len(runs)} seeds (each its own initial weights and batch order, shared by "
              f"every row). Deployed vs recalibrated PRepBN model: at most "
              f"{max(r['deploy_rel_err'] for r in runs):.1e} relative (over seeds). ONNX export of seed "
              f"{r0['seed']}: {onnx['LayerNormalization']} `LayerNormalization`, {onnx['BatchNormalization']} "
              f"`BatchNormalization`, ONNX Runtime vs PyTorch max rel err {onnx['max_rel']:.1e}. "
              f"{_source(data)}"]
    return "\n".join(lines) + "\n"


BN_ONLY_LABELS = {
    "all": "all parameters",
    "bn_only": 'BN only (`keep=("norm",)`), output layer frozen',
    "bn_head": 'BN and output layer (`keep=("norm", "head")`)',
    "random_channel": 'paper\'s control: 2 random entries per output channel (`keep=(), random="per_channel"`)',
    "random_uniform": "uniform control: as many entries drawn from every frozen tensor (`keep=(), random=N`)",
    "head_only": 'output layer only (`keep=("head",)`)',
}
BN_ONLY_SOURCES = ["bn_only_resnet14_15ep_ones", "bn_only_resnet20_15ep_ones", "bn_only_resnet32_15ep_ones",
                   "bn_only_resnet14_15ep_uniform"]


def _bn_column(data: dict) -> str:
    c = data["config"]
    return f"ResNet-{c['depth']}, γ {'~ U[0, 1)' if c['bn_init'] == 'uniform' else '= 1'}, {_dataset(data)}"


def bn_only() -> str:
    results = [load(name) for name in BN_ONLY_SOURCES]
    head = "| config | " + " | ".join(_bn_column(d) for d in results) + " |"
    lines = ["Test accuracy (trainable entries):", "", head, "|---|" + "---|" * len(results)]
    for key, label in BN_ONLY_LABELS.items():
        cells = []
        for d in results:
            runs = d["runs"]
            cells.append(f"{mean_std([r[key]['accuracy'] for r in runs])} ({runs[0][key]['trainable']:,})"
                         if key in runs[0] else "not run")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Disabled features, mean over seeds: share of BatchNorm channels with |γ| < 0.01 / share of "
              "ReLU units never positive on the test split:", "", head, "|---|" + "---|" * len(results)]
    for key, label in BN_ONLY_LABELS.items():
        cells = []
        for d in results:
            runs = d["runs"]
            if key not in runs[0]:
                cells.append("not run")
                continue
            g = sum(r[key]["disabled"] for r in runs) / len(runs)
            a = sum(r[key]["inactive"] for r in runs) / len(runs)
            cells.append(f"{100 * g:.1f}% / {100 * a:.1f}%")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = len(results[0]["runs"])
    lines += ["", f"Mean ± std over {n} seeds (each its own initial weights, batch order and random draw), "
              f"{results[0]['config']['epochs']} epochs; " + "; ".join(f"`{d['command']}`" for d in results)
              + f"; torch {results[0]['versions']['torch']}."]
    return "\n".join(lines) + "\n"


def evonorm(data: dict) -> str:
    runs, c = data["runs"], data["config"]
    batches = [str(b) for b in c["batches"]]
    head = ("| model | " + " | ".join(f"test accuracy, batch {b}" for b in batches) + " | "
            + " | ".join(f"step time ÷ BN-ReLU, batch {b}" for b in batches) + " |")
    lines = [head, "|---|" + "---|" * (2 * len(batches))]
    for k in ("BN-ReLU", "EvoNorm-B0", "EvoNorm-S0"):
        acc = [mean_std([r[b][k]["accuracy"] for r in runs]) for b in batches]
        ratio = [mean_std([r[b][k]["step_ms"] / r[b]["BN-ReLU"]["step_ms"] for r in runs], digits=2)
                 for b in batches]
        lines.append(f"| {k} | " + " | ".join(acc + ratio) + " |")
    lines += ["", f"Mean ± std over {len(runs)} seeds (each its own initial weights and batch order, shared by the "
              f"three models); step time: median training step per model, in the same process, steps "
              f"interleaved. {_source(data)}"]
    return "\n".join(lines) + "\n"


DIRECTPRED_LABELS = {
    "init": "encoder at initialization (no training; the floor)",
    "two_layer_bn": "two-layer predictor with BatchNorm (trained; SimSiam's)",
    "linear": "linear predictor (trained)",
    "directpred": "DirectPred (`normfx.directpred(model)`)",
    "directcopy": 'DirectCopy (`normfx.directpred(model, mode="directcopy")`)',
}


def directpred(data: dict) -> str:
    runs = data["runs"]
    lines = ["| predictor | kNN test accuracy (k = 5) | linear-probe test accuracy |", "|---|---|---|"]
    for k, label in DIRECTPRED_LABELS.items():
        if k not in runs[0]:
            continue
        lines.append(f"| {label} | {mean_std([r[k]['knn'] for r in runs])} | "
                     f"{mean_std([r[k]['linear_probe'] for r in runs])} |")
    last = [r["spectrum"][-1] for r in runs]
    above = [sum(v > 0.01 for v in sp) for sp in last]
    lines += ["", f"Mean ± std over {len(runs)} seeds (each its own initial weights, batches and augmentations, "
              f"shared by the four runs), {data['config']['epochs']} epochs. At the end of training DirectPred's F "
              f"has {min(above)}–{max(above)} of {len(last[0])} eigenvalues above 1% of the largest (over seeds). "
              f"{_source(data)}"]
    return "\n".join(lines) + "\n"


GROKKING_LABELS = {"none": "no regularization", "wd": "weight decay 1.0", "bn": "BatchNorm (weight decay 0)"}


def _corr(a: list[float], b: list[float]) -> float:
    import statistics

    return statistics.correlation(a, b) if len(set(a)) > 1 and len(set(b)) > 1 else float("nan")


def grokking(data: dict) -> str:
    import math

    runs, c = data["runs"], data["config"]
    lines = ["| run | accuracy on corrupted training labels | clean training accuracy | test accuracy | "
             "mean IPR of hidden neurons |", "|---|---|---|---|---|"]
    for k, label in GROKKING_LABELS.items():
        cells = [mean_std([r[k]["final"][m] for r in runs]) for m in ("corrupted", "clean", "test")]
        cells.append(mean_std([sum(r[k]["ipr"]) / len(r[k]["ipr"]) for r in runs]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fractions = c["prune_fractions"]
    i = min(range(len(fractions)), key=lambda j: abs(fractions[j] - 0.3))
    lines += ["", f"Pruning {100 * fractions[i]:.0f}% of the hidden neurons (`normfx.lab.prune_by_ipr`), "
              "accuracy on corrupted labels / on clean training examples:", "",
              "| run | lowest-IPR neurons pruned | highest-IPR neurons pruned |", "|---|---|---|"]
    for k, label in GROKKING_LABELS.items():
        cells = []
        for order in ("lowest", "highest"):
            cor = mean_std([r[k]["prune"][order][i]["corrupted"] for r in runs])
            cle = mean_std([r[k]["prune"][order][i]["clean"] for r in runs])
            cells.append(f"{cor} / {cle}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    corr = [_corr([math.log(max(g, 1e-12)) for g in r["bn"]["abs_gamma"]], r["bn"]["ipr"]) for r in runs]
    lines += ["", f"BatchNorm run: correlation of log |γ| with IPR over neurons {mean_std(corr, digits=2)}. "
              f"p = {c['p']}, train fraction {c['train_fraction']}, ξ = {c['corruption']}, batch {c['batch']}, "
              f"{c['steps']} steps, width {c['width']}; mean ± std over {len(runs)} seeds. {_source(data)}"]
    return "\n".join(lines) + "\n"


SLAB_LABELS = {"softmax_ln": "softmax attention + LayerNorm (as built)",
               "sla_ln": "SLA + LayerNorm (`normfx.linear_attention`)",
               "slab": "SLAB: SLA + PRepBN, recalibrated and deployed",
               "slab_distill": "SLAB distilled from the trained softmax + LN model"}


SLAB_TOKENS = {"vit": "17 tokens (16 patches and the class token)",
               "swin": "stages of 8×8 and 4×4 tokens, SLA in the first, softmax windows of 4×4 in the second"}


def slab(data: dict) -> str:
    runs = data["runs"]
    lines = ["| model | test accuracy | eval latency, batch 1 (ms) | latency ÷ softmax + LN |", "|---|---|---|---|"]
    for k, label in SLAB_LABELS.items():
        if k not in runs[0]:
            continue
        ratio = [r[k]["latency_ms"] / r["softmax_ln"]["latency_ms"] for r in runs]
        lat = [r[k]["latency_ms"] for r in runs]
        lines.append(f"| {label} | {mean_std([r[k]['accuracy'] for r in runs])} | {mean_std(lat, digits=2)} | "
                     f"{mean_std(ratio, digits=2)} |")
    r0, c = runs[0]["slab"], data["config"]
    distill = (f" Distillation: loss (1 − α)·CE + α·τ²·KL(teacher ‖ student), α = {c['alpha']}, τ = {c['tau']}, "
               "the teacher the seed's trained softmax + LN model." if "alpha" in c else "")
    before = f" of {r0['softmax_before']}" if "softmax_before" in r0 else ""
    lines += ["", f"Mean ± std over {len(runs)} seeds (each its own initial weights and batch order, shared by the "
              f"runs), {c['epochs']} epochs; {SLAB_TOKENS[c.get('model', 'vit')]}; latency: "
              f"median of 50 single-image runs per model, the models interleaved in one process. The deployed SLAB "
              f"model has {r0['normalization_left']} normalization modules and {r0['softmax_left']}{before} softmax "
              f"attention modules left.{distill} {_source(data)}"]
    return "\n".join(lines) + "\n"


def grokking_batch(data: dict) -> str:
    runs, c = data["runs"], data["config"]
    lines = ["| batch | steps | corrupted labels, no regularization | corrupted labels, BatchNorm | "
             "clean training / test accuracy (both runs, lowest over seeds) |", "|---|---|---|---|---|"]
    for b in c["batch_sweep"]:
        cells = [mean_std([r[str(b)][k]["corrupted"] for r in runs]) for k in ("none", "bn")]
        low = min(min(r[str(b)][k][m] for r in runs for k in ("none", "bn")) for m in ("clean", "test"))
        lines.append(f"| {b} | {2000 * 256 // b:,} | {cells[0]} | {cells[1]} | ≥ {low:.3f} |")
    took = f"; the sweep took {c['seconds'] / 60:.0f} min" if "seconds" in c else ""
    lines += ["", f"p = {c['p']}, N = {c['width']}, train fraction {c['train_fraction']}, ξ = {c['corruption']}, "
              f"weight decay 0; mean ± std over {len(runs)} seeds{took}. {_source(data)}"]
    return "\n".join(lines) + "\n"


def grokking_phase(data: dict) -> str:
    runs, c = data["runs"], data["config"]
    tfs, xis = c["train_fractions"], c["corruptions"]
    lines = []
    for name, label in (("wd", "weight decay 1.0"), ("bn", "BatchNorm (weight decay 0)")):
        lines += [f"{label}: accuracy on corrupted training labels / test accuracy", "",
                  "| train fraction | " + " | ".join(f"ξ = {x}" for x in xis) + " |", "|---|" + "---|" * len(xis)]
        for i, tf in enumerate(tfs):
            cells = []
            for j in range(len(xis)):
                cor = [r[name][i][j]["corrupted"] for r in runs]
                test = mean_std([r[name][i][j]["test"] for r in runs], digits=2)
                cells.append(("—" if any(v != v for v in cor) else mean_std(cor, digits=2)) + f" / {test}")
            lines.append(f"| {tf} | " + " | ".join(cells) + " |")
        lines.append("")
    minutes = [r["seconds"] / 60 for r in runs]
    took = f"{min(minutes):.1f}" + (f"–{max(minutes):.1f}" if f"{min(minutes):.1f}" != f"{max(minutes):.1f}" else "")
    lines.append(f"Mean ± std over {len(runs)} seeds (each cell its own data split and corruption per seed), "
                 f"p = {c['p']}, N = {c['width']}, batch {c['batch']}, {c['steps']} steps per cell; the 50 runs of "
                 f"one seed took {took} min. {_source(data)}")
    return "\n".join(lines) + "\n"


def fpga(data: dict) -> str:
    runs, c = data["runs"], data["config"]
    lines = ["| model | W | float | QFX (PyTorch) | hls4ml C simulation | bit-exact outputs | multiplies | EBOPs "
             "| shift-and-add terms |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("mlp", "cnn"):
        for b in c["bits"]:
            cell = [r[name][str(b)] for r in runs]
            same, total = sum(x["bit_exact"] for x in cell), sum(x["images"] for x in cell)
            lines.append(f"| {name.upper()} | {b} | {mean_std([r[name]['float'] for r in runs])} | "
                         f"{mean_std([x['qfx'] for x in cell])} | {mean_std([x['hls'] for x in cell])} | "
                         f"{same}/{total} | {statistics.mean(x['multiplies'] for x in cell):,.0f} | "
                         f"{statistics.mean(x['ebops'] for x in cell):,.0f} | "
                         f"{statistics.mean(x['terms'] for x in cell):,.0f} |")
    lines.append("")
    lines.append(f"Test accuracy, mean ± std over {len(runs)} seeds (seeds {', '.join(str(r['seed']) for r in runs)}); "
                 f"every cast at W bits, BatchNorm scales {c['k_hot']}-hot; bit-exact: test images whose every "
                 "output equals PyTorch's, over the seeds; multiplies (by non-zero constants), EBOPs and "
                 "shift-and-add terms per image, mean over the seeds (`normfx.resource_estimate`). "
                 f"{_source(data)}")
    return "\n".join(lines) + "\n"


# Each docs table: how to render it, and the stored results it is rendered from.
RENDERERS: dict[str, tuple] = {
    "fixed_point": (lambda: fixed_point(load("fixed_point")), ["fixed_point"]),
    "fpga": (lambda: fpga(load("fpga")), ["fpga"]),
    "prepbn_vit": (lambda: prepbn_vit(load("prepbn_vit")), ["prepbn_vit"]),
    "bn_only": (bn_only, BN_ONLY_SOURCES),
    "evonorm": (lambda: evonorm(load("evonorm")), ["evonorm"]),
    "directpred": (lambda: directpred(load("directpred")), ["directpred"]),
    "grokking": (lambda: grokking(load("grokking")), ["grokking"]),
    "grokking_batch": (lambda: grokking_batch(load("grokking_batch")), ["grokking_batch"]),
    "grokking_phase": (lambda: grokking_phase(load("grokking_phase")), ["grokking_phase"]),
    "slab_vit": (lambda: slab(load("slab_vit")), ["slab_vit"]),
    "slab_swin": (lambda: slab(load("slab_swin")), ["slab_swin"]),
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
