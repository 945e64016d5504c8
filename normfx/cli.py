"""The ``normfx`` command: ``inspect`` a model's normalization sites, ``export`` it to verified ONNX.

Exit codes: 0 success, 1 export or verification failed, 2 usage (bad arguments or model SPEC).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Sequence

import torch
import torch.nn as nn

from normfx.api import convbn, evonorm, fixed_point, freeze, linear_attention, repbn
from normfx.errors import NormfxError
from normfx.spec import SPEC_HELP, SpecError, default_input_shape, first_line, load_spec
from normfx.kinds import is_norm_layer
from normfx.nn.repbn import recalibrate_bn
from normfx.onnx import export
from normfx.report import last_report

__all__ = ["main", "load_spec", "SpecError", "inspect_model"]

logger = logging.getLogger("normfx")

COLUMNS = ("convbn_tune", "convbn_deploy", "repbn", "freeze", "fixed_point", "evonorm", "linear_attention")
"""What ``inspect`` shows per site: each pass's action there, or ``skip: <reason>``."""
NORM_COLUMNS = COLUMNS[:-1]
"""The columns that count normalization sites; ``linear_attention`` counts attention sites."""


def inspect_model(model: nn.Module, *, image_size: tuple[int, int] | None = None) -> dict:
    """Every normalization and attention site of ``model`` and what each pass would do there (dry runs
    on copies).

    Per normalization site: ``convbn_tune`` / ``convbn_deploy`` (Tune block, fold, or why not),
    ``repbn`` (LayerNorm → PRepBN), ``freeze`` (whether ``normfx.freeze``'s default, BN-only training,
    trains the layer), ``fixed_point`` (the BatchNorm's fixed-point multiply-add) and ``evonorm``
    (BatchNorm2d + activation → EvoNorm-B0). Per attention site: ``linear_attention`` (softmax →
    SLAB's linear attention with the default stages; ``image_size`` for a torchvision Swin). Returns
    ``{"sites": [{"site", "kind", "shape", *COLUMNS}], "totals": {...}}``; ``totals["sites"]`` counts
    normalization sites, ``totals["attention_sites"]`` attention sites.

    Example:
        >>> table = inspect_model(torchvision.models.resnet18())
        >>> table["totals"]["convbn_deploy"]
        '20 transformed'
    """
    model = model.eval()
    runs = {
        "convbn_tune": lambda: convbn(model, mode="tune"),
        "convbn_deploy": lambda: convbn(model, mode="deploy"),
        "repbn": lambda: repbn(model, total_steps=1),
        "freeze": lambda: freeze(model, keep=("norm",)),
        "fixed_point": lambda: fixed_point(model, targets=("norm",)),
        "evonorm": lambda: evonorm(model),
        "linear_attention": lambda: linear_attention(model, image_size=image_size),
    }
    actions: dict[str, dict[str, str]] = {}
    for column, run in runs.items():
        try:
            report = last_report(run())
        except (NormfxError, ValueError) as e:   # e.g. freeze on a model without normalization parameters
            logger.info("inspect: %s does not apply: %s", column, e)
            continue
        for c in report.changes:
            actions.setdefault(c.site, {})[column] = c.action
        for sk in report.skips:
            actions.setdefault(sk.site, {})[column] = f"skip: {sk.reason.value}"
    rows = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if is_norm_layer(m):
            rows.append({"site": name, "kind": type(m).__name__, "shape": _shape(m), **_acts(actions.get(name))})
    functional = {s for s, a in actions.items() if s not in modules and ("convbn_tune" in a or "convbn_deploy" in a)}
    for site in sorted(functional):  # F.batch_norm sites
        rows.append({"site": site, "kind": "F.batch_norm", "shape": "", **_acts(actions[site])})
    n_norm = len(rows)
    attention = [s for s, a in actions.items() if "linear_attention" in a and s in modules]
    for site in attention:
        m = modules[site]
        rows.append({"site": site, "kind": type(m).__name__, "shape": f"{getattr(m, 'num_heads', '?')} heads",
                     **_acts({"linear_attention": actions[site]["linear_attention"]})})
    totals: dict[str, object] = {"sites": n_norm, "attention_sites": len(attention)}
    for key in COLUMNS:
        counted = rows[n_norm:] if key == "linear_attention" else rows[:n_norm]
        done = sum(1 for r in counted if r[key] != "—" and not r[key].startswith("skip"))
        totals[key] = f"{done} transformed"
    return {"sites": rows, "totals": totals}


def _acts(a: dict[str, str] | None) -> dict[str, str]:
    a = a or {}
    return {key: a.get(key, "—") for key in COLUMNS}


def _shape(m: nn.Module) -> str:
    for attr in ("num_features", "normalized_shape", "num_channels"):
        v = getattr(m, attr, None)
        if v is not None:
            return str(list(v) if isinstance(v, tuple) else v)
    w = getattr(m, "weight", None)
    return str(list(w.shape)) if isinstance(w, torch.Tensor) else ""


def _print_table(rows: list[dict], columns: Sequence[str]) -> None:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in columns]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    _out(line)
    _out("  ".join("-" * w for w in widths))
    for r in rows:
        _out("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-shape wants comma-separated integers, got '{text}'") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--input-shape wants positive sizes, got '{text}'")
    return shape


