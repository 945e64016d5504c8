"""Coverage sweep: every torchvision classification model, timm models across families and Hugging
Face ``transformers`` models, random weights and randomized BatchNorm statistics; for each, what every
registered transform does to it and whether what must be exact is.

    python benchmarks/zoo.py                          # the whole sweep (hours on 2 cores)
    python benchmarks/zoo.py --models timm:repvgg_a0  # refresh one model (src:name, repeatable)
    python benchmarks/zoo.py --src torchvision        # one source
    python benchmarks/zoo.py --render                 # docs/coverage.md from what is stored

Each model runs in a process of its own (a crash or a hang is that model's row, never the sweep's)
and stores ``benchmarks/results/zoo/<src>__<name>.json``: its command, versions and every number
the tables show. Per model: the tracing outcome (whole, partial with the untraceable modules named,
none); per transform (its default configuration, as ``normfx.apply`` gives it) the sites transformed
and skipped by reason, the transform time and, for a transform that keeps the model's function
when applied, the relative error of the eval-mode output; ``normfx.deploy`` beside
``torch.fx.experimental.optimization.fuse`` (BatchNorms left, relative error, time); and the deployed
model's ONNX export verified in ONNX Runtime. A model over ``--max-params`` is listed with its size
and not run.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import ROOT, RESULTS, table  # noqa: E402

ZOO = RESULTS / "zoo"
PAGE = ROOT / "docs" / "coverage.md"
MAX_PARAMS = 100_000_000
TIMEOUT_S = 900
BATCH = 2

TIMM = [
    # ResNet / ResNeXt / ResNet-D / SE / attention variants
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18", "resnest14d",
    "gcresnet33ts", "botnet26t_256", "halonet26t", "lambda_resnet26t", "tresnet_m",
    # RegNet
    "regnetx_002", "regnety_002", "regnetz_b16",
    # EfficientNet / MobileNet / MixNet / GhostNet and other mobile CNNs
    "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050",
    "tf_mobilenetv3_small_100", "mobilenetv4_conv_small", "mixnet_s", "ghostnet_100", "ghostnetv2_100",
    "repghostnet_050", "lcnet_050", "tinynet_e", "mnasnet_050", "fbnetc_100", "hardcorenas_a", "rexnet_100",
    # DenseNet / DPN / HRNet / Res2Net / DLA / CSP / VoVNet
    "densenet121", "dpn68", "hrnet_w18_small", "res2net50_14w_8s", "res2next50", "dla34", "cspresnet50",
    "cs3darknet_s", "ese_vovnet19b_dw", "selecsls42b", "hgnetv2_b0",
    # RepVGG / MobileOne / FastViT (re-parameterizable)
    "repvgg_a0", "mobileone_s0", "fastvit_t8",
    # ConvNeXt / modern CNNs
    "convnext_atto", "convnextv2_atto", "inception_next_tiny", "starnet_s1", "edgenext_xx_small",
    # LeViT / EfficientFormer / EfficientViT / PoolFormer / hybrids
    "levit_128s", "efficientformer_l1", "efficientformerv2_s0", "efficientvit_b0", "efficientvit_m0",
    "poolformer_s12", "poolformerv2_s12", "mobilevit_xxs", "mobilevitv2_050", "tiny_vit_5m_224",
    # ViT / DeiT / Swin / MaxViT / CoAtNet and other transformers
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_nano_rw_256",
    "coatnet_nano_rw_224", "pit_ti_224", "cait_xxs24_224", "xcit_nano_12_p16_224", "pvt_v2_b0",
    "davit_tiny", "focalnet_tiny_srf", "visformer_tiny",
    # MLPs and others
    "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "vgg11_bn", "inception_v3", "nf_resnet26",
]

HF = ["bert", "distilbert", "roberta", "gpt2", "llama", "vit", "swin", "convnext", "resnet", "mobilenet_v2"]

# The transforms whose application keeps the model's eval-mode function: the zoo measures it.
KEEPS_FUNCTION = {"freeze", "repbn", "convbn", "sync_bn"}


# --- models -------------------------------------------------------------------------------------------

def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _hf(name: str) -> tuple[Callable[[], nn.Module], torch.Tensor]:
    import transformers as tf

    text = torch.randint(0, 1000, (BATCH, 16), generator=torch.Generator().manual_seed(0))
    image = torch.randn(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
    builders: dict[str, tuple[Callable[[], nn.Module], torch.Tensor]] = {
        "bert": (lambda: tf.BertModel(tf.BertConfig(**small)), text),
        "distilbert": (lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                                    vocab_size=1000)), text),
        "roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(**small)), text),
        # Decoders without a KV cache: a cache object is no tensor output ONNX can hold.
        "gpt2": (lambda: tf.GPT2Model(tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000,
                                                   use_cache=False)), text),
        "llama": (lambda: tf.LlamaModel(tf.LlamaConfig(**small, num_key_value_heads=2, use_cache=False)), text),
        "vit": (lambda: tf.ViTModel(tf.ViTConfig(**{**small, "vocab_size": None}, image_size=64, patch_size=16)),
                image),
        "swin": (lambda: tf.SwinModel(tf.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1],
                                                    num_heads=[2, 4], window_size=4)), image),
        "convnext": (lambda: tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1],
                                                                num_stages=2)), image),
        "resnet": (lambda: tf.ResNetModel(tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                                          layer_type="bottleneck")), image),
        "mobilenet_v2": (lambda: tf.MobileNetV2Model(tf.MobileNetV2Config(image_size=64, depth_multiplier=0.35)),
                         image),
    }
    return builders[name]


def builder(src: str, name: str) -> tuple[Callable[[], nn.Module], list[torch.Tensor]]:
    """``(make the model, inputs to try in order)``: the first input the model accepts is used."""
    g = torch.Generator().manual_seed(0)
    if src == "hf":
        make, x = _hf(name)
        return make, [x]
    if src == "torchvision":
        import torchvision

        kwargs: dict[str, Any] = {}
        if name in ("googlenet", "inception_v3"):
            kwargs = {"aux_logits": False, "init_weights": True}
        sizes = [299] if name == "inception_v3" else [96, 224]
        return (lambda: torchvision.models.get_model(name, **kwargs),
                [torch.randn(BATCH, 3, s, s, generator=g) for s in sizes])
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    default = cfg.input_size[-1] if cfg is not None else 224
    return (lambda: timm.create_model(name, pretrained=False),
            [torch.randn(BATCH, 3, s, s, generator=g) for s in dict.fromkeys([96, default])])


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, a tuple, a dict or a ``ModelOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"no tensor in the output ({type(out).__name__})")


def bn_count(model: nn.Module) -> int:
    """BatchNorm layers in ``model`` (torch's, their subclasses, FrozenBatchNorm2d)."""
    from normfx.kinds import is_frozen_bn

    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) or is_frozen_bn(m) for m in model.modules())


