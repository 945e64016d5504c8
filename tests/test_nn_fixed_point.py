"""The FixedPoint cast (QFX): every ap_fixed rounding and overflow mode against an integer reference,
the straight-through gradients of the binary point, calibration, and K-hot (CSD) projection."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normfx.functional import (
    OVERFLOW,
    ROUNDING,
    csd_terms,
    fixed_point_cast,
    integer_range,
    k_hot_project,
    k_hot_table,
)
from normfx.nn.fixed_point import FixedPoint


def ref_cast(x: float, bits: int, int_bits: int, signed: bool, rounding: str, overflow: str) -> float:
    """ap_fixed<bits, int_bits, Q, O>(x) in exact rational/integer arithmetic."""
    f = bits - int_bits
    v = Fraction(x) * Fraction(2) ** f
    fl = math.floor(v)
    d = v - fl
    if rounding == "floor":
        m = fl
    elif rounding == "trunc":
        m = math.trunc(v)
    elif d != Fraction(1, 2):
        m = fl + (1 if d > Fraction(1, 2) else 0)
    else:
        m = fl + {"nearest_even": fl % 2, "half_up": 1, "half_down": 0, "half_zero": int(v < 0),
                  "half_away": int(v > 0)}[rounding]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    if overflow == "saturate":
        m = min(max(m, lo), hi)
    elif overflow == "saturate_sym":
        m = min(max(m, -hi if signed else 0), hi)
    elif overflow == "saturate_zero":
        m = 0 if (m < lo or m > hi) else m
    else:
        m = (m - lo) % (2 ** bits) + lo
    return float(Fraction(m) / Fraction(2) ** f)


def _crafted(bits: int, int_bits: int, signed: bool) -> list[float]:
    """Ties (k + 1/2 LSB) of both parities and signs, exact values, and every overflow boundary."""
    lsb = 2.0 ** -(bits - int_bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    ks = [0, 1, 2, 3, -1, -2, -3, lo, hi, lo - 1, hi + 1, lo + 1, hi - 1, 2 * hi + 5, 2 * lo - 5]
    vals = []
    for k in ks:
        for frac in (0.0, 0.5, 0.25, 0.75, -0.5, 0.5 - 2 ** -12, 0.5 + 2 ** -12):
            vals.append((k + frac) * lsb)
    return vals


MODES = [(r, o) for r in ROUNDING for o in OVERFLOW]


@pytest.mark.parametrize("rounding,overflow", MODES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits,int_bits", [(8, 3), (4, 1), (6, -2), (5, 7), (16, 8)])
def test_every_mode_matches_the_integer_reference(rounding, overflow, signed, bits, int_bits):
    xs = _crafted(bits, int_bits, signed)
    got = fixed_point_cast(torch.tensor(xs, dtype=torch.float64), bits, int_bits, signed=signed,
                           rounding=rounding, overflow=overflow)
    want = [ref_cast(x, bits, int_bits, signed, rounding, overflow) for x in xs]
    assert got.tolist() == want
    # float32 gives the same numbers (the scaling is by a power of two)
    got32 = fixed_point_cast(torch.tensor(xs, dtype=torch.float32), bits, int_bits, signed=signed,
                             rounding=rounding, overflow=overflow)
    want32 = [ref_cast(float(torch.tensor(x, dtype=torch.float32)), bits, int_bits, signed, rounding, overflow)
              for x in xs]
    assert got32.tolist() == want32


def test_hls_names_are_accepted_and_ties_differ_by_mode():
    x = torch.tensor([2.5, -2.5, 3.5, -3.5])
    cast = {r: fixed_point_cast(x, 8, 8, rounding=hls).tolist() for r, hls in ROUNDING.items()}
    assert cast["nearest_even"] == [2.0, -2.0, 4.0, -4.0]
    assert cast["half_up"] == [3.0, -2.0, 4.0, -3.0]
    assert cast["half_down"] == [2.0, -3.0, 3.0, -4.0]
    assert cast["half_zero"] == [2.0, -2.0, 3.0, -3.0]
    assert cast["half_away"] == [3.0, -3.0, 4.0, -4.0]
    assert cast["floor"] == [2.0, -3.0, 3.0, -4.0]
    assert cast["trunc"] == [2.0, -2.0, 3.0, -3.0]
    with pytest.raises(ValueError, match="unknown rounding mode 'AP_RND_ODD'"):
        fixed_point_cast(x, 8, 8, rounding="AP_RND_ODD")


# Subnormal float32 inputs are left out: x·2^F underflows to ±0 before rounding, so a truncating
# mode gives 0 where exact arithmetic gives -1 LSB (x = -1.4e-45, floor). Normal inputs are exact.
@settings(max_examples=300, deadline=None)
@given(x=st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32), bits=st.integers(2, 16),
       int_bits=st.integers(-4, 20),
       signed=st.booleans(), mode=st.sampled_from(MODES))
def test_random_values_match_the_reference(x, bits, int_bits, signed, mode):
    rounding, overflow = mode
    got = fixed_point_cast(torch.tensor([x]), bits, int_bits, signed=signed, rounding=rounding, overflow=overflow)
    assert got.item() == ref_cast(x, bits, int_bits, signed, rounding, overflow)


# --- the FixedPoint module ---------------------------------------------------------------------

@pytest.mark.parametrize("rounding,overflow", MODES)
def test_module_forward_equals_the_cast(rounding, overflow):
    q = FixedPoint(6, None, rounding=rounding, overflow=overflow, init_int_bits=2.4)  # rounds to I = 2
    x = torch.linspace(-5, 5, 1001)
    assert torch.equal(q(x), fixed_point_cast(x, 6, 2, rounding=rounding, overflow=overflow))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 5, 8, 16, 22, 23, 24])
@pytest.mark.parametrize("signed,overflow", [(True, "saturate"), (True, "saturate_sym"), (False, "saturate")])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("scalar_step", [True, False])
def test_module_forward_is_exact_on_ties_and_far_out_of_range(dtype, bits, signed, overflow, grad, scalar_step,
                                                              monkeypatch):
    """The module's forward (including its shortcut for round-to-nearest-even) against the
    reference cast: every tie, the range edges, values far beyond the word (up to ±inf)."""
    if not scalar_step:
        monkeypatch.setattr("normfx.nn.fixed_point._SCALAR_STEP_DEVICES", set())
    i = 3
    s = 2.0 ** (i - bits)
    k = torch.arange(-(2 ** min(bits, 12)) - 3, 2 ** min(bits, 12) + 3, dtype=torch.float64)
    edges = torch.tensor([2.0 ** (bits - 1), 2.0 ** bits, 2.0 ** 22, 2.0 ** 23, 2.0 ** 30, 1e30], dtype=torch.float64)
    v = torch.cat([k, k + 0.5, k + 0.25, k - 0.5, edges, -edges, edges - 0.5, -edges + 0.5, -edges - 0.5])
    x = (v * s).to(dtype)
    q = FixedPoint(bits, None, signed=signed, overflow=overflow, init_int_bits=i)
    got = q(x.clone().requires_grad_(grad)).detach()
    assert torch.equal(got, fixed_point_cast(x, bits, i, signed=signed, overflow=overflow))
    lo, hi = integer_range(bits, signed)
    lo = -hi if overflow == "saturate_sym" and signed else lo
    inf = q(torch.tensor([float("inf"), -float("inf")], dtype=dtype, requires_grad=grad)).detach()
    assert inf.tolist() == [hi * s, lo * s]                         # infinities saturate


def _int_bits_grad(q: FixedPoint, x: torch.Tensor) -> float:
    q.zero_grad()
    ((q(x) - x) ** 2).sum().backward()
    return float(q.int_bits.grad)


def test_binary_point_moves_toward_less_clipping_when_clipping_dominates():
    x = torch.randn(4096) * 8            # |x| up to ~30
    q = FixedPoint(8, None, init_int_bits=2)   # range [-2, 2): heavy clipping
    assert _int_bits_grad(q, x) < 0      # gradient descent raises I
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    for _ in range(200):
        opt.zero_grad()
        ((q(x) - x) ** 2).mean().backward()
        opt.step()
    assert int(q.integer_bits()) >= 5


def test_binary_point_moves_toward_more_fraction_bits_when_rounding_dominates():
    x = torch.randn(4096) * 0.01         # tiny values
    q = FixedPoint(8, None, init_int_bits=6)   # LSB 2^-2: everything rounds to 0 or ±0.25
    assert _int_bits_grad(q, x) > 0      # gradient descent lowers I (more fraction bits)


def test_input_gradient_is_straight_through_in_range_and_zero_when_clipped():
    q = FixedPoint(4, 2)  # range [-2, 1.75], fixed binary point
    x = torch.tensor([-3.0, -1.3, 0.2, 1.7, 2.5], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert not q.trainable and "int_bits" in dict(q.named_buffers())


def test_per_channel_and_calibration():
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.1, 1.0, 30.0]).view(1, 3, 1, 1)
    q = FixedPoint(8, None, channels=3, axis=1)
    q.observing = True
    assert torch.equal(q(x), x)          # observing returns x unchanged
    q.calibrate_from_observed()
    ib = q.integer_bits().tolist()
    assert ib[0] < ib[1] < ib[2]
    y = q(x)
    for c in range(3):                   # nothing clips, and one more fraction bit would clip
        mx = x[:, c].abs().max()
        assert mx < 2 ** (ib[c] - 1) <= 2 * mx
    assert (y - x).abs().amax() <= 2 ** (max(ib) - 8)
    assert q.hls_type(2) == f"ap_fixed<8, {int(ib[2])}, AP_RND_CONV, AP_SAT>"


# --- K-hot ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_hot_projection_is_the_nearest_csd_value(k):
    exps = range(-6, 3)
    table = k_hot_table(k, exps)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(300, generator=g, dtype=torch.float64) * 2
    got = k_hot_project(x, table)
    want = [csd_terms(float(v), k, exps) for v in x]
    assert got.tolist() == want
    # every projected value really has at most k non-zero signed-power-of-two terms
    assert set(got.tolist()) <= set(table.tolist())



def _reference_ste(x, int_bits, bits, axis, rounding, overflow, signed=True):
    """The straight-through cast written with plain autograd ops (what the fused Function computes)."""
    from normfx.functional import integer_range, overflow_fixed, round_fixed

    ib = int_bits + (torch.round(int_bits) - int_bits).detach()
    shape = [1] * x.dim()
    shape[axis] = -1
    step = torch.exp2((ib.reshape(shape) if ib.numel() > 1 else ib.reshape(())) - bits)
    v = x / step
    with torch.no_grad():
        m = round_fixed(v, rounding)
        lo, hi = integer_range(bits, signed)
        lo = -hi if overflow == "saturate_sym" and signed else lo
        inside = (m >= lo) & (m <= hi)
        out_m, sat_m = overflow_fixed(m, bits, signed, overflow), m.clamp(lo, hi)
    ste_in = (v + (m - v).detach()) * step
    ste_out = out_m * step.detach() + (sat_m * step - (sat_m * step).detach())
    return torch.where(inside, ste_in, ste_out)


@pytest.mark.parametrize("rounding,overflow", [("nearest_even", "saturate"), ("floor", "wrap"),
                                               ("half_away", "saturate_zero"), ("trunc", "saturate_sym")])
@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("scalar_step", [True, False])
def test_fused_gradients_equal_the_plain_autograd_formulation(rounding, overflow, channels, signed, scalar_step,
                                                              monkeypatch):
    if not scalar_step:   # the path accelerators take: the step stays a tensor
        monkeypatch.setattr("normfx.nn.fixed_point._SCALAR_STEP_DEVICES", set())
    x = (torch.randn(3, 4, 5, 5) * 3).requires_grad_()
    q = FixedPoint(5, None, rounding=rounding, overflow=overflow, channels=channels, axis=1, init_int_bits=1.6,
                   signed=signed)
    w = torch.randn(3, 4, 5, 5)
    (q(x) * w).sum().backward()
    gx, gi = x.grad.clone(), q.int_bits.grad.clone()
    x.grad = None
    ib = q.int_bits.detach().clone().requires_grad_()
    (_reference_ste(x, ib, 5, 1, rounding, overflow, signed) * w).sum().backward()
    assert torch.equal(gx, x.grad)
    assert torch.allclose(gi, ib.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("overflow", ["saturate", "saturate_sym", "saturate_zero", "wrap"])
@pytest.mark.parametrize("rounding", ["nearest_even", "floor", "half_away"])
@pytest.mark.parametrize("channels", [1, 3])
def test_traceable_cast_gives_the_eager_values_and_gradients(signed, overflow, rounding, channels):
    """torch.compile and torch.export run the cast as plain tensor ops (``_traceable_cast``); it must
    give the custom autograd node's values and gradients bit for bit (the binary point's: one sum,
    to summation order), bounds and wrap-around included."""
    from normfx.nn.fixed_point import _FixedPointSTE, _traceable_cast

    torch.manual_seed(0)
    q = FixedPoint(6, None, signed=signed, rounding=rounding, overflow=overflow, channels=channels, axis=1,
                   init_int_bits=1.0)
    with torch.no_grad():
        q.int_bits.copy_(torch.tensor([1.2, 0.6, 2.4][:channels]))
    x = (torch.randn(64, channels, 5) * 2).requires_grad_()
    g = torch.randn(64, channels, 5)
    lo, hi = q._range()
    args = (lo, hi, q.bits, q.signed, q.rounding, q.overflow, 1)
    eager = _FixedPointSTE.apply(x, q.int_bits, *args)
    traced = _traceable_cast(x, q.int_bits, *args)
    assert torch.equal(eager, traced)
    gx_e, gi_e = torch.autograd.grad(eager, (x, q.int_bits), g)
    gx_t, gi_t = torch.autograd.grad(traced, (x, q.int_bits), g)
    assert torch.equal(gx_e, gx_t)
    assert torch.allclose(gi_e, gi_t, rtol=1e-5, atol=1e-5)
