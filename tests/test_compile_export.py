"""Every registered transform's model under ``torch.export`` and ``torch.compile`` (inductor, CPU),
parametrized from the registry: the exported program equals eager, dynamo breaks no graph in a
normfx module, and a compiled training step equals the eager one (loss, gradients, buffers: running
statistics, λ, DirectPred's statistics, binary points), then eval after training uses the trained
values.

Found by these tests: a fixed-point cast read its binary point with ``float()`` (a data-dependent
guard for export) and wrote ``out=`` tensors (graph breaks on a ViT); PRepBN read λ with ``float()``;
a Tune block's link to its BN is Python state (four graph breaks on a small CNN); DirectPred skipped
collecting its statistics when compiled (a compiled training step left F's pending sums at zero).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import normfx
from normfx.nn.repbn import ProgressiveRepBN
from tests.test_contract import _cnn, _vit

MODELS = {"cnn": (_cnn, (4, 3, 8, 8)), "vit": (_vit, (2, 3, 32, 32))}
CASES = [pytest.param(t, m, id=f"{t.name}-{m}") for t in normfx.TRANSFORMS for m in MODELS]


def _transformed(t, model_name: str) -> tuple[nn.Module, torch.Tensor]:
    build, shape = MODELS[model_name]
    torch.manual_seed(0)
    x = torch.randn(*shape)
    try:
        m = normfx.apply(build(), t.example_config())
    except ValueError as e:
        pytest.skip(f"{t.name} does not apply to the {model_name} model: {e}")
    if any(isinstance(q, normfx.nn.FixedPoint) for q in m.modules()):
        normfx.calibrate(m, [x], progress=False)
    for p in m.modules():
        if isinstance(p, ProgressiveRepBN):
            p.lam.fill_(0.5)      # mid-schedule: both branches count
    return m, x


@pytest.mark.slow
@pytest.mark.parametrize("t, model_name", CASES)
def test_torch_export_equals_eager(t, model_name):
    m, x = _transformed(t, model_name)
    m.eval()
    program = torch.export.export(m, (x,))
    with torch.no_grad():
        assert torch.allclose(program.module()(x), m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("t, model_name", CASES)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_graph_break(t, model_name, mode):
    m, x = _transformed(t, model_name)
    m.train(mode == "train")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


def _grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("t, model_name", CASES)
def test_compiled_training_step_equals_eager(t, model_name):
    m, x = _transformed(t, model_name)
    eager, compiled = copy.deepcopy(m.train()), copy.deepcopy(m.train())
    torch._dynamo.reset()
    run = torch.compile(compiled)
    le = eager(x).float().pow(2).mean()
    le.backward()
    lc = run(x).float().pow(2).mean()
    lc.backward()
    assert torch.allclose(lc, le, rtol=1e-5, atol=0)
    ge, gc = _grads(eager), _grads(compiled)
    assert ge.keys() == gc.keys()
    # Relative to the largest gradient: a conv bias before a train-mode BatchNorm has a gradient that
    # is 0 in exact arithmetic (~1e-10 here), whose own relative error means nothing.
    scale = max(float(g.abs().max()) for g in ge.values())
    for name, g in ge.items():
        tol = 2e-2 if name.endswith("int_bits") else 1e-4   # a binary point's gradient: one sum over a tensor
        assert float((gc[name] - g).abs().max()) <= tol * max(float(g.abs().max()), 1e-2 * scale), name
    for (name, a), b in zip(eager.named_buffers(), compiled.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6), name
    with torch.no_grad():     # train -> eval: the trained values, recompiled for eval mode
        assert torch.allclose(run.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-5)


_AOTI_RUN = """
import sys, torch
package = torch._inductor.aoti_load_package(sys.argv[1])
io = torch.load(sys.argv[2], weights_only=True)
print(float((package(io["x"]) - io["y"]).abs().max()))
"""


@pytest.mark.slow
def test_aoti_package_of_a_deployed_resnet18_runs_in_a_fresh_process(tmp_path):
    """The deployment path beside ONNX: torch.export -> AOTInductor package -> a new interpreter."""
    import subprocess
    import sys

    import torchvision

    from tests.conftest import randomize_bn

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = normfx.deploy(normfx.convbn(randomize_bn(torchvision.models.resnet18(), x).eval()))
    program = torch.export.export(model, (x,))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "r18.pt2"))
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    out = subprocess.run([sys.executable, "-c", _AOTI_RUN, package, str(tmp_path / "io.pt")],
                         capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4