# --- one model, in its own process --------------------------------------------------------------------

def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _refusal(e: BaseException) -> bool:
    """A clear refusal: a normfx error, or a ValueError/TypeError normfx raised itself (its message
    names the module and what to do); an exception from inside torch or a model's code is a crash."""
    import normfx

    if isinstance(e, normfx.NormfxError):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    return isinstance(e, (ValueError, TypeError)) and bool(frames) and "/normfx/" in frames[-1].filename


def _crash(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            "where": traceback.format_exc().strip().splitlines()[-3][:300]}


def child(src: str, name: str) -> dict:
    import normfx
    from normfx.analysis import analyze
    from tests.conftest import randomize_bn, rel_err

    torch.set_num_threads(1)
    torch.manual_seed(0)
    make, inputs = builder(src, name)
    rec: dict[str, Any] = {"src": src, "model": name}
    model, rec["build_s"] = _timed(make)
    model.eval()
    rec["params"] = sum(p.numel() for p in model.parameters())
    x = None
    for candidate in inputs:
        try:
            with torch.no_grad():
                model(candidate)
            x = candidate
            break
        except Exception as e:  # noqa: BLE001 - the next size, or the model's row says why
            rec["input_error"] = _crash(e)["error"]
    if x is None:
        rec["status"] = "input"
        return rec
    rec.pop("input_error", None)
    rec["input"] = list(x.shape)
    if x.is_floating_point() and bn_count(model):
        randomize_bn(model, x.repeat(4, *([1] * (x.dim() - 1))))
    model.eval()
    with torch.no_grad():
        ref = first_tensor(model(x))
    rec["bn"] = bn_count(model)

    try:
        a = analyze(model)
        untraceable = [q for q, _ in a.untraceable]
        rec["tracing"] = {"outcome": "none" if not a.regions else "partial" if untraceable else "whole",
                          "regions": len(a.regions), "untraceable": untraceable[:20],
                          "untraceable_count": len(untraceable)}
    except Exception as e:  # noqa: BLE001 - a crash is the row's result
        rec["tracing"] = {"outcome": "crash", **_crash(e)}

    passes: dict[str, Any] = {}
    for t in normfx.TRANSFORMS:
        if t.name == "deploy":
            continue
        entry: dict[str, Any] = {}
        try:
            out, entry["seconds"] = _timed(lambda: normfx.apply(model, t.example_config()))  # noqa: B023
            report = normfx.last_report(out)
            entry["sites"] = sum(p.sites for p in report.passes)
            entry["transformed"] = len(report.changes)
            entry["skipped"] = {str(k): v for k, v in _skip_counts(report).items()}
            if t.name in KEEPS_FUNCTION and entry["transformed"]:
                with torch.no_grad():
                    entry["rel_err"] = rel_err(first_tensor(out.eval()(x)), ref)
        except Exception as e:  # noqa: BLE001 - a refusal or a crash is the row's result
            entry["refused" if _refusal(e) else "crash"] = _crash(e)
        passes[t.name] = entry
    rec["passes"] = passes

    dep: dict[str, Any] = {}
    try:
        # With the example input: its shapes let BatchNorms after a reshape fold (LeViT).
        deployed, dep["seconds"] = _timed(lambda: normfx.deploy(model, example_inputs=x))
        dep["bn_left"] = bn_count(deployed)
        with torch.no_grad():
            dep["rel_err"] = rel_err(first_tensor(deployed(x)), ref)
        if x.is_floating_point():
            # In float64 the fold's own error shows, not float32 rounding that a deep network with
            # randomized statistics amplifies (it is the bar "exact" is held to).
            import copy

            m64 = copy.deepcopy(model).double()
            with torch.no_grad():
                x64 = x.double()
                dep["rel_err_float64"] = rel_err(first_tensor(normfx.deploy(m64, example_inputs=x64)(x64)),
                                                 first_tensor(m64(x.double())))
        dep["changes"] = {p.name: len(p.changes) for p in normfx.last_report(deployed).passes if p.changes}
        dep["skipped"] = {str(k): v for k, v in _skip_counts(normfx.last_report(deployed)).items()}
    except Exception as e:  # noqa: BLE001 - a crash is the row's result
        dep["crash"] = _crash(e)
    rec["deploy"] = dep

    fuse: dict[str, Any] = {}
    try:
        from torch.fx.experimental.optimization import fuse as fx_fuse

        fused, fuse["seconds"] = _timed(lambda: fx_fuse(model))
        fuse["bn_left"] = sum(1 for n in fused.graph.nodes if (
            n.op == "call_module" and isinstance(fused.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))
            or (n.op == "call_function" and n.target in (torch.nn.functional.batch_norm, torch.batch_norm)))
        with torch.no_grad():
            fuse["rel_err"] = rel_err(first_tensor(fused(x)), ref)
    except Exception as e:  # noqa: BLE001 - fuse cannot trace every model
        fuse["error"] = _crash(e)["error"]
    rec["fuse"] = fuse

    onnx: dict[str, Any] = {}
    if "crash" not in dep:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            try:
                r, onnx["seconds"] = _timed(lambda: normfx.export(model, x, os.path.join(d, "m.onnx")))
                onnx["exporter"] = r.exporter
                onnx["max_rel"] = max(o.max_rel for o in r.outputs)
                onnx["max_abs"] = max(o.max_abs for o in r.outputs)
            except Exception as e:  # noqa: BLE001 - the row says why
                onnx["error"] = _crash(e)["error"]
    rec["onnx"] = onnx
    rec["status"] = "ok"
    return rec


