"""Simplified Linear Attention vs softmax attention (``F.scaled_dot_product_attention``): latency and
peak memory of one attention layer as the number of tokens grows.

    python benchmarks/linear_attention.py            # stores results/linear_attention.json, renders the docs
    python benchmarks/linear_attention.py --quick    # one round, fewer repeats

One attention layer (timm's ``Attention``: fused q/k/v projection, 4 heads of d = 64, width 256, the
fused SDPA kernel) and the same layer after ``SimplifiedLinearAttention.from_projections`` (SLA: ReLU
kernels, DWC 5×5), eval mode, batch 1, at 196, 784, 3136 and 12544 tokens (14², 28², 56², 112²).
Each (variant, tokens) is its own process; variants alternate over rounds. Peak memory is the
growth of the process's peak RSS during the timed runs. FLOPs (multiply-adds × 2, projections
included) are counted from the shapes: softmax attention grows with N², SLA with N.

Then a whole model: torchvision's ``swin_t`` at 224 × 224, batch 1, eval mode, as built (softmax
window attention + LayerNorm), with ``normfx.linear_attention`` in SLAB's ``LLSS`` stages (LayerNorm
kept), that plus PRepBN deployed (SLAB: λ = 0, randomized statistics, ``normfx.deploy``), and with every
stage linear (``LLLL``). Each variant its own process, alternating over rounds, denormals flushed as
in ``benchmarks/repbn.py``.
"""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

NAME = "linear_attention"
TOKENS = [196, 784, 3136, 12544]
HEADS, HEAD_DIM = 4, 64
VARIANTS = ["sdpa", "sla"]
SWIN_VARIANTS = ["swin", "sla_llss", "slab_llss", "sla_llll"]
SWIN_SIZE = 224


def flops(variant: str, n: int) -> float:
    c, h, d = HEADS * HEAD_DIM, HEADS, HEAD_DIM
    proj = 2 * n * c * 3 * c + 2 * n * c * c
    if variant == "sdpa":
        return proj + h * (4 * n * n * d)
    return proj + h * (4 * n * d * d + 2 * n * d * 25 + 4 * n * d)


def child(variant: str, n: int, reps: int) -> dict:
    from timm.layers import Attention

    from normfx.nn import SimplifiedLinearAttention

    torch.set_num_threads(2)
    torch.manual_seed(0)
    c = HEADS * HEAD_DIM
    layer: torch.nn.Module = Attention(c, HEADS, qkv_bias=True).eval()
    side = int(round(n ** 0.5))
    if variant == "sla":
        layer = SimplifiedLinearAttention.from_projections(layer.qkv, layer.proj, HEADS, (side, side)).eval()
    return timed(layer, torch.randn(1, n, c), reps)


def timed(model: torch.nn.Module, x: torch.Tensor, reps: int) -> dict:
    """Median latency of ``reps`` inference runs after one warm-up, and the process's peak RSS."""
    from _common import latency_ms

    with torch.inference_mode():
        model(x)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ms = latency_ms(lambda: model(x), reps)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": ms, "peak_rss_growth_mib": (peak - base) / 1024, "peak_rss_mib": peak / 1024}


def build_swin(variant: str) -> torch.nn.Module:
    import torchvision
    from repbn import deploy_prepbn

    import normfx

    torch.manual_seed(0)
    model = torchvision.models.swin_t().eval()
    if variant == "swin":
        return model
    stages = (0, 1, 2, 3) if variant == "sla_llll" else None
    model = normfx.linear_attention(model, stages=stages, image_size=SWIN_SIZE).eval()
    return deploy_prepbn(model) if variant == "slab_llss" else model


def child_swin(variant: str, reps: int) -> dict:
    from repbn import _quiet_denormals

    from normfx.nn import SimplifiedLinearAttention

    _quiet_denormals()
    model = build_swin(variant)
    out = timed(model, torch.randn(1, 3, SWIN_SIZE, SWIN_SIZE), reps)
    mods = list(model.modules())
    return {**out, "sla": sum(isinstance(m, SimplifiedLinearAttention) for m in mods),
            "softmax_windows": sum("WindowAttention" in type(m).__name__ for m in mods),
            "norms": sum(isinstance(m, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)) for m in mods)}


