"""normfx.lab's corrupted modular-arithmetic tools (Doshi et al.): the data, IPR, pruning, and a short
seeded run of the BatchNorm model that learns the rule before the corrupted labels."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normfx
from normfx.lab import ipr, modular_arithmetic, neuron_ipr, neuron_stats, prune_by_ipr


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
@pytest.mark.parametrize("xi", [0.0, 0.1, 0.35])
def test_data_corruption_is_exact_and_the_test_split_clean(op, xi):
    p = 13
    d = modular_arithmetic(p=p, op=op, train_fraction=0.4, corruption=xi, seed=3)
    n = d.x_train.shape[0]
    assert n == round(0.4 * p * p) and n + d.x_test.shape[0] == p * p
    assert int(d.corrupted.sum()) == round(xi * n)
    assert (d.y_train[d.corrupted] != d.clean_train[d.corrupted]).all()
    assert torch.equal(d.y_train[~d.corrupted], d.clean_train[~d.corrupted])
    a, b = d.train_pairs.T
    truth = {"add": (a + b) % p, "sub": (a - b) % p, "mul": (a * b) % p}[op]
    assert torch.equal(d.clean_train, truth)
    ta, tb = d.test_pairs.T
    assert torch.equal(d.y_test, {"add": (ta + tb) % p, "sub": (ta - tb) % p, "mul": (ta * tb) % p}[op])
    train_set = {tuple(x) for x in d.train_pairs.tolist()}
    assert not train_set & {tuple(x) for x in d.test_pairs.tolist()}
    assert (d.x_train.sum(1) == 2).all() and torch.equal(d.x_train[:, :p].argmax(1), a)
    again = modular_arithmetic(p=p, op=op, train_fraction=0.4, corruption=xi, seed=3)
    assert torch.equal(again.y_train, d.y_train)


def test_corrupted_labels_cover_the_wrong_classes():
    d = modular_arithmetic(p=7, train_fraction=0.9, corruption=1.0, seed=0)
    wrong = (d.y_train - d.clean_train) % 7
    assert set(wrong.tolist()) == set(range(1, 7))


def test_ipr_of_a_sinusoid_and_of_noise():
    n = torch.arange(97.0)
    waves = torch.stack([torch.cos(2 * math.pi * k * n / 97 + 0.3 * k) for k in (1, 5, 30)])
    assert torch.allclose(ipr(waves), torch.ones(3), atol=1e-6)
    noise = torch.randn(2000, 97, generator=torch.Generator().manual_seed(0))
    length = 97 // 2 + 1
    mean = float(ipr(noise).mean())
    assert 1.0 / length < mean < 3.0 / length          # ≈ 2/len for Gaussian noise
    assert float(ipr(torch.zeros(1, 97))[0]) == 0.0
    two = torch.cos(2 * math.pi * 3 * n / 97) + torch.cos(2 * math.pi * 7 * n / 97)
    assert abs(float(ipr(two[None])[0]) - 0.5) < 1e-6   # two equal frequencies: 2 × (1/2)²


def _mlp(p: int, width: int, bn: bool) -> nn.Module:
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(2 * p, width, bias=False)
            self.bn = nn.BatchNorm1d(width) if bn else nn.Identity()
            self.readout = nn.Linear(width, p, bias=False)

        def forward(self, x):
            return self.readout(self.bn(self.embed(x) ** 2))

    return MLP()


def test_prune_zeroes_exactly_the_chosen_neurons():
    torch.manual_seed(0)
    m = _mlp(11, 40, bn=True)
    scores = neuron_ipr(m, "embed")["mean"]
    pruned, idx = prune_by_ipr(m, "embed", 0.25, order="lowest")
    assert idx.numel() == 10 and torch.equal(idx, scores.argsort()[:10].sort().values)
    keep = torch.ones(40, dtype=torch.bool)
    keep[idx] = False
    assert (pruned.embed.weight[idx] == 0).all() and (pruned.readout.weight[:, idx] == 0).all()
    assert torch.equal(pruned.embed.weight[keep], m.embed.weight[keep])
    assert torch.equal(pruned.readout.weight[:, keep], m.readout.weight[:, keep])
    assert not (m.embed.weight[idx] == 0).all()                       # the original is untouched
    _, high = prune_by_ipr(m, "embed", 0.25, order="highest")
    assert torch.equal(high, scores.argsort(descending=True)[:10].sort().values)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        prune_by_ipr(m, "bn", 0.1)
    with pytest.raises(ValueError, match="fraction"):
        prune_by_ipr(m, "embed", 1.5)
    s = neuron_stats(m, "embed", "bn")
    assert s.ipr.shape == s.abs_gamma.shape == (40,)


@pytest.mark.slow
def test_bn_model_learns_the_rule_and_unlearns_the_corrupted_labels():
    """A short seeded run of the paper's BatchNorm model (p = 97, x² activation, MSE on one-hot
    targets, AdamW, no weight decay): the clean training examples and the test split reach (near)
    100% while the corrupted labels, which can only be memorized, fall well below."""
    p = 97
    d = modular_arithmetic(p=p, train_fraction=0.5, corruption=0.3, seed=0)
    torch.manual_seed(0)
    m = _mlp(p, 256, bn=True)
    with torch.no_grad():
        for lin in (m.embed, m.readout):
            lin.weight.normal_(0, 0.5 / (2 * 256) ** (1 / 3))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2 * math.sqrt(64 / 256), betas=(0.9, 0.98), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    target = F.one_hot(d.y_train, p).float()
    for _ in range(2000):
        idx = torch.randint(0, len(d.y_train), (64,), generator=g)
        loss = F.mse_loss(m.train()(d.x_train[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = m.eval()(d.x_train).argmax(1)
        clean = (pred[~d.corrupted] == d.y_train[~d.corrupted]).float().mean()
        memorized = (pred[d.corrupted] == d.y_train[d.corrupted]).float().mean()
        test = (m(d.x_test).argmax(1) == d.y_test).float().mean()
    assert clean > 0.95 and test > 0.9, (float(clean), float(test))
    assert memorized < clean - 0.4, (float(clean), float(memorized))


def test_bad_input():
    for kwargs, msg in [(dict(p=1), "p must be"), (dict(op="div"), "op must be"),
                        (dict(train_fraction=1.0), "train_fraction"), (dict(corruption=-0.1), "corruption")]:
        with pytest.raises(ValueError, match=msg):
            modular_arithmetic(**kwargs)
    assert normfx.lab.ipr is ipr
