"""ONNX Runtime against PyTorch for an exported file: the worst error of every output at each batch
size, and what the file holds (op counts, shapes, external data)."""
from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch.utils._pytree import tree_flatten

from normfx.errors import ExportError

__all__ = ["verify", "op_counts", "dims", "external_files", "grow_batch"]

logger = logging.getLogger("normfx")


def grow_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    reps = -(-size // x.shape[0])
    return torch.cat([x] * reps)[:size] if x.dim() else x


def dims(value_info) -> tuple[int | str, ...]:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_param if d.dim_param else d.dim_value for d in dims)


def op_counts(proto) -> Counter[str]:
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


def external_files(target: Path) -> list[str]:
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


def verify(model, inputs, ref_flat, tmp: Path, names: list[str], dynamic_batch: bool, rtol: float,
            atol: float, keep_qdq: bool = False, exported=None) -> dict[str, tuple[float, float, tuple[int, ...]]]:
    """ONNX Runtime's outputs of the file ``tmp`` against PyTorch's (``ref_flat`` for ``inputs``, the
    model's own at one more batch row): the worst error per output and the batch sizes checked.
    ``exported``: the model the file was exported from (the deployed copy), whose own float32
    rounding a difference over the tolerance is compared with (``_within_float32_rounding``)."""
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
        bigger = tuple(grow_batch(x, batch + 1) for x in inputs)
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
                floor = None if keep_qdq else _within_float32_rounding(model, exported, xs, names.index(name),
                                                                       out64, ref64)
                if floor is None:
                    raise ExportError(
                        f"output '{name}' differs from PyTorch by {err:.3g} (max abs) = {rel:.3g} of its "
                        f"largest value at batch {b}; allowed atol={atol:g} + rtol={rtol:g}·max|output|"
                    )
                logger.info("output '%s' at batch %d: ONNX Runtime is %.3g from the model run in float64, "
                            "PyTorch's float32 run %.3g: the difference to PyTorch (%.3g) is float32 rounding",
                            name, b, *floor, err)
            prev = worst.get(name, (0.0, 0.0, ()))
            worst[name] = (max(prev[0], err), max(prev[1], rel), prev[2] + (b,))
    return worst


def _within_float32_rounding(model, exported, xs: tuple[torch.Tensor, ...], index: int, out: torch.Tensor,
                             ref: torch.Tensor) -> tuple[float, float] | None:
    """A deep network in float32 (randomized BatchNorm statistics make it worse) rounds differently
    in every runtime: PyTorch's own float32 output is then farther from the exact value than the
    tolerance. Run the model in float64: ``(ORT's, PyTorch float32's)`` max distance to it when ONNX
    Runtime is no farther from it than twice PyTorch's float32 output is (the model's, or the
    exported copy's: its folded weights were rounded to float32 once more), else ``None``."""
    if not (ref.is_floating_point() and all(x.is_floating_point() or not x.dim() for x in xs)):
        return None
    try:
        m64 = copy.deepcopy(model).double()
        x64 = tuple(x.double() if x.is_floating_point() else x for x in xs)
        with torch.no_grad():
            exact, again = (tree_flatten(m64(*x64))[0][index].detach().double().cpu() for _ in range(2))
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 keeps the plain check
        return None
    ort_err = (out - exact).abs().max().item()
    torch_err = (ref - exact).abs().max().item()
    if exported is not None:
        try:
            with torch.no_grad():
                mine = tree_flatten(exported(*xs))[0][index].detach().double().cpu()
        except Exception:  # noqa: BLE001
            return None
        torch_err = max(torch_err, (mine - exact).abs().max().item())
    # Rounding, not randomness (a model that draws random numbers gives another output each run) or
    # an output float32 cannot hold: the float64 runs agree and float32 is within 1% of them.
    rounding = torch.equal(exact, again) and torch_err <= 1e-2 * exact.abs().max().item()
    return (ort_err, torch_err) if rounding and ort_err <= 2 * torch_err else None
