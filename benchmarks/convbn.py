"""ConvBN benchmarks: Tune-mode memory/step time, and Deploy vs torch.fx's ``fuse``.

    python benchmarks/convbn.py            # everything; writes docs/benchmarks.md
    python benchmarks/convbn.py --quick    # fewer repeats (a smoke run)
    python benchmarks/convbn.py --only latency --models densenet121 --rounds 15   # rerun one model

Each variant runs in its own process (``--child``) so peak RSS and allocator state are its own;
ratios are taken against the anchor measured in the same run.
"""
from __future__ import annotations

import copy
import functools
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MEM_MODEL, MEM_BATCH, MEM_SIZE = "resnet50", 8, 160
TRANSFORMS = 15  # per process; the first few pay the process's first page faults, the median does not
LAT_MODELS = ["resnet50", "resnet152", "mobilenet_v3_large", "densenet121"]


def _model(name: str) -> torch.nn.Module:
    from _common import torchvision_model

    return torchvision_model(name)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(variant: str, steps: int) -> dict:
    import normfx

    torch.set_num_threads(2)
    model = _model(MEM_MODEL).eval()  # fine-tuning with BN in eval mode (frozen statistics)
    if variant == "tune":
        model = normfx.convbn(model, mode="tune")
    elif variant == "tune_paper":
        # The paper's Tune mode as PyTorch ships it (inductor's efficient_conv_bn_eval, run eagerly):
        # one conv on ω' = ω·c built inside autograd, which keeps ω' for backward. The same pairs
        # normfx's Tune mode finds; each BN's slot passes the conv's output through.
        from torch._inductor.fx_passes.efficient_conv_bn_eval import efficient_conv_bn_eval

        from normfx.nn.convbn import tuned_pair, untune

        model = normfx.convbn(model, mode="tune")
        for conv in list(model.modules()):
            bn = tuned_pair(conv)
            if bn is not None:
                untune(conv, bn)
                twin = copy.copy(conv)   # the same parameters; its class's forward, for functional_call
                conv.forward = functools.partial(efficient_conv_bn_eval, bn, twin)
                bn.forward = torch.nn.Identity().forward
    elif variant == "deploy":
        model = normfx.convbn(model, mode="deploy")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(MEM_BATCH, 3, MEM_SIZE, MEM_SIZE)
    y = torch.randint(0, 1000, (MEM_BATCH,))
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    saved_bytes = sum(saved.values())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    rss_before = _rss_mib()
    times = []
    for _ in range(steps):
        gc.collect()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"saved_mib": saved_bytes / 2**20, "peak_rss_mib": _rss_mib(), "rss_warm_mib": rss_before,
            "step_s": statistics.median(times)}


COMPILE_VARIANTS = ["eval", "tune", "compiled_eval", "compiled_tune"]


