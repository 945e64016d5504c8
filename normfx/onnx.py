"""export(): deploy a copy, export to ONNX with an explicit exporter, check it, verify it in ONNX Runtime.

Nothing half-written is left behind: the file is written into a temporary folder next to the target
and moved into place only after ``onnx.checker`` and the ONNX Runtime comparison pass.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from normfx.errors import ExportError
from normfx.report import Report, last_report
from normfx.trace import analyze, materialize, regions, trace_regions

__all__ = ["export", "ExportError", "ExportReport", "OutputCheck", "Exporter"]

logger = logging.getLogger("normfx")

Exporter = Literal["auto", "dynamo", "torchscript"]

_TWO_GB = 2**31 - 1


@dataclass(frozen=True)
class OutputCheck:
    """ONNX Runtime vs PyTorch for one output: the worst error over every batch size checked.

    ``max_rel`` is ``max|ort − torch| / max|torch|`` (relative to the output's scale).
    """

    name: str
    shape: tuple[int | str, ...]
    max_abs: float
    max_rel: float
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class ExportReport:
    """What ``normfx.export`` wrote and how well it matched PyTorch."""

    path: str
    exporter: str
    opset: int
    op_counts: dict[str, int]
    inputs: tuple[tuple[str, tuple[int | str, ...]], ...]
    outputs: tuple[OutputCheck, ...]
    passes: Report
    size_bytes: int
    seconds: float
    verified: bool
    notes: tuple[str, ...] = field(default=())
    fixed_point_json: str | None = None
    """The sidecar with every fixed-point tensor's ``ap_fixed`` type (fixed-point models only)."""

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines = [
            f"{self.path}: {self.size_bytes / 2**20:.1f} MiB, exporter {self.exporter}, opset {self.opset}, "
            f"{self.seconds:.1f} s",
            f"ops ({sum(self.op_counts.values())}): {ops}",
        ]
        lines += [f"input {n}: {list(s)}" for n, s in self.inputs]
        for o in self.outputs:
            check = (f"max abs err {o.max_abs:.2e}, max rel err {o.max_rel:.2e} at batch "
                     f"{', '.join(map(str, o.batch_sizes))}") if self.verified else "not verified"
            lines.append(f"output {o.name}: {list(o.shape)}: {check}")
        lines += [p.summary() for p in self.passes.passes]
        lines += list(self.notes)
        if self.fixed_point_json:
            lines.append(f"fixed-point types (ap_fixed, per tensor and layer): {self.fixed_point_json}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def export(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike,
    *,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    exporter: Exporter = "auto",
    deploy: bool = True,
) -> ExportReport:
    """Deploy a copy of ``model``, export it to ONNX at ``path``, check it and verify it in ONNX Runtime.

    Args:
        model: an eval-mode ``nn.Module`` or normfx model; it is not modified.
        example_inputs: a tensor or a tuple of tensors the model accepts (batch first).
        path: the ``.onnx`` file to write; its folder must exist.
        dynamic_batch: export the batch dimension as dynamic and verify at a second batch size.
        opset: ONNX opset; ``None`` lets the exporter choose (reported).
        verify: run the file in ONNX Runtime (CPU) and compare with PyTorch.
        rtol, atol: an output passes when ``max|ort − torch| <= atol + rtol·max|torch|``.
        exporter: ``"dynamo"`` (torch.export based), ``"torchscript"``, or ``"auto"``: dynamo,
            falling back to TorchScript with the reason logged and put in ``notes``.
        deploy: run ``normfx.deploy`` on a copy first (default). ``False`` exports the model as it
            is (still traced, checked and verified), e.g. to compare with the folded export.

    Returns:
        An ``ExportReport``.

    Raises:
        ExportError: the model is in training mode, the inputs do not run, the path is not
            writable, the exporter cannot handle an op (the module that produced it is named), the
            checker rejects the file, or ONNX Runtime disagrees with PyTorch beyond the tolerances
            (which output, by how much). Nothing is left at ``path`` then.

    Example:
        >>> model = torchvision.models.resnet18().eval()
        >>> path = os.path.join(tempfile.mkdtemp(), "resnet18.onnx")
        >>> report = normfx.export(model, torch.randn(1, 3, 224, 224), path)
        >>> report.op_counts.get("BatchNormalization", 0)
        0
    """
    from normfx.api import deploy as deploy_model
    from normfx.report import attach_report

    t0 = time.perf_counter()
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ExportError("example_inputs must be a tensor or a non-empty sequence of tensors")
    target = Path(path)
    _check_writable(target)
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise ExportError(
            f"module '{training[0]}' is in training mode; call model.eval() before export "
            f"({len(training)} modules are in training mode)"
        )
    with torch.no_grad():
        try:
            reference = model(*inputs)
        except Exception as e:  # noqa: BLE001 - any failure here means the inputs do not fit
            shapes = ", ".join(str(list(x.shape)) for x in inputs)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(
                f"the example inputs ({shapes}) do not run through {type(model).__name__}: "
                f"{type(e).__name__}: {first}"
            ) from e
    ref_flat, _ = tree_flatten(reference)
    if not all(isinstance(r, torch.Tensor) for r in ref_flat):
        raise ExportError("every output of the model must be a tensor (nested tuples/lists/dicts allowed)")

    if deploy:
        deployed = deploy_model(model)
    else:
        import copy

        deployed = materialize(trace_regions(copy.deepcopy(model)))
        attach_report(deployed, Report())
    fixed = _fixed_point_casts(deployed)
    json_path = None
    if fixed:
        json_path = _write_fixed_point_json(fixed, target)
        exporter, opset = _fixed_point_export_settings(fixed, exporter, opset, json_path)
    input_names = _input_names(deployed, len(inputs))
    output_names = ["output"] if len(ref_flat) == 1 else [f"output_{i}" for i in range(len(ref_flat))]
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    export_inputs = inputs
    if dynamic_batch and batch == 1:
        # torch.export specializes a dimension of size 1; trace at batch 2, verify at 1 and 2.
        export_inputs = tuple(_grow_batch(x, 2) for x in inputs)
    large = sum(p.numel() * p.element_size() for p in deployed.parameters()) > _TWO_GB

    tmpdir = Path(tempfile.mkdtemp(prefix=".normfx-export-", dir=target.parent))
    try:
        tmp = tmpdir / target.name
        from normfx.nn.fixed_point import exporting

        with exporting(deployed):
            used, notes = _export(deployed, export_inputs, tmp, exporter, opset, dynamic_batch,
                                  input_names, output_names, large)
        try:
            import onnx

            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnx.checker rejected the exported file: {e}") from e
        proto = onnx.load(str(tmp), load_external_data=False)
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        counts = _op_counts(proto)
        in_shapes = tuple((i.name, _dims(i)) for i in proto.graph.input)
        out_shapes = {o.name: _dims(o) for o in proto.graph.output}
        onnx_out_names = [o.name for o in proto.graph.output]
        checks = _verify(model, inputs, ref_flat, tmp, onnx_out_names, dynamic_batch, rtol, atol,
                         keep_qdq=bool(fixed)) if verify else {}
        if fixed:
            notes.append("fixed point: verified with ONNX Runtime's graph optimizations at BASIC, so the "
                         "QDQ fusions of the EXTENDED level (integer QLinearConv/QLinearMatMul kernels with "
                         "their own requantization) do not replace the casts")
        outputs = tuple(
            OutputCheck(n, out_shapes[n], *checks.get(n, (float("nan"), float("nan"), ())))
            for n in onnx_out_names
        )
        for f in tmpdir.iterdir():
            os.replace(f, target.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    size = sum(
        (target.parent / f).stat().st_size for f in [target.name, *_external_files(target)]
        if (target.parent / f).exists()
    )
    report = ExportReport(
        str(target), used, opset_used, dict(counts), in_shapes, outputs, last_report(deployed), size,
        time.perf_counter() - t0, verify, tuple(notes), str(json_path) if json_path else None,
    )
    for line in report.summary().splitlines():
        logger.info("%s", line)
    return report


def _check_writable(target: Path) -> None:
    folder = target.parent
    if target.is_dir():
        raise ExportError(f"'{target}' is a folder; give the path of the .onnx file to write")
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"cannot write '{target}': '{folder}' is a file, not a folder")
    if not folder.is_dir():
        raise ExportError(f"cannot write '{target}': folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write '{target}': folder '{folder}' is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise ExportError(f"cannot write '{target}': the file exists and is not writable")
    try:  # permission bits do not tell everything (root, read-only mounts, /proc): try it
        with tempfile.TemporaryDirectory(prefix=".normfx-probe-", dir=folder):
            pass
    except OSError as e:
        raise ExportError(f"cannot write '{target}': folder '{folder}' is not writable ({e.strerror or e})") from e


def _input_names(model: nn.Module, n: int) -> list[str]:
    """The forward's own argument names for the graph inputs (``x``), where they can be told."""
    if isinstance(model, fx.GraphModule):
        names = [p.name for p in model.graph.nodes if p.op == "placeholder"]
    else:
        try:
            params = list(inspect.signature(type(model).forward).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n]
    if len(names) == n:
        return names
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


def _grow_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    reps = -(-size // x.shape[0])
    return torch.cat([x] * reps)[:size] if x.dim() else x


def _export(model, inputs, tmp: Path, exporter: Exporter, opset, dynamic_batch, input_names, output_names,
            large) -> tuple[str, list[str]]:
    notes: list[str] = []
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
    errors: list[tuple[str, BaseException]] = []
    for name in order:
        try:
            if name == "dynamo":
                _export_dynamo(model, inputs, tmp, opset, dynamic_batch, input_names, output_names, large)
            else:
                _export_torchscript(model, inputs, tmp, opset, dynamic_batch, input_names, output_names)
            return name, notes
        except Exception as e:  # noqa: BLE001 - try the other exporter, then explain
            errors.append((name, e))
            for f in tmp.parent.iterdir():
                f.unlink()
            if name != order[-1]:
                note = f"the {name} exporter failed ({_first_line(e)}); fell back to {order[-1]}"
                logger.warning("%s", note)
                notes.append(note)
    culprit = _culprit(model, " ".join(_chain_text(e) for _, e in errors))
    detail = "; ".join(f"{n}: {_first_line(e)}".rstrip(".") for n, e in errors)
    hint = (" Replace that op, or give the dynamo exporter a translation for it "
            "(torch.onnx.export's custom_translation_table).") if culprit else ""
    raise ExportError(f"ONNX export failed{culprit}. {detail}.{hint}") from errors[-1][1]


def _chain_text(e: BaseException | None) -> str:
    parts = []
    while e is not None and len(parts) < 8:
        parts.append(str(e))
        e = e.__cause__
    return " ".join(parts)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    """The most specific one-line message: the first line of the deepest cause that has one."""
    best = ""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = _ANSI.sub("", str(e)).strip()
        if text:
            best = f"{type(e).__name__}: {text.splitlines()[0][:300]}"
        e = e.__cause__
    return best


def _export_dynamo(model, inputs, tmp, opset, dynamic_batch, input_names, output_names, large) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if x.dim() else None for x in inputs)
    extra = {}
    if _fixed_point_casts(model):
        extra["custom_translation_table"] = {torch.ops.normfx.fixed_point_qdq.default: _qdq_onnx}
    program = torch.onnx.export(
        model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
        input_names=input_names, output_names=output_names, optimize=True, verbose=False, **extra,
    )
    program.save(str(tmp), external_data=large)


def _export_torchscript(model, inputs, tmp, opset, dynamic_batch, input_names, output_names) -> None:
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, inputs, str(tmp), dynamo=False, opset_version=opset or 17, input_names=input_names,
            output_names=output_names, dynamic_axes=axes, do_constant_folding=True,
        )


def _culprit(model: nn.Module, message: str) -> str:
    """' (op X, produced by module Y)' for the first graph node whose op the error message names."""
    ops = set(re.findall(r"(?:aten|prim|torch\.ops\.\w+|[A-Za-z_]\w*)(?:::|\.)([A-Za-z_]\w*)", message))
    traced = list(regions(model)) or analyze(model).regions   # a model kept as a tree: read its graphs
    for prefix, gm in traced:
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            if node.op == "call_module":
                label = type(gm.get_submodule(node.target)).__name__
                owner = str(node.target)
            else:
                label = node.target if isinstance(node.target, str) else getattr(
                    node.target, "__name__", str(node.target))
                stack = node.meta.get("nn_module_stack") or {}
                owner = next(reversed(stack.values()))[0] if stack else ""
            label = str(label).split(".")[-2] if str(label).endswith(".default") else str(label)
            if label in ops or (node.op == "call_module" and label in message):
                where = ".".join(x for x in (prefix, owner) if x) or "<root>"
                return f" at op '{label}', produced by module '{where}'"
    return ""


def _dims(value_info) -> tuple[int | str, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_param if d.dim_param else d.dim_value for d in dims)


def _op_counts(proto) -> Counter[str]:
    """Op types in the graph, with local functions inlined and subgraphs (If/Loop) included."""
    functions = {(f.domain, f.name): f for f in proto.functions}
    counts: Counter[str] = Counter()

    def visit(nodes) -> None:
        for node in nodes:
            fn = functions.get((node.domain, node.op_type))
            if fn is not None:
                visit(fn.node)
                continue
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(proto.graph.node)
    return counts


def _external_files(target: Path) -> list[str]:
    import onnx

    try:
        proto = onnx.load(str(target), load_external_data=False)
    except Exception:  # noqa: BLE001
        return []
    files = set()
    for init in proto.graph.initializer:
        for kv in init.external_data:
            if kv.key == "location":
                files.add(kv.value)
    return sorted(files)


def _verify(model, inputs, ref_flat, tmp: Path, names: list[str], dynamic_batch: bool, rtol: float,
            atol: float, keep_qdq: bool = False) -> dict[str, tuple[float, float, tuple[int, ...]]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # A one-shot check, not a benchmark: as many threads as torch uses, and none left spinning
    # after the run to slow the caller's own work down.
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if keep_qdq:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    cases: list[tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]] = [(inputs, ref_flat)]
    if dynamic_batch:
        bigger = tuple(_grow_batch(x, batch + 1) for x in inputs)
        with torch.no_grad():
            cases.append((bigger, tree_flatten(model(*bigger))[0]))
    worst: dict[str, tuple[float, float, tuple[int, ...]]] = {}
    for xs, refs in cases:
        feed = {n: x.detach().cpu().numpy() for n, x in zip(feed_names, xs)}
        got = session.run(names, feed)
        b = xs[0].shape[0] if xs[0].dim() else 1
        for name, ref, out in zip(names, refs, got):
            ref64 = ref.detach().double().cpu()
            out64 = torch.from_numpy(out).double()
            if tuple(out64.shape) != tuple(ref64.shape):
                raise ExportError(
                    f"output '{name}' has shape {list(out64.shape)} in ONNX Runtime but "
                    f"{list(ref64.shape)} in PyTorch (batch {b})"
                )
            scale = ref64.abs().max().item() if ref64.numel() else 0.0
            err = (out64 - ref64).abs().max().item() if ref64.numel() else 0.0
            rel = err / scale if scale > 0 else err
            if not err <= atol + rtol * scale:
                raise ExportError(
                    f"output '{name}' differs from PyTorch by {err:.3g} (max abs) = {rel:.3g} of its "
                    f"largest value at batch {b}; allowed atol={atol:g} + rtol={rtol:g}·max|output|"
                )
            prev = worst.get(name, (0.0, 0.0, ()))
            worst[name] = (max(prev[0], err), max(prev[1], rel), prev[2] + (b,))
    return worst



# --- fixed point --------------------------------------------------------------------------------

def _fixed_point_casts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from normfx.nn.fixed_point import FixedPoint

    return [(n, m) for n, m in model.named_modules() if isinstance(m, FixedPoint)]


def _cast_site(name: str) -> tuple[str, str]:
    """``(tensor, layer)`` a cast belongs to, from its module name."""
    if ".parametrizations." in name:
        layer, _, rest = name.partition(".parametrizations.")
        return f"{layer}.{rest.split('.')[0]}", layer
    head, _, leaf = name.rpartition(".")
    if leaf in ("scale_q", "shift_q"):
        return f"{head}.{leaf[:-2]}", head
    if leaf.startswith("fxq_") and leaf.endswith("_in"):
        node = leaf[4:-3]
        return f"{node} inputs", (f"{head}.{node}" if head else node)
    if leaf.startswith("fxq_"):
        node = leaf[4:]
        return f"{node} output", (f"{head}.{node}" if head else node)
    return name, head


def _write_fixed_point_json(fixed: list[tuple[str, nn.Module]], target: Path) -> Path:
    """The HLS sidecar: every cast's ``ap_fixed<W, I, Q, O>`` type with its tensor and layer."""
    import json

    from normfx.functional import OVERFLOW, ROUNDING

    tensors = []
    for name, q in fixed:
        tensor, layer = _cast_site(name)
        types = q.hls_types()
        tensors.append({
            "tensor": tensor, "layer": layer, "module": name,
            "type": types[0] if len(types) == 1 else types,
            "bits": q.bits, "int_bits": [int(i) for i in q.integer_bits().reshape(-1).tolist()],
            "signed": q.signed, "rounding": ROUNDING[q.rounding], "overflow": OVERFLOW[q.overflow],
            "onnx": q.onnx_expressible,
        })
    path = target.with_name(target.stem + ".fixed_point.json")
    path.write_text(json.dumps({"format": "normfx.fixed_point", "version": 1, "onnx": target.name,
                                "tensors": tensors}, indent=1))
    return path


def _fixed_point_export_settings(fixed, exporter: Exporter, opset: int | None, json_path: Path):
    from normfx.functional import OVERFLOW, ROUNDING

    bad = [(n, q) for n, q in fixed if not q.onnx_expressible]
    if bad:
        n, q = bad[0]
        raise ExportError(
            f"FixedPoint '{n}' rounds with {q.rounding} ({ROUNDING[q.rounding]}) and overflows with "
            f"{q.overflow} ({OVERFLOW[q.overflow]}); ONNX QuantizeLinear only rounds half to even and "
            f"saturates, so {len(bad)} cast(s) cannot be written as QuantizeLinear/DequantizeLinear. "
            f"Use rounding='nearest_even' with overflow='saturate' or 'saturate_sym' to export; the HLS "
            f"types were written to {json_path}."
        )
    if exporter == "torchscript":
        raise ExportError("fixed-point models export with the dynamo exporter (exporter='dynamo' or 'auto')")
    if opset is not None and opset < 21:
        raise ExportError(f"fixed-point casts are written with opset 21 (int16 QuantizeLinear for 9-16 bits), "
                          f"got opset={opset}")
    return "dynamo", 21


def _qdq_onnx(x, scale, qmin: int, qmax: int, axis: int):
    """ONNX for ``normfx::fixed_point_qdq``: QuantizeLinear (zero point 0) -> DequantizeLinear, with
    int8/uint8 containers up to 8 bits and int16/uint16 above. A range narrower than its container
    is clamped in float first (``clamp(round(x/s)) == round(clamp(x, qmin·s, qmax·s)/s)`` for integer
    bounds; ONNX Runtime has no int16 Clip)."""
    from onnxscript import ir
    from onnxscript.onnx_opset import opset21 as op

    if qmin >= -128 and qmax <= 127:
        dt, full = ir.DataType.INT8, (-128, 127)
    elif qmin >= 0 and qmax <= 255:
        dt, full = ir.DataType.UINT8, (0, 255)
    elif qmin >= -32768 and qmax <= 32767:
        dt, full = ir.DataType.INT16, (-32768, 32767)
    else:
        dt, full = ir.DataType.UINT16, (0, 65535)
    if (qmin, qmax) != full:
        lo = op.Mul(scale, op.Constant(value_float=float(qmin)))
        hi = op.Mul(scale, op.Constant(value_float=float(qmax)))
        per_axis = scale.shape is not None and len(scale.shape) == 1
        if per_axis:  # Clip takes scalar bounds only: per-channel bounds broadcast through Max/Min
            rank = len(x.shape)
            shape = op.Constant(value_ints=[-1] + [1] * (rank - 1 - axis))
            x = op.Min(op.Max(x, op.Reshape(lo, shape)), op.Reshape(hi, shape))
        else:
            x = op.Clip(x, lo, hi)
    zero = op.Cast(op.Mul(scale, op.Constant(value_float=0.0)), to=dt)
    q = op.QuantizeLinear(x, scale, zero, axis=axis)
    return op.DequantizeLinear(q, scale, zero, axis=axis)
