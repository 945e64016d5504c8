"""Issue 25.4: a QFX model exported as QONNX, converted by hls4ml with ``normfx.hls4ml_config`` and
compiled as a C simulation (g++) gives PyTorch's bits; hls4ml's default input type does not."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import normfx

pytest.importorskip("qonnx", reason="needs qonnx (pip install normfx[fpga])")
hls4ml = pytest.importorskip("hls4ml", reason="needs hls4ml (pip install normfx[fpga])")
if shutil.which("g++") is None:
    pytest.skip("hls4ml's C simulation needs g++", allow_module_level=True)


def _wrapper(q: nn.Module, x: torch.Tensor, path, channels_last: bool):
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    normfx.export(q, x[:4], path, format="qonnx", dynamic_batch=False)
    wrapper = cleanup_model(ModelWrapper(str(path)))
    if channels_last:
        wrapper = wrapper.transform(ConvertToChannelsLastAndClean())
    return cleanup_model(wrapper.transform(GemmToMatMul()))


def _c_simulation(wrapper, config, out, io_type: str):
    hls = hls4ml.converters.convert_from_onnx_model(wrapper, output_dir=str(out), backend="Vitis", io_type=io_type,
                                                    hls_config=config)
    hls.compile()
    return hls


def _quantized(model: nn.Module, x: torch.Tensor) -> nn.Module:
    q = normfx.fixed_point(model, bits=8, targets=("weight", "bias", "activation")).eval()
    normfx.calibrate(q, [x], progress=False)
    return q.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hls4ml_c_simulation_is_bit_exact(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "mlp":
        model, x = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 3 * torch.randn(64, 12)
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))
        x = 3 * torch.randn(64, 2, 8, 8)
    q = _quantized(model, x)
    wrapper = _wrapper(q, x, tmp_path / f"{kind}.onnx", channels_last=kind == "cnn")
    config = normfx.hls4ml_config(wrapper)
    hls = _c_simulation(wrapper, config, tmp_path / "hls", "io_stream" if kind == "cnn" else "io_parallel")
    with torch.no_grad():
        ref = normfx.deploy(q)(x).numpy()
    got = np.asarray(hls.predict(np.ascontiguousarray(x.numpy(), dtype=np.float32))).reshape(ref.shape)
    assert np.array_equal(got, ref)


@pytest.mark.slow
def test_hls4mls_default_input_type_rounds_twice(tmp_path):
    """Without ``hls4ml_config``'s input type, hls4ml truncates the float input to ap_fixed<16, 6>
    before the cast rounds it: some outputs differ (the gap the config closes)."""
    torch.manual_seed(0)
    x = 3 * torch.randn(256, 12)
    q = _quantized(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), x)
    wrapper = _wrapper(q, x, tmp_path / "mlp.onnx", channels_last=False)
    config = normfx.hls4ml_config(wrapper)
    assert config["LayerName"]["global_in"]["Precision"]["result"].startswith("ap_fixed<8,")
    plain = hls4ml.utils.config_from_onnx_model(wrapper, granularity="name", backend="Vitis")
    hls = _c_simulation(wrapper, plain, tmp_path / "hls", "io_parallel")
    with torch.no_grad():
        ref = normfx.deploy(q)(x).numpy()
    got = np.asarray(hls.predict(np.ascontiguousarray(x.numpy(), dtype=np.float32))).reshape(ref.shape)
    assert not np.array_equal(got, ref)
