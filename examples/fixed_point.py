"""QFX on scikit-learn's digits: float vs post-training quantization vs QAT vs trained binary points.

    python examples/fixed_point.py [--bits 3 4 6 8] [--epochs 20] [--qat-epochs 6] [--seeds 0 1 2]
                                   [--out examples/out] [--results examples/results]

A small CIFAR-style ResNet (the one from ``examples/bn_only.py``) is trained in float. Then, for each
word length W, ``normfx.fixed_point(model, bits=W, k_hot=2)`` casts weights, biases, activations,
BatchNorm (a fixed-point multiply-add with 2-hot scales) and residual adds to ``ap_fixed<W, I>``:

* ``PTQ``: binary points from ``normfx.calibrate`` on training batches, nothing trained;
* ``QAT``: the same start, then the weights are trained with every binary point fixed where
  calibration put it (the control that separates "training" from "learning the binary point");
* ``QFX``: the same start, then the weights and every binary point are trained (straight-through),
  the binary points in an optimizer group of their own (``normfx.param_groups``, learning rate
  ``--binary-point-lr``; the weights' 1e-3 moved none of them in 6 epochs);
* the same three from a calibration on one batch of ``--few`` training images (scenario (a) of
  issue 25: calibration on few batches).

K-hot scales count their terms two ways (``k_hot_code``): ``csd`` (signed powers of two, normfx's
default) and ``binary`` (ones of the magnitude's binary word, QFX's count). PTQ and QFX run with
each; the table also gives the mean number of terms the deployed BN scales use.

Each seed trains its own float model; the per-seed accuracies go to ``results/fixed_point.json``
(``examples/render.py`` renders the docs table from it). The QFX model at the widest W of the first
seed is exported to ONNX and checked bit for bit in ONNX Runtime (with its ``ap_fixed`` sidecar).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from tqdm import tqdm

import normfx
from _digits import accuracy, load_digits
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


def _qat_and_qfx(q: torch.nn.Module, x_tr, y_tr, x_te, y_te, args, b: int, seed: int,
                 tag: str = "") -> tuple[tuple[float, float], int, int]:
    """QAT (binary points fixed where ``q`` has them) and QFX (trained, ``--binary-point-lr``) from
    ``q``, which is trained in place by QFX; their test accuracies, how many casts' binary points
    QFX moved (per channel, by at least one integer bit) and the largest shift."""
    fixed = copy.deepcopy(q)
    for cast in fixed.modules():
        if isinstance(cast, normfx.nn.FixedPoint) and cast.trainable:
            cast.int_bits.requires_grad_(False)   # the binary point stays where calibration put it
    train(fixed, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"{tag}QAT {b}-bit", seed=seed)
    train(q, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"{tag}QFX {b}-bit", seed=seed,
          binary_point_lr=args.binary_point_lr)
    moves = normfx.binary_point_moves(q)
    return ((accuracy(fixed.eval(), x_te, y_te), accuracy(q.eval(), x_te, y_te)),
            sum(m.moved > 0 for m in moves), max((m.shift for m in moves), key=abs, default=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4, 6, 8])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k-hot", type=int, default=2)
    ap.add_argument("--binary-point-lr", type=float, default=0.01)
    ap.add_argument("--few", type=int, default=16, help="images in the few-batch calibration")
    args = parse(ap)

    x_tr, y_tr, x_te, y_te = load_digits(size=args.size)
    calib = [x_tr[i:i + 256] for i in range(0, len(x_tr), 256)]
    runs, exported = [], None
    for seed in args.seeds:
        torch.manual_seed(seed)
        model = CifarResNet(args.depth)
        train(model, x_tr, y_tr, args.epochs, 3e-3, args.batch, f"float (seed {seed})", seed=seed)
        model.eval()
        run: dict = {"seed": seed, "float": {}, "PTQ": {}, "QAT": {}, "QFX": {}, "QFX_moved": {}, "casts": {},
                     "PTQ_binary": {}, "QFX_binary": {}, "terms_csd": {}, "terms_binary": {},
                     "PTQ_few": {}, "QAT_few": {}, "QFX_few": {}, "QFX_few_moved": {}, "QFX_shift": {}}
        for b in args.bits:
            run["float"][str(b)] = accuracy(model, x_te, y_te)
            q = normfx.fixed_point(model, bits=b, k_hot=args.k_hot).eval()
            normfx.calibrate(q, calib, progress=False)
            run["PTQ"][str(b)] = accuracy(q, x_te, y_te)
            acc, moved, shift = _qat_and_qfx(q, x_tr, y_tr, x_te, y_te, args, b, seed)
            run["QAT"][str(b)], run["QFX"][str(b)] = acc
            run["QFX_moved"][str(b)], run["QFX_shift"][str(b)] = moved, shift
            run["casts"][str(b)] = len(_casts(q))
            run["terms_csd"][str(b)] = _mean_scale_terms(q, "csd")
            if exported is None and b == max(args.bits):
                exported = q
            few = normfx.fixed_point(model, bits=b, k_hot=args.k_hot).eval()
            normfx.calibrate(few, [x_tr[:args.few]], progress=False)   # one small batch
            run["PTQ_few"][str(b)] = accuracy(few, x_te, y_te)
            (run["QAT_few"][str(b)], run["QFX_few"][str(b)]), run["QFX_few_moved"][str(b)], _ = _qat_and_qfx(
                few, x_tr, y_tr, x_te, y_te, args, b, seed, "few-batch ")
            qb = normfx.fixed_point(model, bits=b, k_hot=args.k_hot, k_hot_code="binary").eval()
            normfx.calibrate(qb, calib, progress=False)
            run["PTQ_binary"][str(b)] = accuracy(qb, x_te, y_te)
            train(qb, x_tr, y_tr, args.qat_epochs, 1e-3, args.batch, f"QFX {b}-bit binary", seed=seed,
                  binary_point_lr=args.binary_point_lr)
            run["QFX_binary"][str(b)] = accuracy(qb.eval(), x_te, y_te)
            run["terms_binary"][str(b)] = _mean_scale_terms(qb, "binary")
        runs.append(run)
    config = config_of(args)
    path = record("fixed_point", config, runs, args.results)

    print(f"\nResNet-{args.depth} on digits ({args.size}x{args.size}), test accuracy over seeds {args.seeds}; casts on "
          f"weights, biases, activations, BatchNorm ({args.k_hot}-hot scales) and residual adds ({path})")
    print(f"{'':<10}" + "".join(f"{f'W={b}':>17}" for b in args.bits))
    for k in ("float", "PTQ", "QAT", "QFX", "PTQ_few", "QAT_few", "QFX_few", "PTQ_binary", "QFX_binary"):
        print(f"{k:<10}" + "".join(f"{mean_std([r[k][str(b)] for r in runs]):>17}" for b in args.bits))

    b = max(args.bits)
    report = normfx.export(exported, x_te[:8], args.out / f"fixed_point_{b}bit.onnx", rtol=0.0, atol=0.0)
    print(f"\nexported the {b}-bit QFX model: max abs difference ONNX Runtime vs PyTorch "
          f"{report.outputs[0].max_abs}; QuantizeLinear {report.op_counts.get('QuantizeLinear', 0)}; "
          f"HLS types in {report.fixed_point_json}")


if __name__ == "__main__":
    main()
