"""Issue 25.4: a QFX model exported as QONNX, prepared by ``normfx.qonnx_for_hls4ml``, converted by
hls4ml with ``normfx.hls4ml_config`` and compiled as a C simulation (g++) gives PyTorch's bits —
BatchNorm multiply-adds and residual adds included; hls4ml's default input type does not."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import normfx
from tests.conftest import randomize_bn

pytest.importorskip("qonnx", reason="needs qonnx (pip install normfx[fpga])")
hls4ml = pytest.importorskip("hls4ml", reason="needs hls4ml (pip install normfx[fpga])")
if shutil.which("g++") is None:
    pytest.skip("hls4ml's C simulation needs g++", allow_module_level=True)


def _wrapper(q: nn.Module, x: torch.Tensor, path):
    normfx.export(q, x[:4], path, format="qonnx", dynamic_batch=False)
    return normfx.qonnx_for_hls4ml(path)


def _c_simulation(wrapper, config, out, io_type: str):
    hls = hls4ml.converters.convert_from_onnx_model(wrapper, output_dir=str(out), backend="Vitis", io_type=io_type,
                                                    hls_config=config)
    hls.compile()
    return hls


def _quantized(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    q = normfx.fixed_point(model, bits=8, **kw).eval()
    normfx.calibrate(q, [x], progress=False)
    return q.eval()


class _Block(nn.Module):
    """conv-BN-ReLU, then conv-BN plus the input (a residual add), ReLU, pooled to 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.relu(x + self.bn(self.conv(x))))


CASES = {
    # weights, biases and activations only
    "mlp": (lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), (64, 12),
            {"targets": ("weight", "bias", "activation")}, "io_parallel"),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3)),
            (64, 2, 8, 8), {"targets": ("weight", "bias", "activation")}, "io_stream"),
    # every target: BatchNorm as a fixed-point multiply-add (2-hot scales), the residual add
    "mlp_bn": (lambda: nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)), (64, 12),
               {"k_hot": 2}, "io_parallel"),
    "cnn_bn_residual": (_Block, (64, 2, 8, 8), {"k_hot": 2}, "io_stream"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_hls4ml_c_simulation_is_bit_exact(kind, tmp_path):
    build, shape, kw, io_type = CASES[kind]
    torch.manual_seed(0)
    model, x = randomize_bn(build()).eval(), 3 * torch.randn(*shape)
    q = _quantized(model, x, **kw)
    wrapper = _wrapper(q, x, tmp_path / f"{kind}.onnx")
    hls = _c_simulation(wrapper, normfx.hls4ml_config(wrapper), tmp_path / "hls", io_type)
    with torch.no_grad():
        ref = normfx.deploy(q)(x).numpy()
    got = np.asarray(hls.predict(np.ascontiguousarray(x.numpy(), dtype=np.float32))).reshape(ref.shape)
    assert np.array_equal(got, ref)


def test_batchnorm_constants_are_shaped_as_hls4ml_broadcasts_them(tmp_path):
    """hls4ml 1.3 broadcasts an element-wise constant to the layer's shape without the batch
    dimension; ``[1, 1, 1, C]`` (channels-last BatchNorm) cannot, ``[1, 1, C]`` can. Fast: no compile."""
    from onnx import numpy_helper

    torch.manual_seed(0)
    x = torch.randn(8, 2, 6, 6)
    q = _quantized(randomize_bn(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval(), x,
                   k_hot=2)
    wrapper = _wrapper(q, x, tmp_path / "bn.onnx")
    consts = {i.name: numpy_helper.to_array(i) for i in wrapper.graph.initializer}
    muls = [n for n in wrapper.graph.node if n.op_type in ("Mul", "Add") and n.input[1] in consts]
    assert muls and all(consts[n.input[1]].shape == (4,) for n in muls)
    assert wrapper.get_tensor_shape(wrapper.graph.input[0].name) == [4, 2, 6, 6]    # NCHW in, transposed inside
    assert [n.op_type for n in wrapper.graph.node if n.op_type == "Transpose"]


@pytest.mark.slow
def test_hls4mls_default_input_type_rounds_twice(tmp_path):
    """Without ``hls4ml_config``'s input type, hls4ml truncates the float input to ap_fixed<16, 6>
    before the cast rounds it: some outputs differ (the gap the config closes)."""
    torch.manual_seed(0)
    x = 3 * torch.randn(256, 12)
    q = _quantized(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), x,
                   targets=("weight", "bias", "activation"))
    wrapper = _wrapper(q, x, tmp_path / "mlp.onnx")
    config = normfx.hls4ml_config(wrapper)
    assert config["LayerName"]["global_in"]["Precision"]["result"].startswith("ap_fixed<8,")
    plain = hls4ml.utils.config_from_onnx_model(wrapper, granularity="name", backend="Vitis")
    hls = _c_simulation(wrapper, plain, tmp_path / "hls", "io_parallel")
    with torch.no_grad():
        ref = normfx.deploy(q)(x).numpy()
    got = np.asarray(hls.predict(np.ascontiguousarray(x.numpy(), dtype=np.float32))).reshape(ref.shape)
    assert not np.array_equal(got, ref)
