"""Pure tensor math, no graph: the BatchNorm folds.

With ``c = γ / sqrt(σ̂² + ε)`` (You et al., eq. 2):

* BN after a conv/linear: ``ω' = ω·c`` per output channel, ``b' = (b − μ̂)·c + β``.
* BN before a conv/linear (``a = c``, ``t = β − μ̂·c``): ``ω' = ω·a`` per *input* channel and
  ``b' = b + Σ ω·t`` — exact only when the conv pads with something the affine commutes with.

The folds are computed in float64 and cast back to the weight's dtype, so a bf16/fp16 model keeps
its dtype and loses nothing to the fold itself.
"""
from __future__ import annotations

import itertools
from typing import Literal, NamedTuple

import torch

__all__ = [
    "bn_scale_shift", "fold_bn_after", "fold_bn_before", "scale_is_safe", "out_channel_view",
    "ROUNDING", "OVERFLOW", "Rounding", "Overflow", "fixed_mode", "integer_range", "round_fixed", "overflow_fixed",
    "fixed_point_cast",
    "k_hot_table", "k_hot_project", "k_hot_terms", "KHotCode", "K_HOT_CODES",
]


class BNStats(NamedTuple):
    """The four tensors and eps that define an eval-mode BatchNorm; γ/β may be None (affine=False)."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def bn_scale_shift(bn: BNStats, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, t)`` with ``BN(x) = c·x + t`` per channel, in ``dtype``."""
    var = bn.var.detach().to(dtype)
    mean = bn.mean.detach().to(dtype)
    c = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        c = c * bn.weight.detach().to(dtype)
    t = -mean * c
    if bn.bias is not None:
        t = t + bn.bias.detach().to(dtype)
    return c, t


