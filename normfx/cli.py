"""The ``normfx`` command: ``inspect`` a model's normalization sites, ``export`` it to verified ONNX.

Exit codes: 0 success, 1 export or verification failed, 2 usage (bad arguments or model SPEC).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from normfx.api import apply
from normfx.calibrate import calibrate
from normfx.errors import NormfxError
from normfx.spec import SPEC_HELP, SpecError, default_input_shape, first_line, load_spec
from normfx.kinds import is_norm_layer
from normfx.nn.fixed_point import FixedPoint
from normfx.nn.repbn import recalibrate_bn
from normfx.onnx import export
from normfx.passes.registry import TRANSFORMS, by_name, inspect_columns, transform_for
from normfx.report import Report, last_report
from normfx.runner import plan
from normfx.scope import FilterFn, LeafModules, make_scope
from normfx.transform import Transform

__all__ = ["main", "load_spec", "SpecError", "inspect_model", "parse_transform", "COLUMNS"]

logger = logging.getLogger("normfx")

COLUMNS = tuple(column for column, _, _ in inspect_columns())
"""What ``inspect`` shows per site: each registered transform's action there, or ``skip: <reason>``
(``normfx.passes.registry``: every ``inspect`` entry of every transform, in registry order)."""
ATTENTION_COLUMNS = tuple(column for column, t, _ in inspect_columns() if t.sites == "attention")
"""The columns whose sites are attention modules; the others' rows are normalization sites."""


def inspect_model(model: nn.Module, *, image_size: tuple[int, int] | None = None,
                  configs: Sequence[object] | None = None, filter_fn: FilterFn | None = None,
                  leaf_modules: LeafModules | None = None) -> dict:
    """Every normalization and attention site of ``model`` and what each registered transform would do
    there: a dry run (match and plan on one analysis of the model; nothing is copied or changed).

    Columns: one per ``inspect`` entry of the registry (``COLUMNS``), each the transform with its
    defaults: ``convbn_tune`` / ``convbn_deploy`` (Tune block, fold, or why not), ``repbn``,
    ``freeze`` (BN-only training), ``fixed_point`` (every default cast; a normalization row shows the
    BatchNorm's), ``evonorm``, ``linear_attention`` (attention rows; ``image_size`` for a torchvision
    Swin). ``configs``: inspect these configs instead (a column each, named by the transform).
    ``filter_fn``/``leaf_modules`` as for the one-liners. Returns ``{"sites": [{"site", "kind",
    "shape", *columns}], "columns": [...], "totals": {...}}``; ``totals["sites"]`` counts normalization
    rows, ``totals["attention_sites"]`` attention rows, and each column's total the rows it would
    transform, plus the sites its whole run would change when that is more (weights, activations).

    Example:
        >>> table = inspect_model(torchvision.models.resnet18())
        >>> table["totals"]["convbn_deploy"]
        '20 transformed'
    """
    runs = _columns(configs, image_size)
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        scope = make_scope(model, filter_fn, leaf_modules, plan=True)
        analyses: dict = {}
        reports: dict[str, Report] = {}
        for column, t, config in runs:
            try:
                if t.check is not None:
                    t.check(model, config)
                reports[column] = plan(model, t.steps(config), scope, analyses)
            except (NormfxError, ValueError) as e:   # e.g. freeze on a model without normalization parameters
                logger.info("inspect: %s does not apply: %s", column, e)
    finally:
        for m, training in was.items():
            m.training = training
    return _table(model, [c for c, _, _ in runs], reports)


def _columns(configs: Sequence[object] | None, image_size: tuple[int, int] | None
             ) -> list[tuple[str, Transform, object]]:
    if configs is not None:
        names = [transform_for(c).name for c in configs]
        return [(n + (f"_{names[:i].count(n)}" if names[:i].count(n) else ""), transform_for(c), c)
                for i, (n, c) in enumerate(zip(names, configs))]
    runs = []
    for column, t, config in inspect_columns():
        if image_size is not None and any(f.name == "image_size" for f in dataclasses.fields(config)):
            config = dataclasses.replace(config, image_size=image_size)
        runs.append((column, t, config))
    return runs


def _table(model: nn.Module, columns: list[str], reports: dict[str, Report]) -> dict:
    actions: dict[str, dict[str, str]] = {}
    for column, report in reports.items():
        for c in report.changes:
            actions.setdefault(c.site, {})[column] = c.action
        for sk in report.skips:
            actions.setdefault(sk.site, {})[column] = f"skip: {sk.reason.value}"
    norm_columns = [c for c in columns if c not in ATTENTION_COLUMNS]
    rows = []
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if is_norm_layer(m):
            rows.append({"site": name, "kind": type(m).__name__, "shape": _shape(m),
                         **_acts(actions.get(name), columns, norm_columns)})
    functional = {s for s, a in actions.items() if s not in modules and ("convbn_tune" in a or "convbn_deploy" in a)}
    for site in sorted(functional):  # F.batch_norm sites
        rows.append({"site": site, "kind": "F.batch_norm", "shape": "", **_acts(actions[site], columns, norm_columns)})
    n_norm = len(rows)
    attention = [s for s, a in actions.items() if any(c in a for c in ATTENTION_COLUMNS) and s in modules]
    for site in attention:
        m = modules[site]
        rows.append({"site": site, "kind": type(m).__name__, "shape": f"{getattr(m, 'num_heads', '?')} heads",
                     **_acts(actions[site], columns, [c for c in columns if c in ATTENTION_COLUMNS])})
    totals: dict[str, object] = {"sites": n_norm, "attention_sites": len(attention)}
    for key in columns:
        counted = rows[n_norm:] if key in ATTENTION_COLUMNS else rows[:n_norm]
        done = sum(1 for r in counted if r[key] != "—" and not r[key].startswith("skip"))
        whole = len(reports[key].changes) if key in reports else 0
        totals[key] = f"{done} transformed" + (f" ({whole} sites in all)" if whole > done else "")
    return {"sites": rows, "columns": columns, "totals": totals}


