"""QFX on Fashion-MNIST: float vs post-training quantization vs QAT vs trained binary points vs LSQ.

    python examples/fixed_point.py [--data DIR] [--train 3000] [--test 2000] [--size 16] [--bits 4 8]
                                   [--weight-bits 3 4] [--wide 8] [--epochs 20] [--qat-epochs 6]
                                   [--seeds 0 1 2] [--binary-code] [--quick] [--store]

About 21 minutes on 2 cores with the defaults (3 seeds, 4 columns); ``--quick`` (one seed, two
columns, fewer images and epochs) under a minute. Needs Fashion-MNIST (``apt-get install
dataset-fashion-mnist``, or ``--data DIR`` with its four idx files). What was cut to fit: 3,000 of
the 60,000 training images and 2,000 of the 10,000 test images (fixed subsets), resized to 16×16,
a ResNet-8, 20 float epochs and 6 quantized ones. Results go to ``examples/out/results/`` unless
``--store`` updates the stored ones the docs render from.

A small CIFAR-style ResNet (the one from ``examples/bn_only.py``) is trained in float. Then, for each
word length W, ``normfx.fixed_point(model, bits=W, k_hot=2)`` casts weights, biases, activations,
BatchNorm (a fixed-point multiply-add with 2-hot scales) and residual adds to ``ap_fixed<W, I>``:

* ``PTQ``: binary points from ``normfx.calibrate`` on training batches, nothing trained;
* ``QAT``: the same start, then the weights are trained with every binary point fixed where
  calibration put it (the control that separates "training" from "learning the binary point");
* ``QFX``: the same start, then the weights and every binary point are trained (straight-through),
  the binary points in an optimizer group of their own (``normfx.param_groups``, learning rate
  ``--binary-point-lr``);
* the same three from a calibration on one batch of ``--few`` training images (scenario (a) of
  issue 25: calibration on few batches);
* ``LSQ``: the anchor meant as the upper one: the same start, then every cast that is not K-hot (weights, biases,
  activations, BatchNorm shifts, residual adds) replaced by an LSQ-style quantizer (Esser et al.,
  2020) whose step is a free trained scale (not a power of two) on the same integer range, its
  gradient scaled by ``1/√(N·Q_p)``, starting at the calibrated step; weights and steps trained
  together at the weights' learning rate.

Besides the columns where every cast has ``W`` bits, ``--weight-bits`` adds columns with 3- or 4-bit
conv/linear weights and every other cast at ``--wide`` bits (``normfx.fixed_point(model,
bits=8, weight_bits=4)``: scenario (c) of issue 25).

K-hot scales count their terms two ways (``k_hot_code``): ``csd`` (signed powers of two, normfx's
default) and ``binary`` (ones of the magnitude's binary word, QFX's count); ``--binary-code`` runs
PTQ and QFX with the second too. The table gives the mean number of terms the BN scales use.

Each seed trains its own float model; the per-seed accuracies go to ``fixed_point.json``
(``examples/render.py`` renders the docs table from ``examples/results/fixed_point.json``). The QFX
model at the widest W of the first seed is exported to ONNX and checked bit for bit in ONNX Runtime
(with its ``ap_fixed`` sidecar).
"""
from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _data import add_data_argument, load_fashion_mnist
from _digits import accuracy
from _results import config_of, mean_std, parse, record
from bn_only import CifarResNet


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
          desc: str, seed: int = 0, binary_point_lr: float | None = None) -> None:
    """Adam with a cosine schedule; ``binary_point_lr``: the binary points in a group of their own
    (``normfx.param_groups``), else every parameter at ``lr``."""
    params = (model.parameters() if binary_point_lr is None
              else normfx.param_groups(model, binary_point_lr=binary_point_lr))
    opt = torch.optim.Adam(params, lr=lr)
    steps = -(-len(y) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=epochs * steps, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(steps):
                idx = perm[i * batch:(i + 1) * batch]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()


class LSQ(normfx.nn.FixedPoint):
    """The LSQ anchor (Esser et al., 2020, "Learned Step Size Quantization"): the cast's integer
    range with a free, trained step ``s`` instead of ``2^(I−W)``; ``∂/∂s`` scaled by
    ``g = 1/√(N·Q_p)`` (N: weights in the tensor, or activations per sample), rounding straight
    through. Benchmark-only: a cast's class swapped in this example, never part of normfx."""

    step: torch.nn.Parameter

    @classmethod
    def swap(cls, cast: normfx.nn.FixedPoint) -> None:
        cast.__class__ = cls
        step = torch.exp2(cast.integer_bits() - cast.bits).reshape(-1)
        cast.step = torch.nn.Parameter(step)     # the calibrated step as the start
        cast.int_bits.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._range()
        tensor = self.site is not None and self.site[0] in ("weight", "bias", "scale", "shift")
        n = x.numel() if tensor or x.dim() == 0 else x[0].numel()
        g = 1.0 / math.sqrt(max(n, 1) * hi)
        s = self.step * g + (self.step - self.step * g).detach()        # gradient scaled by g
        if s.numel() > 1:
            s = s.reshape([-1] + [1] * (x.dim() - 1 - self.axis % x.dim()))
        v = torch.clamp(x / s, lo, hi)
        return ((torch.round(v) - v).detach() + v) * s                    # rounding straight through


def lsq(q: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``q`` with every trainable, non-K-hot cast an ``LSQ`` quantizer."""
    out = copy.deepcopy(q)
    for cast in _casts(out):
        if not cast.k_hot:
            LSQ.swap(cast)
    return out


def _casts(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, normfx.nn.FixedPoint) and m.trainable]


@torch.no_grad()
def _mean_scale_terms(model: torch.nn.Module, code: str) -> float:
    """Mean number of terms (``code``'s count) of the BN scales ``model`` computes with in eval mode."""
    from normfx.functional import k_hot_terms

    counts = []
    for m in model.modules():
        if isinstance(m, normfx.nn.FixedPointBatchNorm):
            was = m.training
            m.eval()
            scale, _ = m.quantized_scale_shift(*m.scale_shift(m.running_mean.new_zeros(1, m.num_features)))
            m.train(was)
            step = float(2.0 ** (m.scale_q.integer_bits().reshape(-1)[0] - m.scale_q.bits))
            counts.append(k_hot_terms(scale, step, code).double())
    return float(torch.cat(counts).mean())


def _qat_and_qfx(q: torch.nn.Module, x_tr, y_tr, x_te, y_te, args, b: str, seed: int,
                 tag: str = "") -> tuple[tuple[float, float], int, int]:
    """QAT (binary points fixed where ``q`` has them) and QFX (trained, ``--binary-point-lr``) from
    ``q``, which is trained in place by QFX; their test accuracies, how many casts' binary points
    QFX moved (per channel, by at least one integer bit) and the largest shift."""
    fixed = copy.deepcopy(q)
    for cast in fixed.modules():
        if isinstance(cast, normfx.nn.FixedPoint) and cast.trainable:
            cast.int_bits.requires_grad_(False)   # the binary point stays where calibration put it
    train(fixed, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"{tag}QAT {b}", seed=seed)
    train(q, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"{tag}QFX {b}", seed=seed,
          binary_point_lr=args.binary_point_lr)
    moves = normfx.binary_point_moves(q)
    return ((accuracy(fixed.eval(), x_te, y_te), accuracy(q.eval(), x_te, y_te)),
            sum(m.moved > 0 for m in moves), max((m.shift for m in moves), key=abs, default=0))


def columns(args: argparse.Namespace) -> list[tuple[str, int, int | None]]:
    """``(key, bits, weight_bits)`` per column: every cast at W bits (key ``"W"``), then W-bit
    weights with every other cast at ``--wide`` bits (key ``"w{W}a{wide}"``)."""
    return ([(str(b), b, None) for b in args.bits]
            + [(f"w{wb}a{args.wide}", args.wide, wb) for wb in args.weight_bits])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(ap)
    ap.add_argument("--train", type=int, default=3000, help="training images (a fixed subset)")
    ap.add_argument("--test", type=int, default=2000, help="test images (a fixed subset)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--weight-bits", type=int, nargs="*", default=[3, 4],
                    help="columns with these conv/linear weight widths and every other cast at --wide bits")
    ap.add_argument("--wide", type=int, default=8)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k-hot", type=int, default=2)
    ap.add_argument("--binary-point-lr", type=float, default=0.01)
    ap.add_argument("--few", type=int, default=16, help="images in the few-batch calibration")
    ap.add_argument("--binary-code", action="store_true",
                    help="also PTQ and QFX with k_hot_code='binary' (BN scales counted as QFX counts them)")
    args = parse(ap, quick={"seeds": [0], "bits": [4], "weight_bits": [4], "epochs": 4, "qat_epochs": 2,
                            "train": 1000, "test": 500})

    x_tr, y_tr, x_te, y_te = load_fashion_mnist(args.data, train=args.train, test=args.test, size=args.size)
    calib = [x_tr[i:i + 256] for i in range(0, len(x_tr), 256)]
    runs, exported = [], None
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = CifarResNet(args.depth, in_channels=1)
        train(model, x_tr, y_tr, args.epochs, 3e-3, args.batch, f"float (seed {seed})", seed=seed)
        model.eval()
        run: dict = {"seed": seed, "float": {}, "PTQ": {}, "QAT": {}, "QFX": {}, "LSQ": {}, "QFX_moved": {},
                     "casts": {}, "terms_csd": {}, "PTQ_few": {}, "QAT_few": {}, "QFX_few": {}, "QFX_few_moved": {},
                     "QFX_shift": {}}
        if args.binary_code:
            run.update({"PTQ_binary": {}, "QFX_binary": {}, "terms_binary": {}})
        for key, b, wb in columns(args):
            cast = dict(bits=b, weight_bits=wb, k_hot=args.k_hot)
            run["float"][key] = accuracy(model, x_te, y_te)
            q = normfx.fixed_point(model, **cast).eval()
            normfx.calibrate(q, calib, progress=False)
            run["PTQ"][key] = accuracy(q, x_te, y_te)
            anchor = lsq(q)
            train(anchor, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"LSQ {key}", seed=seed)
            run["LSQ"][key] = accuracy(anchor.eval(), x_te, y_te)
            acc, moved, shift = _qat_and_qfx(q, x_tr, y_tr, x_te, y_te, args, key, seed)
            run["QAT"][key], run["QFX"][key] = acc
            run["QFX_moved"][key], run["QFX_shift"][key] = moved, shift
            run["casts"][key] = len(_casts(q))
            run["terms_csd"][key] = _mean_scale_terms(q, "csd")
            if exported is None and b == max(args.bits) and wb is None:
                exported = q
            few = normfx.fixed_point(model, **cast).eval()
            normfx.calibrate(few, [x_tr[:args.few]], progress=False)   # one small batch
            run["PTQ_few"][key] = accuracy(few, x_te, y_te)
            (run["QAT_few"][key], run["QFX_few"][key]), run["QFX_few_moved"][key], _ = _qat_and_qfx(
                few, x_tr, y_tr, x_te, y_te, args, key, seed, "few-batch ")
            if args.binary_code:
                qb = normfx.fixed_point(model, **cast, k_hot_code="binary").eval()
                normfx.calibrate(qb, calib, progress=False)
                run["PTQ_binary"][key] = accuracy(qb, x_te, y_te)
                train(qb, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"QFX {key} binary", seed=seed,
                      binary_point_lr=args.binary_point_lr)
                run["QFX_binary"][key] = accuracy(qb.eval(), x_te, y_te)
                run["terms_binary"][key] = _mean_scale_terms(qb, "binary")
        runs.append(run)
    config = {**config_of(args), "dataset": "Fashion-MNIST"}
    path = record("fixed_point", config, runs, args.results)

    print(f"\nResNet-{args.depth} on Fashion-MNIST ({args.train} training images at {args.size}x{args.size}), "
          f"test accuracy over seeds {args.seeds}; casts on weights, biases, activations, "
          f"BatchNorm ({args.k_hot}-hot scales) and residual adds ({path})")
    keys = [key for key, *_ in columns(args)]
    print(f"{'':<10}" + "".join(f"{key:>17}" for key in keys))
    for k in ("float", "PTQ", "QAT", "QFX", "LSQ", "PTQ_few", "QAT_few", "QFX_few", "PTQ_binary", "QFX_binary"):
        if k in runs[0]:
            print(f"{k:<10}" + "".join(f"{mean_std([r[k][key] for r in runs]):>17}" for key in keys))

    b = max(args.bits)
    report = normfx.export(exported, x_te[:8], args.out / f"fixed_point_{b}bit.onnx", rtol=0.0, atol=0.0)
    print(f"\nexported the {b}-bit QFX model: max abs difference ONNX Runtime vs PyTorch "
          f"{report.outputs[0].max_abs}; QuantizeLinear {report.op_counts.get('QuantizeLinear', 0)}; "
          f"HLS types in {report.fixed_point_json}")


if __name__ == "__main__":
    main()