def _skip_counts(report: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in report.passes:
        for reason, n in p.skip_counts().items():
            counts[reason] = counts.get(reason, 0) + n
    return counts


# --- the sweep ----------------------------------------------------------------------------------------

def _path(src: str, name: str) -> Path:
    return ZOO / f"{src}__{name}.json"


def _versions() -> dict:
    import normfx

    versions = {"python": platform.python_version(), "torch": torch.__version__, "normfx": normfx.__version__}
    for mod in ("torchvision", "timm", "transformers", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    return versions


def _size(src: str, name: str) -> int:
    """Parameters of the model, built on the meta device (no memory, no initialization)."""
    make, _ = builder(src, name)
    with torch.device("meta"):
        return sum(p.numel() for p in make().parameters())


def run_one(src: str, name: str, max_params: int, timeout: int) -> dict:
    import subprocess

    command = f"python benchmarks/zoo.py --models {src}:{name}"
    base = {"src": src, "model": name, "command": command, "versions": _versions(),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1}}
    try:
        params = _size(src, name)
    except Exception as e:  # noqa: BLE001 - the row says why
        params = -1
        base["size_error"] = _crash(e)["error"]
    if params > max_params:
        rec = {**base, "status": "too_large", "params": params,
               "reason": f"{params / 1e6:.0f} M parameters, over the sweep's {max_params / 1e6:.0f} M (every "
                         "transform and an ONNX export per model on 2 CPU cores)"}
    else:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, __file__, "--child", src, name], capture_output=True, text=True,
                                 env=env, timeout=timeout, check=False)
            if out.returncode == 0:
                rec = {**base, **json.loads(out.stdout.strip().splitlines()[-1])}
            else:
                rec = {**base, "status": "crash", "error": out.stderr.strip().splitlines()[-1][:300]
                       if out.stderr.strip() else f"exit {out.returncode}"}
        except subprocess.TimeoutExpired:
            rec = {**base, "status": "timeout", "reason": f"over {timeout} s"}
        rec["wall_s"] = time.perf_counter() - t0
    ZOO.mkdir(parents=True, exist_ok=True)
    _path(src, name).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def all_models() -> list[tuple[str, str]]:
    import timm

    known = set(timm.list_models())
    missing = [n for n in TIMM if n not in known]
    if missing:
        raise SystemExit(f"not in this timm: {missing}")
    return ([("torchvision", n) for n in _torchvision_names()] + [("timm", n) for n in TIMM]
            + [("hf", n) for n in HF])