def render() -> str:
    from _common import load, machine_line, median, ratio_cell, table

    data = load(NAME)
    c, runs = data["config"], data["raw"]["runs"]
    rows = []
    for n in c["tokens"]:
        r = {v: runs[f"{v}_{n}"] for v in VARIANTS}
        ratio = [b["ms"] / a["ms"] for a, b in zip(r["sdpa"], r["sla"])]
        rows.append([str(n), f"{median(x['ms'] for x in r['sdpa']):.2f}", f"{median(x['ms'] for x in r['sla']):.2f}",
                     ratio_cell(ratio), f"{median(x['peak_rss_mib'] for x in r['sdpa']):.0f}",
                     f"{median(x['peak_rss_mib'] for x in r['sla']):.0f}",
                     f"{flops('sdpa', n) / 1e9:.2f}", f"{flops('sla', n) / 1e9:.2f}",
                     f"{flops('sla', n) / flops('sdpa', n):.3f}"])
    swin = data["raw"].get("swin")
    swin_md = ""
    if swin:
        labels = {"swin": "swin_t as built (softmax windows + LayerNorm)",
                  "sla_llss": "SLA in stages 0–1 (`LLSS`), LayerNorm kept",
                  "slab_llss": "SLAB: SLA `LLSS` + PRepBN, deployed", "sla_llll": "SLA in every stage (`LLLL`)"}
        srows = []
        for v in SWIN_VARIANTS:
            ratio = [b["ms"] / a["ms"] for a, b in zip(swin["swin"], swin[v])]
            r0 = swin[v][0]
            srows.append([labels[v], f"{median(x['ms'] for x in swin[v]):.1f}", ratio_cell(ratio),
                          f"{r0['sla']} / {r0['softmax_windows']} / {r0['norms']}"])
        swin_md = f"""
A whole model: torchvision's `swin_t` at {c['swin_size']} × {c['swin_size']}, batch 1, eval mode, random weights; each
variant its own process, alternating over {c['rounds']} round(s), medians of {c['reps']} runs per process.

{table(["model", "latency (ms)", "÷ as built", "SLA / softmax window attention / norm modules"], srows)}
"""
    return f"""## Linear attention (`benchmarks/linear_attention.py`)

Machine: {machine_line(data)}. One attention layer, {HEADS} heads of d = {HEAD_DIM}, batch 1, eval mode:
timm's `Attention` (fused `scaled_dot_product_attention`) against the same layer as SLA. Each
(variant, tokens) is its own process, alternating over {c['rounds']} round(s); medians of {c['reps']} runs
per process, then across rounds; ratios are medians of per-round ratios [range]. Peak RSS is the
process's (model, input and the runs). GFLOPs are counted from the shapes (the physical bound beside
the measurement). `{data['command']}`.

{table(["tokens", "softmax (ms)", "SLA (ms)", "SLA ÷ softmax", "softmax peak RSS (MiB)", "SLA peak RSS (MiB)",
        "softmax GFLOPs", "SLA GFLOPs", "FLOPs SLA ÷ softmax"], rows)}
{swin_md}"""


def main() -> None:
    from _common import parse_args, record, run_variant, write_section

    args = parse_args(__doc__)
    if args.child is not None:
        if args.child[0] in SWIN_VARIANTS:
            print(json.dumps(child_swin(args.child[0], int(args.child[2]))))
        else:
            print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    rounds, reps = (1, 2) if args.quick else (3, 5)
    runs: dict[str, list[dict]] = {f"{v}_{n}": [] for v in VARIANTS for n in TOKENS}
    for r in range(rounds):
        for n in TOKENS:
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                runs[f"{v}_{n}"].append(run_variant(__file__, v, str(n), str(reps)))
    swin: dict[str, list[dict]] = {v: [] for v in SWIN_VARIANTS}
    for r in range(rounds):
        for v in (SWIN_VARIANTS if r % 2 == 0 else SWIN_VARIANTS[::-1]):
            swin[v].append(run_variant(__file__, v, str(SWIN_SIZE), str(reps)))
    record(NAME, {"rounds": rounds, "reps": reps, "tokens": TOKENS, "heads": HEADS, "head_dim": HEAD_DIM,
                  "swin_size": SWIN_SIZE}, {"runs": runs, "swin": swin})
    body = render()
    write_section(NAME, body)
    print(body)


if __name__ == "__main__":
    main()