def _number(kind: type, ok: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: ``kind(text)`` that satisfies ``ok``; otherwise a one-line usage error."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"wants {'an integer' if kind is int else 'a number'}, got '{text}'") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"wants {rule}, got '{text}'")
        return value
    return parse


_tolerance = _number(float, lambda v: 0.0 <= v < float("inf"), "a finite number >= 0")
_opset = _number(int, lambda v: 7 <= v <= 30, "an ONNX opset between 7 and 30")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="normfx", formatter_class=fmt,
        description="Inspect a model's normalization layers and export it to ONNX, verified.\n\n" + SPEC_HELP,
        epilog="examples:\n  normfx inspect torchvision:resnet50\n"
               "  normfx export torchvision:resnet50 -o r50.onnx --input-shape 1,3,224,224",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log what every pass does")
    sub = p.add_subparsers(dest="command", required=True)

    i = sub.add_parser(
        "inspect", formatter_class=fmt,
        help="list every normalization (and attention) site and what each pass would do",
        description="List every normalization site (qualified name, kind, shape), what each pass would do "
                    "there (transform, or skip and why) and totals; a transformer's attention sites too, with "
                    "what linear_attention would do (a torchvision Swin probed at the model's default input "
                    "size).\n\n" + SPEC_HELP,
        epilog="examples:\n  normfx inspect torchvision:resnet50\n  normfx inspect timm:efficientnet_b0 --json\n"
               "  normfx inspect mypkg.models:build",
    )
    i.add_argument("spec", metavar="SPEC")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--trust-pickle", action="store_true", help="allow a .pt file that holds a pickled module")

    e = sub.add_parser(
        "export", formatter_class=fmt, help="transform, export to ONNX and verify in ONNX Runtime",
        description="Load the model, fold its normalization (Deploy mode), export it to ONNX, check the file "
                    "with onnx.checker and compare ONNX Runtime with PyTorch.\n\n" + SPEC_HELP,
        epilog="examples:\n  normfx export torchvision:resnet50 -o r50.onnx\n"
               "  normfx export timm:efficientnet_b0 -o effnet.onnx --input-shape 2,3,256,256 --opset 18\n"
               "  normfx export model.pt -o model.onnx --trust-pickle --no-verify",
    )
    e.add_argument("spec", metavar="SPEC")
    e.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    e.add_argument("--input-shape", type=_parse_shape, default=None,
                   help="example input shape, batch first (default: the model's, else 1,3,224,224)")
    e.add_argument("--convbn", choices=["deploy", "none"], default="deploy",
                   help="fold BatchNorm into convs (deploy, default) or export as is (none)")
    e.add_argument("--warm-bn", type=_number(int, lambda v: v >= 0, "an integer >= 0"), default=0, metavar="N",
                   help="estimate every BatchNorm's statistics from N random batches before exporting (a fold "
                        "on fresh mean-0/var-1 statistics is nearly the identity and proves little); default 0")
    e.add_argument("--opset", type=_opset, default=None, help="ONNX opset (default: the exporter's)")
    e.add_argument("--static-batch", action="store_true", help="do not make the batch dimension dynamic")
    e.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison")
    e.add_argument("--rtol", type=_tolerance, default=1e-4, help="relative tolerance (default 1e-4)")
    e.add_argument("--atol", type=_tolerance, default=1e-5, help="absolute tolerance (default 1e-5)")
    e.add_argument("--trust-pickle", action="store_true", help="allow a .pt file that holds a pickled module")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normfx`` command; returns the exit code.

    Every failure ends in one line on stderr (``-v`` adds the traceback): 2 for a bad SPEC or
    argument, 1 for a model that cannot be inspected or exported.
    """
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        model = load_spec(args.spec, trust_pickle=args.trust_pickle).eval()
    except SpecError as err:
        sys.stderr.write(f"normfx: error: {err}\n")
        return 2
    try:
        return _run(args, model)
    except Exception as err:  # noqa: BLE001 - the command's contract: one line, not a traceback
        if args.verbose:
            logger.exception("normfx %s failed", args.command)
        kind = "export failed" if isinstance(err, NormfxError) and args.command == "export" else "error"
        detail = (" ".join(str(err).split()) if isinstance(err, NormfxError)
                  else f"{type(err).__name__}: {first_line(err)}")
        sys.stderr.write(f"normfx: {kind}: {detail}" + ("" if args.verbose else " (run with -v for details)") + "\n")
        return 1


def _run(args: argparse.Namespace, model: nn.Module) -> int:
    if args.command == "inspect":
        shape = default_input_shape(model)
        result = inspect_model(model, image_size=(shape[2], shape[3]) if len(shape) == 4 else None)
        if args.json:
            _out(json.dumps(result, indent=2))
        else:
            attn = result["totals"]["attention_sites"]
            columns = COLUMNS if attn else NORM_COLUMNS
            _print_table(result["sites"], ["site", "kind", "shape", *columns])
            t = result["totals"]
            _out(f"\n{t['sites']} normalization sites" + (f", {attn} attention sites" if attn else "") + "; "
                 + "; ".join(f"{key.replace('_', ' ')}: {t[key]}" for key in columns))
        return 0

    shape = args.input_shape or default_input_shape(model)
    x = torch.randn(*shape)
    if args.warm_bn:
        warm = (max(8, shape[0]), *shape[1:])   # BatchNorm1d needs more than one sample per channel
        recalibrate_bn(model, [torch.randn(*warm) for _ in range(args.warm_bn)], progress=False)
        _out(f"BatchNorm statistics: estimated from {args.warm_bn} random batches of shape {list(warm)} "
             "(--warm-bn), not the fresh mean 0 / var 1")
    report = export(
        model, (x,), args.output, dynamic_batch=not args.static_batch, opset=args.opset,
        verify=not args.no_verify, rtol=args.rtol, atol=args.atol, deploy=args.convbn == "deploy",
    )
    _out(report.summary())
    return 0


def _console() -> int:
    """Console-script entry: ``main`` with a closed pipe (``normfx inspect ... | head``) ending quietly."""
    try:
        return main()
    except BrokenPipeError:
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_console())
