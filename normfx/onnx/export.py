"""export(): deploy a copy, export to ONNX with an explicit exporter, check it, verify it in ONNX Runtime.

Nothing half-written is left behind: the file is written into a temporary folder next to the target
and moved into place only after ``onnx.checker`` and the ONNX Runtime comparison pass.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import onnx
import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from normfx.api import deploy as deploy_model
from normfx.errors import ExportError
from normfx.nn.fixed_point import exporting
from normfx.onnx.diagnose import chain_text, first_line
from normfx.onnx.diagnose import culprit as find_culprit
from normfx.onnx.exact_sums import exact_integer_sums
from normfx.onnx.qonnx import qonnx_refusals, quant_onnx, require_qonnx, verify_qonnx
from normfx.onnx.resources import ResourceEstimate, resource_estimate
from normfx.onnx.fixed_point import (fixed_point_casts, fixed_point_export_settings, qdq_onnx,
                                     write_fixed_point_json)
from normfx.onnx.verify import dims, external_files, grow_batch, op_counts
from normfx.onnx.verify import verify as verify_in_ort
from normfx.report import Report, attach_report, last_report
from normfx.trace import materialize, trace_regions

__all__ = ["export", "ExportError", "ExportReport", "OutputCheck", "Exporter"]

logger = logging.getLogger("normfx")

Exporter = Literal["auto", "dynamo", "torchscript"]
Format = Literal["onnx", "qonnx"]

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
    resources: ResourceEstimate | None = None
    """``format="qonnx"``: per-layer multiplies, BOPs, EBOPs and shift-and-add terms
    (``normfx.resource_estimate``)."""

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
        # Only the deploy steps that found sites: "0 sites" lines say nothing to a user.
        lines += [p.summary() for p in self.passes.passes if p.sites] or ["deploy: no site to fold or finalize"]
        lines += list(self.notes)
        if self.fixed_point_json:
            lines.append(f"fixed-point types (ap_fixed, per tensor and layer): {self.fixed_point_json}")
        if self.resources is not None:
            lines.append(f"resources per sample: {self.resources.multiplies} multiplies, "
                         f"{self.resources.ebops} EBOPs, {self.resources.terms} shift-and-add terms")
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
    format: Format = "onnx",
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
        format: ``"onnx"`` (fixed-point casts as QuantizeLinear/DequantizeLinear, verified in ONNX
            Runtime) or ``"qonnx"`` (a fixed-point model's casts as QONNX ``Quant`` nodes, for hls4ml
            and FINN; verified bit for bit by executing the file with ``qonnx``, which
            ``pip install normfx[fpga]`` installs).

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
            raise ExportError(
                f"the example inputs ({shapes}) do not run through {type(model).__name__}: {first_line(e)}"
            ) from e
    ref_flat, _ = tree_flatten(reference)
    if not all(isinstance(r, torch.Tensor) for r in ref_flat):
        raise ExportError("every output of the model must be a tensor (nested tuples/lists/dicts allowed)")

    if deploy:
        deployed = deploy_model(model, example_inputs=inputs)   # shapes: BatchNorms after reshapes fold too
    else:
        deployed = materialize(trace_regions(copy.deepcopy(model)))
        attach_report(deployed, Report())
    fixed = fixed_point_casts(deployed)
    json_path = None
    if format == "qonnx":
        exporter, opset = qonnx_export_settings(deployed, fixed, exporter, opset, target)
        json_path = target.with_name(target.stem + ".fixed_point.json")
    elif fixed:
        json_path = write_fixed_point_json(fixed, target)
        exporter, opset = fixed_point_export_settings(fixed, exporter, opset, json_path)
    input_names = _input_names(deployed, len(inputs))
    output_names = ["output"] if len(ref_flat) == 1 else [f"output_{i}" for i in range(len(ref_flat))]
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    export_inputs = inputs
    if dynamic_batch and batch == 1:
        # torch.export specializes a dimension of size 1; trace at batch 2, verify at 1 and 2.
        export_inputs = tuple(grow_batch(x, 2) for x in inputs)
    large = sum(p.numel() * p.element_size() for p in deployed.parameters()) > _TWO_GB

    tmpdir = Path(tempfile.mkdtemp(prefix=".normfx-export-", dir=target.parent))
    try:
        tmp = tmpdir / target.name
        with exporting(deployed, "qonnx" if format == "qonnx" else "qdq"):
            used, notes = _export(deployed, export_inputs, tmp, exporter, opset, dynamic_batch,
                                  input_names, output_names, large)
        sums = None
        if fixed and not large and format == "onnx":
            # the layers' sums as integer kernels: the value the emulation's float64 sums give
            sums = exact_integer_sums(str(tmp))
            notes.append(sums.summary())
            logger.info("%s", sums.summary())
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"onnx.checker rejected the exported file: {e}") from e
        proto = onnx.load(str(tmp), load_external_data=False)
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        counts = op_counts(proto)
        in_shapes = tuple((i.name, dims(i)) for i in proto.graph.input)
        out_shapes = {o.name: dims(o) for o in proto.graph.output}
        onnx_out_names = [o.name for o in proto.graph.output]
        try:
            if format == "qonnx":
                checks = _verify_qonnx(deployed, inputs, tmp, onnx_out_names, dynamic_batch, notes) if verify else {}
            else:
                checks = verify_in_ort(model, inputs, ref_flat, tmp, onnx_out_names, dynamic_batch, rtol, atol,
                                       keep_qdq=bool(fixed), exported=deployed) if verify else {}
        except ExportError as e:
            if sums is None or not sums.left:
                raise
            raise ExportError(
                f"{e}. Likely cause: summation order. {len(sums.left)} conv/linear layer(s) kept float sums "
                f"({'; '.join(f'{n}: {why}' for n, why in sums.left[:3])}), which ONNX Runtime adds in "
                "another order than PyTorch: past 2^24 steps a sum differs in the last bit, and the next "
                "cast turns that into a whole step. Layers with 8-bit inputs and weights sum exactly.") from e
        if fixed and format == "onnx":
            notes.append("fixed point: verified with ONNX Runtime's graph optimizations at BASIC, so the "
                         "QDQ fusions of the EXTENDED level (integer QLinearConv/QLinearMatMul kernels with "
                         "their own requantization) do not replace the casts")
        resources = None
        if format == "qonnx":
            try:
                resources = resource_estimate(str(tmp))
            except Exception as e:  # noqa: BLE001 - an estimate that fails must not lose a verified file
                notes.append(f"resource estimate not available: {type(e).__name__}: {e}")
                logger.warning("resource estimate not available: %s", e)
        outputs = tuple(
            OutputCheck(n, out_shapes[n], *checks.get(n, (float("nan"), float("nan"), ())))
            for n in onnx_out_names
        )
        for f in tmpdir.iterdir():
            os.replace(f, target.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    size = sum(
        (target.parent / f).stat().st_size for f in [target.name, *external_files(target)]
        if (target.parent / f).exists()
    )
    report = ExportReport(
        str(target), used, opset_used, dict(counts), in_shapes, outputs, last_report(deployed), size,
        time.perf_counter() - t0, verify, tuple(notes), str(json_path) if json_path else None, resources,
    )
    for line in report.summary().splitlines():
        logger.info("%s", line)
    return report


def qonnx_export_settings(deployed: nn.Module, fixed: list, exporter: Exporter, opset: int | None,
                          target: Path) -> tuple[Exporter, int]:
    """QONNX needs qonnx, a fixed-point model and casts ``Quant`` expresses; the sidecar JSON is
    written either way."""
    require_qonnx()
    if not fixed:
        raise ExportError("format='qonnx' writes fixed-point casts as Quant nodes, and this model has none "
                          "(call normfx.fixed_point and normfx.calibrate first, or export with format='onnx')")
    json_path = write_fixed_point_json(fixed, target)
    bad = qonnx_refusals(deployed, fixed)
    if bad:
        name, why = bad[0]
        raise ExportError(f"FixedPoint '{name}' {why}: {len(bad)} cast(s) cannot be written as QONNX Quant nodes, "
                          f"and nothing was written but the HLS types ({json_path})")
    if exporter == "torchscript":
        raise ExportError("fixed-point models export with the dynamo exporter (exporter='dynamo' or 'auto')")
    return "dynamo", opset or 21


def _verify_qonnx(deployed: nn.Module, inputs: tuple[torch.Tensor, ...], tmp: Path, names: list[str],
                  dynamic_batch: bool, notes: list[str]) -> dict[str, tuple[float, float, tuple[int, ...]]]:
    batch = inputs[0].shape[0] if inputs[0].dim() else 1
    batches = (batch, batch + 1) if dynamic_batch else (batch,)
    verify_qonnx(deployed, inputs, str(tmp), batches)
    notes.append(f"QONNX: executed with qonnx at batch {', '.join(map(str, batches))}, equal to PyTorch bit for bit")
    return {n: (0.0, 0.0, batches) for n in names}


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
                note = f"the {name} exporter failed ({first_line(e)}); fell back to {order[-1]}"
                logger.warning("%s", note)
                notes.append(note)
    culprit = find_culprit(model, " ".join(chain_text(e) for _, e in errors))
    detail = "; ".join(f"{n}: {first_line(e)}".rstrip(".") for n, e in errors)
    hint = (" Replace that op, or give the dynamo exporter a translation for it "
            "(torch.onnx.export's custom_translation_table).") if culprit else ""
    raise ExportError(f"ONNX export failed{culprit}. {detail}.{hint}") from errors[-1][1]


def _export_dynamo(model, inputs, tmp, opset, dynamic_batch, input_names, output_names, large) -> None:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} if x.dim() else None for x in inputs)
    extra: dict[str, Any] = {}
    if fixed_point_casts(model):
        extra["custom_translation_table"] = {torch.ops.normfx.fixed_point_qdq.default: qdq_onnx,
                                             torch.ops.normfx.fixed_point_quant.default: quant_onnx}
    program = torch.onnx.export(
        model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
        input_names=input_names, output_names=output_names, optimize=True, verbose=False, **extra,
    )
    program.save(str(tmp), external_data=large)


def _export_torchscript(model, inputs, tmp, opset, dynamic_batch, input_names, output_names) -> None:
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, inputs, str(tmp), dynamo=False, opset_version=opset or 17, input_names=input_names,
            output_names=output_names, dynamic_axes=axes, do_constant_folding=True,
        )