# --- rendering ----------------------------------------------------------------------------------------

def stored() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(ZOO.glob("*.json"))]


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "—"


def render() -> str:
    recs = stored()
    if not recs:
        return "Not yet measured: `python benchmarks/zoo.py`."
    ran = [r for r in recs if r.get("status") == "ok"]
    not_run = [r for r in recs if r.get("status") != "ok"]
    v = recs[0]["versions"]
    lines = [f"{len(recs)} models ({sum(r['src'] == 'torchvision' for r in recs)} torchvision, "
             f"{sum(r['src'] == 'timm' for r in recs)} timm, {sum(r['src'] == 'hf' for r in recs)} Hugging Face "
             f"transformers), random weights, randomized BatchNorm statistics, batch {BATCH}, one thread per model; "
             f"torch {v['torch']}, torchvision {v['torchvision']}, timm {v['timm']}, transformers "
             f"{v['transformers']} (small configurations; GPT-2 and LLaMA with `use_cache=False`). Deploy gets the "
             f"example input (`example_inputs=`), so folds that depend on shapes apply. "
             f"{len(ran)} ran; {len(not_run)} are listed at the end with the reason. "
             "Refresh one model: `python benchmarks/zoo.py --models SRC:NAME`, then "
             "`python benchmarks/zoo.py --render`.", ""]

    # Tracing
    outcomes = {k: [r for r in ran if r["tracing"]["outcome"] == k] for k in ("whole", "partial", "none", "crash")}
    lines += ["### Tracing", "", table(["outcome", "models"], [[k, str(len(v))] for k, v in outcomes.items()]), ""]

    # Deploy vs fuse
    bn = sum(r["bn"] for r in ran)
    dep_ok = [r for r in ran if "crash" not in r["deploy"]]
    dep_left = sum(r["deploy"]["bn_left"] for r in dep_ok)
    fuse_left = sum(r["fuse"].get("bn_left", r["bn"]) for r in ran)
    worst = max((r["deploy"].get("rel_err", 0.0) for r in dep_ok), default=0.0)
    worst64 = max((r["deploy"].get("rel_err_float64", 0.0) for r in dep_ok), default=0.0)
    lines += ["### Deploy against `torch.fx.experimental.optimization.fuse`", "",
              f"BatchNorm layers in the {len(ran)} models: {bn}. Folded by `normfx.deploy`: {bn - dep_left} "
              f"({_pct(bn - dep_left, bn)}); by `fuse`: {bn - fuse_left} ({_pct(bn - fuse_left, bn)}; a model "
              f"`fuse` cannot trace counts as none folded). Largest relative error of a deployed model: "
              f"{worst:.1e} in float32, {worst64:.1e} with the model and input in float64 (the fold's own error; "
              f"float32 adds the model's rounding, which randomized statistics amplify). "
              f"Deploy crashes: {len(ran) - len(dep_ok)}. Target: at least 93% of the BatchNorms folded, exact; "
              f"{'met' if bn and (bn - dep_left) / bn >= 0.93 else 'not met'}.", ""]
    rows = []
    for r in sorted(ran, key=lambda r: (r["src"], r["model"])):
        d, f = r["deploy"], r["fuse"]
        if not r["bn"] and "crash" not in d:
            continue
        rows.append([f"{r['src']}:{r['model']}", str(r["bn"]),
                     "crash: " + d["crash"]["error"][:60] if "crash" in d else str(r["bn"] - d["bn_left"]),
                     f"{d['rel_err']:.1e}" if "rel_err" in d else "—",
                     f"{d['rel_err_float64']:.1e}" if "rel_err_float64" in d else "—",
                     "cannot trace" if "error" in f else str(r["bn"] - f["bn_left"]),
                     f"{f['rel_err']:.1e}" if "rel_err" in f else "—",
                     ", ".join(f"{k} {n}" for k, n in sorted(d.get("skipped", {}).items())) or "—"])
    lines += [table(["model", "BatchNorms", "folded by deploy", "deploy rel. err", "in float64", "folded by fuse",
                     "fuse rel. err", "deploy skipped (reason: count)"], rows), ""]

    # Per transform
    from normfx import TRANSFORMS

    lines += ["### Every transform", "",
              "Sites transformed and skipped (summed over the models), models where the transform refused "
              "the model (a clear error) or crashed, and, for the transforms that keep the eval-mode function "
              "when applied, the largest relative error.", ""]
    rows = []
    for t in TRANSFORMS:
        if t.name == "deploy":
            continue
        entries = [r["passes"].get(t.name, {}) for r in ran]
        applied = [e for e in entries if "sites" in e]
        skipped: dict[str, int] = {}
        for e in applied:
            for k, n in e["skipped"].items():
                skipped[k] = skipped.get(k, 0) + n
        errs = [e["rel_err"] for e in applied if "rel_err" in e]
        rows.append([t.name, str(sum(e["transformed"] > 0 for e in applied)),
                     str(sum(e["transformed"] for e in applied)),
                     str(sum(skipped.values())), "; ".join(f"{k} {n}" for k, n in sorted(skipped.items())) or "—",
                     str(sum("refused" in e for e in entries)), str(sum("crash" in e for e in entries)),
                     f"{max(errs):.1e}" if errs else "—"])
    lines += [table(["transform", "models changed", "sites transformed", "skipped", "skipped by reason",
                     "refused", "crashed", "max rel. err"], rows), "",
              "`directpred` needs `predictor=` naming a SimSiam/BYOL predictor module; the zoo's models have "
              "none, so each refuses it with that message. `freeze` refuses a model with no normalization "
              "layer to keep trainable.", ""]

    crashes = [(r, n, e["crash"]) for r in ran for n, e in r["passes"].items() if "crash" in e]
    crashes += [(r, "deploy", r["deploy"]["crash"]) for r in ran if "crash" in r["deploy"]]
    if crashes:
        lines += ["Crashes (a bug each: the target is none):", ""]
        lines += [f"- `{r['src']}:{r['model']}` {n}: {c['error']}" for r, n, c in crashes]
        lines.append("")

    # ONNX
    exported = [r for r in ran if "max_rel" in r["onnx"]]
    lines += ["### ONNX export of the deployed model", "",
              f"Exported and verified in ONNX Runtime: {len(exported)} of {len(ran)}; largest relative error "
              f"{max((r['onnx']['max_rel'] for r in exported), default=0.0):.1e} (of the output's largest value; "
              "over 1e-4, `normfx.export` accepts a difference only when ONNX Runtime is no farther from the "
              "model run in float64 than twice PyTorch's own float32 output is: "
              + (", ".join(f"`{r['src']}:{r['model']}` {r['onnx']['max_rel']:.1e}"
                           for r in exported if r["onnx"]["max_rel"] > 1e-4) or "none") + ").", ""]
    failed = [r for r in ran if "error" in r["onnx"]]
    if failed:
        lines += table(["model", "export error"],
                       [[f"{r['src']}:{r['model']}", r["onnx"]["error"][:160].replace("|", "/")] for r in failed]
                       ).splitlines() + [""]

    if not_run:
        lines += ["### Not run", "",
                  table(["model", "status", "reason"],
                        [[f"{r['src']}:{r['model']}", r["status"],
                          (r.get("reason") or r.get("error") or r.get("input_error") or "").replace("|", "/")[:160]]
                         for r in not_run]), ""]
    return "\n".join(lines)


