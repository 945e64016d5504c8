"""Fine-tune a torchvision ResNet-18 in Tune mode on generated data, then deploy it.

    python examples/convbn_finetune.py [--steps 60] [--arch resnet18]

Tune mode trains with Eval mode's gradients (BatchNorm statistics frozen, as in transfer learning)
while keeping only what Deploy mode keeps for backward. At the end the Tune model is folded into a
plain conv network (Deploy mode) and checked against the Tune model in eval mode.
"""
from __future__ import annotations

import argparse
import copy
import logging

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import normfx


def make_data(n: int, size: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose class is the quadrant holding a bright square."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = 0.5 * torch.randn(n, 3, size, size, generator=g)
    half = size // 2
    for i, k in enumerate(y.tolist()):
        r, c = divmod(k % 4, 2)
        x[i, k % 3, r * half + 2:(r + 1) * half - 2, c * half + 2:(c + 1) * half - 2] += 1.5
    return x, y


def saved_mib(model: torch.nn.Module, x: torch.Tensor) -> float:
    """MiB autograd keeps for backward, the model's own parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18", help="a torchvision classification model")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.003)
    ap.add_argument("--verbose", action="store_true", help="log every step's losses")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    torch.manual_seed(0)

    # A "pretrained" backbone: random weights here, BN statistics estimated on generated data.
    model = getattr(torchvision.models, args.arch)(num_classes=4)
    x_train, y_train = make_data(2048, args.size, 4, seed=0)
    x_test, y_test = make_data(512, args.size, 4, seed=1)
    with torch.no_grad():
        model.train()
        model(x_train[:256])
    model.eval()  # transfer learning: BatchNorm statistics stay frozen

    tune = normfx.convbn(model, mode="tune")  # the caller's `model` is left as it was
    xb = x_train[: args.batch]
    print(f"kept for backward, batch {args.batch}: Eval {saved_mib(model, xb):.1f} MiB, "
          f"Tune {saved_mib(tune, xb):.1f} MiB")

    # The same fine-tuning, in lockstep, of the original in Eval mode and of the Tune model.
    eval_copy = copy.deepcopy(model)
    nets = {"Eval": eval_copy, "Tune": tune}
    opts = {k: torch.optim.SGD(n.parameters(), lr=args.lr, momentum=0.9) for k, n in nets.items()}
    tp = dict(tune.named_parameters())

    def drift() -> float:
        return max(((p - tp[n]).norm() / p.norm()).item() for n, p in eval_copy.named_parameters())

    bar = tqdm(range(args.steps), desc="fine-tuning Eval and Tune", mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, len(x_train), (args.batch,))
        losses = {}
        for k, net in nets.items():
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            losses[k] = loss.item()
        bar.set_postfix(eval=f"{losses['Eval']:.3f}", tune=f"{losses['Tune']:.3f}")
        logging.getLogger("example").debug("step %d losses %s", step, losses)
        if step == 0:
            first = drift()
    print(f"weights, Tune vs Eval (max relative difference): {first:.1e} after one step, "
          f"{drift():.1e} after {args.steps} (float32 rounding differences compound over training)")

    deployed = normfx.convbn(tune, mode="deploy")
    with torch.no_grad():
        a, b = tune(x_test), deployed(x_test)
        err = ((a - b).norm() / b.norm()).item()
        acc = (b.argmax(1) == y_test).float().mean().item()
        acc_eval = (eval_copy(x_test).argmax(1) == y_test).float().mean().item()
    bn_left = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    print(f"test accuracy: Deploy (from Tune) {acc:.3f}, Eval-mode run {acc_eval:.3f} (chance 0.25); "
          f"Deploy vs Tune relative error {err:.2e}; "
          f"BatchNorm modules left: {bn_left}")


if __name__ == "__main__":
    main()