def parse_transform(text: str) -> object:
    """A transform config from the command line's ``NAME[:KEY=VALUE,...]`` (``fixed_point:bits=8``).

    Values are read as Python literals where they are one (``8``, ``0.5``, ``True``, ``None``), else as
    text; ``+`` separates the items of a sequence (``targets=weight+activation``, ``stages=0+1``).

    Raises:
        ValueError: an unknown transform or option, or a value its config refuses (the message
            lists what the transform takes).

    Example:
        >>> parse_transform("fixed_point:bits=6,targets=weight+activation")
        FixedPointConfig(bits=6, int_bits=None, rounding='nearest_even', overflow='saturate', targets=('weight', \
'activation'), per_channel=False, k_hot=None, k_hot_weights=False, k_hot_code='csd', fold_bn=False, \
weight_bits=None)
    """
    name, _, rest = text.partition(":")
    try:
        t = by_name(name.strip())
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    fields = {f.name: f for f in dataclasses.fields(t.config)}
    options: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"{t.name} takes {', '.join(f'{k}=' for k in fields) or 'no options'}; got {item!r}")
        parts = [_literal(v) for v in value.split("+")]
        options[key] = tuple(parts) if "+" in value or str(fields[key].type).startswith("tuple") else parts[0]
    return t.config(**options)


def _literal(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _load_recipe(path: str) -> list[object]:
    """A recipe file: a JSON list whose items are ``"NAME:KEY=VALUE,..."`` strings or objects
    ``{"transform": NAME, KEY: VALUE, ...}``."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"recipe {path}: expected a JSON list of transforms, got {type(items).__name__}")
    configs = []
    for item in items:
        if isinstance(item, str):
            configs.append(parse_transform(item))
        elif isinstance(item, dict) and "transform" in item:
            opts = {k: tuple(v) if isinstance(v, list) else v for k, v in item.items() if k != "transform"}
            configs.append(by_name(item["transform"]).config(**opts))
        else:
            raise ValueError(f"recipe {path}: each item is 'NAME:KEY=VALUE,...' or {{\"transform\": NAME, ...}}, "
                             f"got {item!r}")
    return configs


def _acts(a: dict[str, str] | None, columns: Sequence[str], shown: Sequence[str]) -> dict[str, str]:
    a = a or {}
    return {key: a.get(key, "—") if key in shown else "—" for key in columns}


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


def _transform_args(p: argparse.ArgumentParser) -> None:
    names = ", ".join(t.name for t in TRANSFORMS)
    p.add_argument("--transform", action="append", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help=f"a registered transform with its options, repeatable, applied in order ({names}); "
                        "e.g. fixed_point:bits=8 or linear_attention:stages=0+1")
    p.add_argument("--recipe", metavar="FILE",
                   help="a JSON list of transforms, each 'NAME:KEY=VALUE,...' or {\"transform\": NAME, KEY: VALUE, "
                        "...}, applied before --transform")


def _configs(args: argparse.Namespace) -> list[object]:
    return (_load_recipe(args.recipe) if args.recipe else []) + [parse_transform(t) for t in args.transform]


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
    _transform_args(i)
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
    _transform_args(e)
    e.add_argument("--calibrate", type=_number(int, lambda v: v >= 0, "an integer >= 0"), default=0, metavar="N",
                   help="set the fixed-point binary points from N random batches after the transforms (fixed_point)")
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
        configs = _configs(args)
        model = load_spec(args.spec, trust_pickle=args.trust_pickle).eval()
    except (SpecError, ValueError, TypeError) as err:
        sys.stderr.write(f"normfx: error: {err}\n")
        return 2
    try:
        return _run(args, model, configs)
    except Exception as err:  # noqa: BLE001 - the command's contract: one line, not a traceback
        if args.verbose:
            logger.exception("normfx %s failed", args.command)
        kind = "export failed" if isinstance(err, NormfxError) and args.command == "export" else "error"
        detail = (" ".join(str(err).split()) if isinstance(err, NormfxError)
                  else f"{type(err).__name__}: {first_line(err)}")
        sys.stderr.write(f"normfx: {kind}: {detail}" + ("" if args.verbose else " (run with -v for details)") + "\n")
        return 1


def _run(args: argparse.Namespace, model: nn.Module, configs: list[object]) -> int:
    if args.command == "inspect":
        shape = default_input_shape(model)
        result = inspect_model(model, image_size=(shape[2], shape[3]) if len(shape) == 4 else None,
                               configs=configs or None)
        if args.json:
            _out(json.dumps(result, indent=2))
        else:
            attn = result["totals"]["attention_sites"]
            columns = [c for c in result["columns"] if attn or c not in ATTENTION_COLUMNS]
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
    if configs:
        model = apply(model, *configs)
        _out(last_report(model).summary())
    if args.calibrate:
        if not any(isinstance(m, FixedPoint) and m.trainable for m in model.modules()):
            raise ValueError("--calibrate sets fixed-point binary points: add --transform fixed_point first")
        calibrate(model, [torch.randn(*shape) for _ in range(args.calibrate)], progress=False)
        _out(f"fixed point: binary points calibrated on {args.calibrate} random batches of shape {list(shape)}")
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