def write_page() -> None:
    from _common import replace_section

    text = PAGE.read_text() if PAGE.exists() else (
        "# Coverage: every pass on public model zoos\n\nRendered from `benchmarks/results/zoo/*.json` "
        "(`python benchmarks/zoo.py --render`).\n")
    PAGE.write_text(replace_section(text, "zoo", render()))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", action="append", default=[], help="SRC:NAME (torchvision, timm or hf)")
    ap.add_argument("--src", choices=["torchvision", "timm", "hf"])
    ap.add_argument("--missing", action="store_true", help="only models without a stored result")
    ap.add_argument("--max-params", type=int, default=MAX_PARAMS)
    ap.add_argument("--timeout", type=int, default=TIMEOUT_S)
    ap.add_argument("--render", action="store_true", help="only render docs/coverage.md")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if not args.render:
        models = [tuple(m.split(":", 1)) for m in args.models] or all_models()
        if args.src:
            models = [m for m in models if m[0] == args.src]
        if args.missing:
            models = [m for m in models if not _path(*m).exists()]
        for i, (src, name) in enumerate(models):
            rec = run_one(src, name, args.max_params, args.timeout)
            print(f"[{i + 1}/{len(models)}] {src}:{name}: {rec['status']} ({rec.get('wall_s', 0):.0f} s)", flush=True)
    write_page()


if __name__ == "__main__":
    main()