def scale_is_safe(c: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether folding scale ``c`` into ``weight`` stays finite in ``weight.dtype``."""
    if not torch.isfinite(c).all():
        bad = (~torch.isfinite(c)).nonzero().flatten()[:5].tolist()
        return False, f"γ/sqrt(σ²+ε) is not finite at channels {bad}"
    limit = torch.finfo(weight.dtype).max
    if weight.numel():
        lo, hi = torch.aminmax(weight.detach())
        wmax = max(abs(float(lo)), abs(float(hi)))
    else:
        wmax = 0.0
    if float(c.abs().amax()) * wmax > limit:
        return False, f"folded weights would overflow {weight.dtype} (max {limit:.3g})"
    return True, ""


def out_channel_view(c: torch.Tensor, weight: torch.Tensor, transposed: bool = False, groups: int = 1) -> torch.Tensor:
    """Reshape per-output-channel ``c`` to broadcast against a conv/linear ``weight``."""
    k = weight.dim() - 2
    if not transposed:
        return c.reshape([-1] + [1] * (weight.dim() - 1))
    # ConvTranspose weight: [in, out/groups, *k]; output channel o = g*(out/groups) + j.
    in_ch = weight.shape[0]
    return c.reshape(groups, 1, -1, *([1] * k)).expand(groups, in_ch // groups, -1, *([1] * k)).reshape(
        in_ch, -1, *([1] * k)
    )


def fold_bn_after(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: BNStats | None,
    *,
    transposed: bool = False,
    groups: int = 1,
    scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``BN(conv(x))`` into one conv: returns ``(ω', b')`` in the weight's dtype.

    ``weight`` is a Conv/ConvTranspose/Linear weight (Linear: ``[out, in]``). ``scale_shift`` is
    ``bn_scale_shift(bn)`` when the caller has it already.
    """
    if scale_shift is None and bn is None:
        raise ValueError("fold needs the BatchNorm statistics or its (scale, shift)")
    c, t = scale_shift if scale_shift is not None else bn_scale_shift(bn)  # type: ignore[arg-type]
    w = weight.detach()
    if transposed:
        folded = w.to(torch.float64, copy=True).mul_(out_channel_view(c, w, transposed, groups)).to(w.dtype)
    else:
        folded = _scale_rows(w, c)
    b = t if bias is None else bias.detach().to(torch.float64) * c + t
    return folded, b.to(weight.dtype)


def _scale_rows(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``w[o] * c[o]`` computed in float64, in cache-sized blocks of rows through one reused float64
    buffer (a float64 copy of the whole weight, or a fresh one per block, costs more in memory
    traffic and page faults than the multiply itself)."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    flat, dst, cc = w.reshape(w.shape[0], -1), out.view(w.shape[0], -1), c.reshape(-1, 1)
    rows, cols = flat.shape
    step = max(1, 131072 // max(1, cols))
    buf = torch.empty(min(step, rows), cols, dtype=torch.float64)
    for i in range(0, rows, step):
        n = min(step, rows - i)
        b = buf[:n]
        b.copy_(flat[i:i + n]).mul_(cc[i:i + n])
        dst[i:i + n].copy_(b)
    return out


def fold_bn_before(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: BNStats | None, *, groups: int = 1,
    scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``conv(BN(x))`` into one conv (non-transposed conv or linear): ``(ω', b')``.

    Only exact when the conv's padding commutes with the affine (no zero padding); the caller checks.
    Any per-input-channel affine ``a·x + t`` folds the same way: pass ``scale_shift=(a, t)``.
    """
    if scale_shift is None and bn is None:
        raise ValueError("fold needs the BatchNorm statistics or its (scale, shift)")
    a, t = scale_shift if scale_shift is not None else bn_scale_shift(bn)  # type: ignore[arg-type]
    w64 = weight.detach().to(torch.float64)
    out_ch, in_per_group = w64.shape[0], w64.shape[1]
    # Input channel of weight[o, i] is (o // (out/groups)) * in_per_group + i.
    a_g = a.reshape(groups, 1, in_per_group)
    t_g = t.reshape(groups, 1, in_per_group)
    wg = w64.reshape(groups, out_ch // groups, in_per_group, -1)
    w = (wg * a_g.unsqueeze(-1)).reshape(w64.shape)
    shift = (wg.sum(-1) * t_g).sum(-1).reshape(out_ch)
    b = shift if bias is None else bias.detach().to(torch.float64) + shift
    return w.to(weight.dtype), b.to(weight.dtype)


# --- fixed point (Vitis HLS ap_fixed<W, I, Q, O>) -------------------------------------------------

#: Rounding modes: normfx name -> Vitis HLS name. Each rounds ``v = x·2^F`` to an integer.
ROUNDING = {
    "nearest_even": "AP_RND_CONV",   # ties to even (convergent)
    "half_up": "AP_RND",             # ties toward +inf
    "half_zero": "AP_RND_ZERO",      # ties toward zero
    "half_down": "AP_RND_MIN_INF",   # ties toward -inf
    "half_away": "AP_RND_INF",       # ties away from zero
    "floor": "AP_TRN",               # truncate toward -inf (HLS's default)
    "trunc": "AP_TRN_ZERO",          # truncate toward zero
}
#: Overflow modes: normfx name -> Vitis HLS name.
OVERFLOW = {
    "saturate": "AP_SAT",            # clamp to [min, max]
    "saturate_zero": "AP_SAT_ZERO",  # an overflowing value becomes 0
    "saturate_sym": "AP_SAT_SYM",    # clamp to [-max, max] (signed; unsigned: as AP_SAT)
    "wrap": "AP_WRAP",               # two's complement wrap-around (HLS's default)
}
_ALIASES = {**{v: k for k, v in ROUNDING.items()}, **{v: k for k, v in OVERFLOW.items()}}

Rounding = Literal["nearest_even", "half_up", "half_zero", "half_down", "half_away", "floor", "trunc",
                   "AP_RND_CONV", "AP_RND", "AP_RND_ZERO", "AP_RND_MIN_INF", "AP_RND_INF", "AP_TRN", "AP_TRN_ZERO"]
"""A rounding mode, by normfx or Vitis HLS name (``ROUNDING``)."""
Overflow = Literal["saturate", "saturate_zero", "saturate_sym", "wrap", "AP_SAT", "AP_SAT_ZERO", "AP_SAT_SYM",
                   "AP_WRAP"]
"""An overflow mode, by normfx or Vitis HLS name (``OVERFLOW``)."""


def fixed_mode(name: str, kind: str) -> str:
    """Normalize a rounding/overflow mode given by normfx or HLS name (``"AP_RND_CONV"``)."""
    table = ROUNDING if kind == "rounding" else OVERFLOW
    key = _ALIASES.get(name.upper(), name) if isinstance(name, str) else name
    if key not in table:
        names = [f"{k} ({v})" for k, v in table.items()]
        raise ValueError(f"unknown {kind} mode {name!r}; use one of {names}")
    return key


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(min, max)`` of the ``bits``-wide integer behind ``ap_fixed``/``ap_ufixed``."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def round_fixed(v: torch.Tensor, rounding: str) -> torch.Tensor:
    """Round ``v`` to integers (as floats) by ``rounding``; exact for every finite float.

    Ties are decided on ``d = v − floor(v)`` (exact in binary floating point), never on ``v + 0.5``,
    which rounds itself once ``|v|`` nears the mantissa's width.
    """
    rounding = fixed_mode(rounding, "rounding")
    if rounding == "floor":
        return torch.floor(v)
    if rounding == "trunc":
        return torch.trunc(v)
    fl = torch.floor(v)
    d = v - fl
    up = (d > 0.5).to(v.dtype)
    tie = (d == 0.5).to(v.dtype)
    if rounding == "nearest_even":
        tie_up = torch.remainder(fl, 2)          # 1 where floor is odd: round up to the even one
    elif rounding == "half_up":
        tie_up = torch.ones_like(v)
    elif rounding == "half_down":
        tie_up = torch.zeros_like(v)
    elif rounding == "half_zero":
        tie_up = (v < 0).to(v.dtype)
    else:  # half_away
        tie_up = (v > 0).to(v.dtype)
    return fl + up + tie * tie_up


def overflow_fixed(m: torch.Tensor, bits: int, signed: bool, overflow: str) -> torch.Tensor:
    """Bring integers ``m`` (as floats) into the ``bits``-wide range by ``overflow``."""
    overflow = fixed_mode(overflow, "overflow")
    lo, hi = integer_range(bits, signed)
    if overflow == "saturate":
        return m.clamp(lo, hi)
    if overflow == "saturate_sym":
        return m.clamp(-hi if signed else 0, hi)
    if overflow == "saturate_zero":
        return torch.where((m < lo) | (m > hi), torch.zeros_like(m), m)
    span = float(1 << bits)
    return torch.remainder(m - lo, span) + lo  # wrap


def fixed_point_cast(x: torch.Tensor, bits: int, int_bits: torch.Tensor | float, *, signed: bool = True,
                     rounding: str = "nearest_even", overflow: str = "saturate") -> torch.Tensor:
    """``ap_fixed<bits, int_bits, Q, O>`` applied to ``x`` (no gradient logic; see ``nn.FixedPoint``).

    ``x̂ = O(Q(x·2^F))·2^−F`` with ``F = bits − int_bits`` (``int_bits`` counts the sign bit of a
    signed type, as HLS does, and may be a tensor broadcasting against ``x``: per channel). Exact in
    float32 for ``bits ≤ 24`` and in float64 for ``bits ≤ 53``: the scaling is by powers of two.
    """
    limit = 24 if x.dtype in (torch.float32,) else 53 if x.dtype == torch.float64 else 11
    if not 1 <= bits <= limit:
        raise ValueError(f"bits={bits} cannot be represented exactly in {x.dtype} (at most {limit})")
    f = bits - (int_bits if isinstance(int_bits, torch.Tensor) else torch.tensor(float(int_bits)))
    scale = torch.exp2(f.to(x.dtype))
    m = overflow_fixed(round_fixed(x * scale, rounding), bits, signed, overflow)
    return m / scale


def csd_terms(value: float, k: int, exponents: range) -> float:
    """The value nearest ``value`` that is a sum of at most ``k`` signed powers of two ``±2^e``,
    ``e`` in ``exponents`` (ties: the one of smaller magnitude). Reference implementation for tests."""
    cands = {0.0}
    for _ in range(k):
        cands |= {c + s * 2.0 ** e for c in cands for e in exponents for s in (1, -1)}
    return min(cands, key=lambda c: (abs(c - value), abs(c)))


KHotCode = Literal["csd", "binary"]
"""How a K-hot value counts its terms: ``"csd"`` — at most K signed powers of two ``±2^e`` (canonical
signed digit; a shift-and-add/subtract multiplier); ``"binary"`` — at most K ones in the binary word
of its magnitude, the sign applied separately (QFX's count; a shift-and-add multiplier)."""

K_HOT_CODES: tuple[str, ...] = ("csd", "binary")


def k_hot_table(k: int, exponents: range, dtype: torch.dtype = torch.float64, code: KHotCode = "csd") -> torch.Tensor:
    """Every value with at most ``k`` terms ``2^e``, ``e`` in ``exponents``, sorted.

    ``code="csd"``: terms are signed (``±2^e``, mixed signs allowed); ``code="binary"``: the terms are
    distinct powers of two of one sign (at most ``k`` ones in the magnitude's binary word). Every
    binary value is a CSD value; CSD reaches more (``7 = 8 − 1`` is 2-hot in CSD, 3-hot in binary).
    """
    if code == "binary":
        mags = [sum(2.0 ** e for e in c) for r in range(k + 1) for c in itertools.combinations(exponents, r)]
        m = torch.tensor(mags, dtype=torch.float64)
        return (torch.unique(torch.cat([m, -m])) + 0.0).to(dtype)   # + 0.0: no negative zero
    if code != "csd":
        raise ValueError(f"unknown K-hot code {code!r}; use one of {K_HOT_CODES}")
    vals = torch.zeros(1, dtype=torch.float64)
    terms = torch.tensor([s * 2.0 ** e for e in exponents for s in (1, -1)], dtype=torch.float64)
    for _ in range(k):
        vals = torch.unique(torch.cat([vals, (vals[:, None] + terms[None, :]).reshape(-1)]))
    return vals.to(dtype)


def k_hot_terms(x: torch.Tensor, step: float, code: KHotCode = "csd") -> torch.Tensor:
    """How many terms each value of ``x`` (a multiple of ``step``) needs: non-zero digits of its
    non-adjacent form (``"csd"``, the fewest signed powers of two) or ones in the binary word of
    its magnitude (``"binary"``)."""
    n = torch.round(x.double() / step).abs().to(torch.long)
    count = torch.zeros_like(n)
    if code == "binary":
        while bool((n > 0).any()):
            count += n & 1
            n = n >> 1
        return count
    while bool((n > 0).any()):   # NAF: a digit ±1 wherever n is odd, chosen so n - d is divisible by 4
        odd = n & 1
        d = torch.where(odd.bool(), 2 - (n & 3), torch.zeros_like(n))
        count += odd
        n = (n - d) >> 1
    return count


def k_hot_project(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each entry of ``x`` replaced by the nearest value of the sorted ``table`` (ties: smaller
    magnitude), i.e. the nearest sum of at most K signed powers of two (canonical signed digit)."""
    t = table.to(x.dtype)
    i = torch.searchsorted(t, x.detach().contiguous()).clamp(1, t.numel() - 1)
    lo, hi = t[i - 1], t[i]
    dlo, dhi = (x - lo).abs(), (hi - x).abs()
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi.abs() < lo.abs()))
    out = torch.where(pick_hi, hi, lo)
    return torch.where(x <= t[0], t[0], torch.where(x >= t[-1], t[-1], out))