def child_compile(variant: str, steps: int) -> dict:
    """One training setup of the memory benchmark, eager or under ``torch.compile`` (inductor, with its
    ``efficient_conv_bn_eval`` FX pass on, the compiled counterpart of Tune mode; no compile cache, so
    each compiled process pays its compilation): RSS once loaded, peak RSS, the first step (which
    compiles), and the median of ``steps`` steps after it."""
    import normfx

    torch.set_num_threads(2)
    model = _model(MEM_MODEL).eval()
    if variant.endswith("tune"):
        model = normfx.convbn(model, mode="tune")
    compiled = variant.startswith("compiled")
    if compiled:
        import torch._inductor.config as inductor_config

        inductor_config.efficient_conv_bn_eval_fx_passes = True
        inductor_config.fx_graph_cache = False
        if hasattr(inductor_config, "autograd_cache"):
            inductor_config.autograd_cache = False
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(MEM_BATCH, 3, MEM_SIZE, MEM_SIZE)
    y = torch.randint(0, 1000, (MEM_BATCH,))
    run = torch.compile(model) if compiled else model

    def step() -> float:
        t0 = time.perf_counter()
        F.cross_entropy(run(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    gc.collect()
    loaded = _rss_mib()
    first = step()
    times = [step() for _ in range(steps)]
    return {"loaded_rss_mib": loaded, "peak_rss_mib": _rss_mib(), "first_step_s": first,
            "step_s": statistics.median(times)}


def child_latency(name: str, variant: str, repeats: int) -> dict:
    from _common import latency_ms
    from torch.fx.experimental.optimization import fuse

    import normfx

    torch.set_num_threads(2)
    model = _model(name).eval()
    transform = {"eager": lambda m: m, "fuse": lambda m: fuse(m),
                 "normfx": lambda m: normfx.convbn(m, mode="deploy")}[variant]
    t_times = []
    for _ in range(TRANSFORMS):
        gc.collect()  # a collection landing inside one variant's timing is noise, not its cost
        gc.disable()
        t0 = time.perf_counter()
        out = transform(model)
        t_times.append(time.perf_counter() - t0)
        gc.enable()
    bn_left = sum(
        1 for n in getattr(out, "graph", torch.fx.symbolic_trace(out).graph).nodes
        if (n.op == "call_module" and isinstance(out.get_submodule(n.target), torch.nn.modules.batchnorm._BatchNorm))
        or (n.op == "call_function" and n.target is F.batch_norm)
    ) if variant != "eager" else sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in out.modules())
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        lat = latency_ms(lambda: out(x), repeats, warmup=5)
    return {"transform_s": statistics.median(t_times), "first_transform_s": t_times[0],
            "latency_ms": lat, "bn_left": bn_left}


def child_interleaved(name: str, pairs: int) -> dict:
    """``fuse`` and normfx's deploy in one process, single runs alternating: the drift-free
    cross-check of the per-process latency ratio."""
    from torch.fx.experimental.optimization import fuse

    import normfx
    from _common import interleaved_ratio

    torch.set_num_threads(2)
    a, b = fuse(_model(name).eval()), normfx.convbn(_model(name).eval(), mode="deploy")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(5):
            a(x), b(x)
        return {"ratio": interleaved_ratio(lambda: a(x), lambda: b(x), pairs)}


MEM_VARIANTS = ["eval", "tune", "tune_paper", "deploy"]


def main() -> None:
    from _common import parse_args, write_section

    def options(ap) -> None:
        ap.add_argument("--only", choices=["memory", "latency", "compile"],
                        help="run one part; keep the others' numbers")
        ap.add_argument("--models", nargs="+", choices=LAT_MODELS,
                        help="latency: rerun these models; the others keep their stored results")
        ap.add_argument("--rounds", type=int, help="latency: alternating rounds (default 7)")

    args = parse_args(__doc__, options)
    if args.child is not None:
        kind, *rest = args.child
        if kind == "memory":
            res = child_memory(rest[0], int(rest[1]))
        elif kind == "compile":
            res = child_compile(rest[0], int(rest[1]))
        elif kind == "interleaved":
            res = child_interleaved(rest[0], int(rest[1]))
        else:
            res = child_latency(rest[0], rest[1], int(rest[2]))
        print(json.dumps(res))
        return

    steps = 3 if args.quick else 7
    reps = 10 if args.quick else 20
    rounds = 1 if args.quick else 3
    lat_rounds = 1 if args.quick else 7
    if args.only in (None, "memory"):
        _memory(rounds, steps)
    if args.only in (None, "compile"):
        _compile(rounds, steps)
    if args.only in (None, "latency"):
        for name in args.models or LAT_MODELS:
            _latency(name, args.rounds or lat_rounds, reps)
    body = render()
    write_section("convbn", body)
    print(body)


def _memory(rounds: int, steps: int) -> None:
    from _common import record, run_variant

    runs: dict[str, list[dict]] = {v: [] for v in MEM_VARIANTS}
    for _ in range(rounds):
        for v in runs:
            runs[v].append(run_variant(__file__, "memory", v, str(steps)))
    record("convbn_memory", {"model": MEM_MODEL, "batch": MEM_BATCH, "size": MEM_SIZE, "rounds": rounds,
                             "steps": steps}, {"runs": runs})


def _compile(rounds: int, steps: int) -> None:
    from _common import record, run_variant

    runs: dict[str, list[dict]] = {v: [] for v in COMPILE_VARIANTS}
    for r in range(rounds):
        for v in (COMPILE_VARIANTS if r % 2 == 0 else COMPILE_VARIANTS[::-1]):
            runs[v].append(run_variant(__file__, "compile", v, str(steps)))
    record("convbn_compile", {"model": MEM_MODEL, "batch": MEM_BATCH, "size": MEM_SIZE, "rounds": rounds,
                              "steps": steps, "threads": 2}, {"runs": runs})


def _compile_md(data: dict) -> str:
    from _common import median, table

    c = data["config"]
    runs = data["raw"]["runs"]
    mem = {v: {k: median(x[k] for x in rs) for k in rs[0]} for v, rs in runs.items()}
    ev = mem["eval"]
    rows = []
    for v, r in mem.items():
        over = r["peak_rss_mib"] - r["loaded_rss_mib"]
        compile_s = r["first_step_s"] - r["step_s"]
        rows.append([v, f"{r['step_s'] * 1e3:.0f}", f"{r['step_s'] / ev['step_s']:.2f}", f"{over:.0f}",
                     f"{over / (ev['peak_rss_mib'] - ev['loaded_rss_mib']):.2f}",
                     f"{compile_s:.1f}" if v.startswith("compiled") else "—"])
    intro = (f"ResNet-50, batch {c['batch']}, {c['size']}², BatchNorm in eval mode (fine-tuning), SGD with momentum, "
             f"two threads; each variant its own process, alternating over {c['rounds']} rounds; medians across "
             f"rounds of per-process medians of {c['steps']} steps after the first. `compiled_*`: `torch.compile` "
             "(inductor) with `efficient_conv_bn_eval_fx_passes` on and no compile cache; under compilation a "
             "normfx Tune block runs as conv → BatchNorm, so `compiled_tune` is the compiled pass on the same "
             "graph. Peak RSS over loaded includes, for the compiled variants, the compiler's own memory (the "
             f"peak is a process maximum). Compile: the first step's time minus a step's. `{data['command']}`.")
    over = {v: r["peak_rss_mib"] - r["loaded_rss_mib"] for v, r in mem.items()}
    tune, ce, ct = mem["tune"], mem["compiled_eval"], mem["compiled_tune"]
    verdict = (
        "Targets: eager Tune at or below the compiled pass's peak memory and within 1.05 × eager Eval's step "
        "time, with no compile wait; compiled Tune at least as fast and as lean as the compiled pass. Measured: "
        f"eager Tune peaks at {over['tune'] / over['compiled_eval']:.2f} × the compiled pass's memory over loaded, "
        f"at {tune['step_s'] / ev['step_s']:.2f} × eager Eval's step time"
        + (" (over the 1.05 target: a gap)" if tune["step_s"] / ev["step_s"] > 1.05 else "")
        + f"; compiled Tune takes {ct['step_s'] / ce['step_s']:.2f} × the compiled pass's step time and "
        f"{over['compiled_tune'] / over['compiled_eval']:.2f} × its memory.")
    return intro + "\n\n" + table(["variant", "step (ms)", "step ÷ eager Eval", "peak RSS over loaded (MiB)",
                                     "÷ eager Eval", "compile (s)"], rows) + "\n\n" + verdict


def _latency(name: str, rounds: int, reps: int) -> None:
    """Measure one model (stored apart, so one model can be rerun with more rounds)."""
    from _common import record, run_variant

    runs: dict[str, list[dict]] = {"eager": [], "fuse": [], "normfx": []}
    for _ in range(rounds):
        for v in runs:
            runs[v].append(run_variant(__file__, "latency", name, v, str(reps)))
    inter = run_variant(__file__, "interleaved", name, str(4 * reps))["ratio"]
    record(f"convbn_latency_{name}", {"model": name, "rounds": rounds, "reps": reps, "transforms": TRANSFORMS},
           {"runs": runs, "interleaved": inter})


def _memory_md(data: dict) -> tuple[str, dict]:
    from _common import median, table

    c = data["config"]
    mem = {v: {k: median(x[k] for x in rs) for k in rs[0]} for v, rs in data["raw"]["runs"].items()}
    ev, de = mem["eval"], mem["deploy"]
    rows = []
    for v, r in mem.items():
        rows.append([v, f"{r['saved_mib']:.0f}", f"{r['saved_mib'] / ev['saved_mib']:.2f}",
                     f"{r['saved_mib'] / de['saved_mib']:.2f}", f"{r['peak_rss_mib']:.0f}",
                     f"{r['step_s'] * 1e3:.0f}", f"{r['step_s'] / ev['step_s']:.2f}"])
    intro = (f"Every variant is its own process; the four alternate over {c['rounds']} rounds; medians across "
             f"rounds of per-process medians of {c['steps']} steps. `{data['command']}`.")
    return intro + "\n\n" + table(["variant", "saved for backward (MiB)", "÷ Eval", "÷ Deploy", "peak RSS (MiB)",
                                     "step (ms)", "step ÷ Eval"], rows), mem


def _latency_md(stored: list[dict]) -> str:
    from _common import median, ratio_cell, table

    rows = []
    for data in stored:
        c, runs, inter = data["config"], data["raw"]["runs"], data["raw"]["interleaved"]
        r = {v: {k: median(x[k] for x in rs) for k in rs[0]} for v, rs in runs.items()}
        lat_ratio = [b["latency_ms"] / a["latency_ms"] for a, b in zip(runs["fuse"], runs["normfx"])]
        tr_ratio = [b["transform_s"] / a["transform_s"] for a, b in zip(runs["fuse"], runs["normfx"])]
        first_ratio = [b["first_transform_s"] / a["first_transform_s"] for a, b in zip(runs["fuse"], runs["normfx"])]
        rows.append([
            c["model"], f"{r['eager']['latency_ms']:.1f}", f"{r['fuse']['latency_ms']:.1f}",
            f"{r['normfx']['latency_ms']:.1f}", ratio_cell(lat_ratio), str(c["rounds"]), f"{inter:.3f}",
            f"{r['fuse']['transform_s'] * 1e3:.0f}", f"{r['normfx']['transform_s'] * 1e3:.0f}", ratio_cell(tr_ratio),
            ratio_cell(first_ratio),
            f"{r['eager']['bn_left']} / {r['fuse']['bn_left']} / {r['normfx']['bn_left']}",
        ])
    c0 = stored[0]["config"]
    commands = "; ".join(sorted({f"`{d['command']}`" for d in stored}))
    intro = ("Every variant is its own process; eager, fuse and normfx alternate over the rounds given per row; "
             f"times are medians across rounds of per-process medians ({c0['reps']} inference runs, "
             f"{c0['transforms']} transforms); ratios are medians of per-round ratios, [range over rounds]. "
             "\"Same process, interleaved\" is a drift-free cross-check: one process holds fuse's and normfx's "
             f"models and alternates single runs ({4 * c0['reps']} pairs, which goes first alternating); it is the "
             f"median of per-pair ratios. {commands}.")
    return intro + "\n\n" + table(["model", "eager (ms)", "fuse (ms)", "normfx (ms)", "latency normfx ÷ fuse",
                                     "rounds", "same process, interleaved",
                                     "fuse transform (ms)", "normfx transform (ms)", "transform ÷ fuse",
                                     "first transform in the process ÷ fuse's",
                                     "BN left: eager / fuse / normfx"], rows)


def render() -> str:
    """The docs section, from the stored raw results (memory, and each model's latency)."""
    from _common import RESULTS, load, machine_line

    mem = load("convbn_memory")
    mem_md, m = _memory_md(mem)
    lat_md = _latency_md([load(f"convbn_latency_{n}") for n in LAT_MODELS
                          if (RESULTS / f"convbn_latency_{n}.json").exists()])
    compile_md = (_compile_md(load("convbn_compile")) if (RESULTS / "convbn_compile.json").exists()
                  else "Not yet measured: `python benchmarks/convbn.py --only compile`.")
    c = mem["config"]
    tune, ev, de = m["tune"], m["eval"], m["deploy"]
    return f"""## ConvBN (`benchmarks/convbn.py`)

Machine: {machine_line(mem)}.

### Fine-tuning step, {c['model']}, batch {c['batch']} at {c['size']}×{c['size']}, BatchNorm in eval mode

"Saved for backward" counts the distinct storages autograd keeps, excluding the model's own
parameters and buffers. `tune_paper` is the paper's Tune mode as PyTorch ships it
(`efficient_conv_bn_eval` run eagerly: one conv on ω', which autograd keeps); `tune` is normfx's,
which runs the conv on ω and the BN's affine as Eval mode does, saves neither the conv output nor
ω', and recomputes ω' in backward. Targets: Tune ≤ 0.55 × Eval and ≤ 1.10 × Deploy; step
time Tune ≤ 1.05 × Eval. Measured: Tune saves {tune['saved_mib'] / ev['saved_mib']:.2f} × Eval's and
{tune['saved_mib'] / de['saved_mib']:.2f} × Deploy's activations, at {tune['step_s'] / ev['step_s']:.2f} × Eval's
step time.

{mem_md}

### Eager Tune against `torch.compile` with inductor's `efficient_conv_bn_eval` pass

{compile_md}

### Deploy vs `torch.fx.experimental.optimization.fuse`, batch 1 at 224×224, eval mode

Targets: latency normfx ÷ fuse ≤ 1.02; transform time no slower than `fuse`; never more BatchNorm
left than `fuse`. With 2 shared cores the per-process spread is wide (the range column); the
same-process interleaved ratio is the drift-free reading of the latency.

{lat_md}

### GPU

Peak CUDA memory at batch 32×224² (Eval vs Tune) is not yet measured on a GPU.
"""


if __name__ == "__main__":
    main()
