"""QFX to an FPGA's C simulation: the same bits as PyTorch, on the whole test set.

    python examples/fpga.py [--bits 8 4] [--epochs 30] [--qat-epochs 6] [--seeds 0 1 2] [--quick] [--store]

Needs the ``fpga`` extra (``pip install normfx[fpga]``: qonnx and hls4ml) and a C++ compiler (g++):
no vendor tools. About 4 minutes on 2 cores with the defaults (one C simulation compiles in about
20 s); ``--quick`` (one seed, W = 8) about a minute. It stays on scikit-learn's digits (8×8): its
claim is bit-exactness, which needs no harder data, and small inputs keep the C simulation small. For each
seed, a small MLP (a linear layer, BatchNorm, ReLU, a linear layer) and a small residual CNN (a conv
stem, one basic block with two BatchNorms and a residual add, max-pooling, a linear layer) are
trained in float on scikit-learn's digits (8×8, one channel); then for each word length W,
``normfx.fixed_point(model, bits=W, k_hot=2)`` casts every target (weights, biases, activations,
BatchNorm as a fixed-point multiply-add with 2-hot scales, the residual add), calibrates and
QFX-trains it (binary points in their own optimizer group, ``normfx.param_groups``), then:

1. ``normfx.export(q, x, path, format="qonnx")``: every cast a QONNX ``Quant`` node, verified bit for
   bit by executing the file with qonnx; its report carries the resource estimate (per layer
   multiplies, EBOPs, shift-and-add terms: ``normfx.resource_estimate``);
2. ``normfx.qonnx_for_hls4ml``: qonnx's cleanup, channels-last conversion for the CNN, Gemm →
   MatMul, and BatchNorm's per-channel constants shaped as hls4ml broadcasts them;
3. ``hls4ml.converters.convert_from_onnx_model`` with ``normfx.hls4ml_config`` (hls4ml's per-layer
   config, precisions inferred from the ``Quant`` nodes, and the input's type set to the input
   cast's: hls4ml's default input type truncates the float input first), Vitis backend,
   ``io_parallel`` (MLP) / ``io_stream`` (CNN), then ``compile()`` (g++) and ``predict`` on every
   test image, compared with the deployed PyTorch model's outputs bit for bit.

It prints ``bit-exact: N/N`` per model and word length and stores the counts, accuracies and
resource estimates per seed in ``results/fpga.json``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _digits import accuracy, load_digits
from _results import config_of, parse, record


class ResidualCNN(nn.Module):
    """A conv stem and one basic block (conv-BN-ReLU-conv-BN, plus the block's input), pooled."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(F.relu(x + y))


def models() -> dict[str, nn.Module]:
    return {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)),
        "cnn": ResidualCNN(),
    }


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, desc: str,
          binary_point_lr: float | None = None) -> None:
    params = (model.parameters() if binary_point_lr is None
              else normfx.param_groups(model, binary_point_lr=binary_point_lr))
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", leave=False):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def to_hls(path: Path, name: str, out: Path, io_type: str):
    """The QONNX file as hls4ml's ONNX front end wants it, converted and compiled (C simulation)."""
    import hls4ml

    wrapper = normfx.qonnx_for_hls4ml(path)
    hls = hls4ml.converters.convert_from_onnx_model(
        wrapper, output_dir=str(out / f"hls4ml_{name}"), backend="Vitis", io_type=io_type,
        hls_config=normfx.hls4ml_config(wrapper, backend="Vitis"))
    hls.compile()
    return hls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--k-hot", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--qat-epochs", type=int, default=6)
    ap.add_argument("--binary-point-lr", type=float, default=0.01)
    args = parse(ap, quick={"seeds": [0], "bits": [8], "epochs": 5, "qat_epochs": 1})
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    x_tr, y_tr, x_te, y_te = (t[:, :1] if t.dim() == 4 else t for t in load_digits(size=8))   # one channel
    runs = []
    for seed in args.seeds:
        run: dict = {"seed": seed}
        for name, float_model in models().items():
            torch.manual_seed(seed)
            model = copy.deepcopy(float_model)
            for m in model.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            train(model, x_tr, y_tr, args.epochs, 3e-3, seed, f"{name} float (seed {seed})")
            run[name] = {"float": accuracy(model, x_te, y_te)}
            for bits in args.bits:
                q = normfx.fixed_point(model, bits=bits, k_hot=args.k_hot).eval()
                normfx.calibrate(q, [x_tr], progress=False)
                train(q, x_tr, y_tr, args.qat_epochs, 1e-3, seed, f"{name} QFX {bits}-bit",
                      binary_point_lr=args.binary_point_lr)
                path = args.out / f"fpga_{name}_{bits}bit_seed{seed}.onnx"
                report = normfx.export(q, x_te[:8], path, format="qonnx", dynamic_batch=False)
                hls = to_hls(path, f"{name}_{bits}bit_seed{seed}", args.out,
                             "io_stream" if name == "cnn" else "io_parallel")
                with torch.no_grad():
                    ref = normfx.deploy(q)(x_te).numpy()
                # NCHW in: the channels-last conversion keeps a transpose at the input, which hls4ml runs
                got = np.asarray(hls.predict(np.ascontiguousarray(x_te.numpy(), dtype=np.float32))).reshape(ref.shape)
                same = int(np.all(got == ref, axis=1).sum())
                est = report.resources
                assert est is not None
                run[name][str(bits)] = {
                    "qfx": accuracy(q, x_te, y_te), "hls": float((got.argmax(1) == y_te.numpy()).mean()),
                    "bit_exact": same, "images": len(y_te), "max_abs_diff": float(np.abs(got - ref).max()),
                    "multiplies": est.multiplies, "bops": est.bops, "ebops": est.ebops, "terms": est.terms,
                    "layers": [dataclasses.asdict(c) for c in est.layers]}
                r = run[name][str(bits)]
                print(f"seed {seed} {name} W={bits}: float {run[name]['float']:.3f}, QFX {r['qfx']:.3f}, "
                      f"hls4ml C simulation {r['hls']:.3f}; bit-exact: {same}/{len(y_te)}; "
                      f"{est.ebops} EBOPs, {est.terms} shift-and-add terms per image")
                if seed == args.seeds[0]:
                    print(est.summary())
        runs.append(run)
    path = record("fpga", config_of(args), runs, args.results)
    print(f"stored {path}")


if __name__ == "__main__":
    main()
