"""normfx.directpred and normfx.nn.DirectPred: W from a known correlation matrix, no gradient into W,
explicit steps only, exact resume from a state_dict, deploy as a plain Linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normfx
from normfx.nn import DirectPred
from normfx.nn.directpred import step_all


def _orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("eigs", [[4.0, 1.0, 0.25, 0.0], [2.0, 2.0, 0.5, -0.3], [1.0, 1.0, 1.0, 1.0],
                                  [9.0, -1.0, -1.0, 0.01]], ids=["psd", "repeated_and_negative", "isotropic",
                                                                 "two_negative"])
def test_weight_from_a_known_correlation_matrix(eigs):
    """p = (max(s, 0)/max s)^power + eps on F's eigenvectors; negative eigenvalues give eps only;
    repeated eigenvalues (any basis of their space) give the same W."""
    u = _orthogonal(4)
    s = torch.tensor(eigs, dtype=torch.float64)
    f = u @ torch.diag(s) @ u.T
    for power in (0.5, 1.0):
        p = DirectPred(4, eps=0.01, power=power)
        expected = u @ torch.diag((s.clamp_min(0) / s.max()) ** power + 0.01) @ u.T
        assert torch.allclose(p.predictor(f), expected, atol=1e-10)
    c = DirectPred(4, eps=0.05, mode="directcopy")
    assert torch.allclose(c.predictor(f), f / s.max() + 0.05 * torch.eye(4, dtype=torch.float64), atol=1e-10)


def test_running_correlation_and_freq():
    """F ← ρF + (1 − ρ)E[ffᵀ] per step (the first step takes E[ffᵀ] as it is), W set after steps 1,
    1 + freq, 1 + 2·freq (the authors' ``niter % freq == 0`` with a 0-based count)."""
    p = DirectPred(3, rho=0.3, freq=2).train()
    batches = [torch.randn(16, 3) for _ in range(5)]
    f_ref = None
    for i, b in enumerate(batches):
        p(b[:10])
        p(b[10:])                                   # two forwards in one step: one E over both
        e = (b.double().T @ b.double()) / 16
        f_ref = e if f_ref is None else 0.3 * f_ref + 0.7 * e
        w_before = p.weight.clone()
        p.step()
        assert torch.allclose(p.corr, f_ref, atol=1e-12)
        if i % 2:                                   # steps 2 and 4: not set
            assert torch.equal(p.weight, w_before)
        else:                                       # steps 1, 3, 5
            assert torch.allclose(p.weight.double(), p.predictor(f_ref), atol=1e-6)


def test_eigenvalue_factors_are_floored_as_the_authors_clamp():
    """The authors clamp each factor at 1e-4 after adding ε (``clamp(1e-4)``): with ``eps=0`` the
    null space of F keeps gain 1e-4, not 0."""
    u = _orthogonal(3)
    f = u @ torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)) @ u.T
    w = DirectPred(3, eps=0.0).predictor(f)
    assert torch.allclose(torch.linalg.eigvalsh(w), torch.tensor([1e-4, 0.5, 1.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.eigvalsh(DirectPred(3, eps=0.0, floor=0.0).predictor(f)),
                          torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), atol=1e-7)   # √(round-off)


def test_trainable_predictor_is_trained_by_gradient_between_sets():
    """``trainable=True``: W is a parameter the optimizer moves between two sets (freq=3: set after
    steps 1 and 4), and the set overwrites what the gradient did."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), DirectPred(4, freq=3, trainable=True))
    assert any(p is net[1].weight for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for i in range(4):
        net.train()(torch.randn(8, 6)).square().sum().backward()
        opt.step()
        opt.zero_grad()
        before = net[1].weight.detach().clone()
        step_all(net)
        after = net[1].weight.detach()
        if i in (0, 3):
            assert torch.allclose(after.double(), net[1].predictor(net[1].corr), atol=1e-6)
        else:
            assert torch.equal(after, before)
    assert "trainable=True" in repr(net[1])


def test_no_gradient_reaches_w_and_only_step_moves_anything():
    net = nn.Sequential(nn.Linear(6, 4), DirectPred(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert all(p is not net[1].weight for p in net.parameters())        # W is a buffer, not a parameter
    x = torch.randn(8, 6)
    net.train()
    net(x).square().sum().backward()
    opt.step()
    assert not net[1].weight.requires_grad and torch.equal(net[1].weight, torch.eye(4))
    assert float(net[1].pending_count) == 8 and int(net[1].steps) == 0
    state = {k: v.clone() for k, v in net[1].state_dict().items()}
    net.eval()(x)                                                      # evaluation collects nothing
    torch.fx.symbolic_trace(net)                                       # tracing neither
    normfx.trace(net)
    assert all(torch.equal(state[k], v) for k, v in net[1].state_dict().items())
    assert step_all(net) == 1 and int(net[1].steps) == 1 and not torch.equal(net[1].weight, torch.eye(4))


def test_state_dict_round_trip_mid_training_resumes_exactly():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 4), DirectPred(4, freq=2))
    data = [torch.randn(8, 5) for _ in range(6)]
    for x in data[:3]:
        a.train()(x)
        step_all(a)
    a(data[3])                                         # collected, not stepped: the pending sums are saved too
    b = nn.Sequential(nn.Linear(5, 4), DirectPred(4, freq=2))
    b.load_state_dict(a.state_dict())
    for x in data[4:]:
        step_all(a), step_all(b)
        a(x), b.train()(x)
    step_all(a), step_all(b)
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


class _SimSiam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
        self.predictor = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x):
        z = self.backbone(x)
        return self.predictor(z), z.detach()


def test_pass_swaps_the_named_predictor_deploys_and_exports(tmp_path):
    base = _SimSiam()
    m = normfx.directpred(base, rho=0.5, mode="directcopy")
    assert isinstance(m.predictor, DirectPred) and m.predictor.mode == "directcopy" and m.predictor.dim == 8
    assert isinstance(base.predictor, nn.Sequential)                     # the caller's model untouched
    assert "predictor.0.weight" not in m.state_dict() and "predictor.corr" in m.state_dict()
    m.train()
    for _ in range(3):
        p, z = m(torch.randn(16, 10))
        (-(nn.functional.cosine_similarity(p, z)).mean()).backward()
        step_all(m)
    m.eval()
    d = normfx.deploy(m)
    assert type(d.predictor) is nn.Linear and d.predictor.bias is None
    x = torch.randn(4, 10)
    assert torch.allclose(d(x)[0], m(x)[0], atol=1e-6)
    report = normfx.export(d, x, tmp_path / "m.onnx")
    assert report.outputs[0].max_rel < 1e-5


def test_bad_input():
    with pytest.raises(ValueError, match="has no submodule 'head'"):
        normfx.directpred(_SimSiam(), predictor="head")
    with pytest.raises(ValueError, match="maps 8 features to 3"):
        net = _SimSiam()
        net.predictor = nn.Linear(8, 3)
        normfx.directpred(net)
    with pytest.raises(ValueError, match="pass dim="):
        net = _SimSiam()
        net.predictor = nn.Identity()
        normfx.directpred(net)
    net = _SimSiam()
    net.predictor = nn.Identity()
    assert normfx.directpred(net, dim=8).predictor.dim == 8
    for kwargs, msg in [(dict(mode="copy"), "mode must be"), (dict(rho=1.0), "rho must be"),
                        (dict(freq=0), "freq must be"), (dict(power=0.0), "power > 0")]:
        with pytest.raises(ValueError, match=msg):
            DirectPred(4, **kwargs)
    with pytest.raises(ValueError, match="got features of size 3"):
        DirectPred(4)(torch.randn(2, 3))
