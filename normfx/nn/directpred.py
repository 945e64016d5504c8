"""DirectPred (Tian, Chen & Ganguli, ICML 2021): a linear predictor set from the statistics of its
inputs instead of trained by gradients; DirectCopy (Wang et al., 2021) as its simpler sibling.

The module keeps ``F ← ρ·F + (1 − ρ)·E[f fᵀ]`` over its inputs ``f`` (uncentred, in float64 whatever
the autocast dtype) and sets its weight from F after steps 1, 1 + ``freq``, 1 + 2·``freq``, … (the
authors' schedule: ``facebookresearch/luckmatters``, ``ssl/real-dataset/byol_trainer.py``, sets W
when the 0-based iteration count is a multiple of ``freq``):

* ``mode="directpred"``: ``F = U diag(s) Uᵀ`` (``torch.linalg.eigh``),
  ``p = max((max(s, 0) / max s)^power + ε, floor)``, ``W = U diag(p) Uᵀ`` (``power=0.5`` is
  DirectPred; ``floor=1e-4`` is the authors' ``clamp(1e-4)``);
* ``mode="directcopy"``: ``W = F / ‖F‖₂ + ε·I`` (‖F‖₂ the spectral norm, F's largest eigenvalue).

With ``trainable=True``, W is a parameter the user's optimizer trains by gradient between two sets,
as the authors' predictor is (``freq=1`` overwrites every gradient step, so the two agree there).

Training-mode forwards only *collect* ``E[f fᵀ]`` for the current step; nothing moves until the
trainer calls ``step()`` (or ``normfx.nn.directpred.step_all(model)``) after its optimizer step. Eval
forwards, tracing and export never change F or W. F, W, the pending sums and the step count are
buffers: a ``state_dict`` taken mid-training resumes exactly.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

__all__ = ["DirectPred", "step_all", "Mode"]

Mode = Literal["directpred", "directcopy"]


class DirectPred(nn.Module):
    """A bias-free linear predictor ``y = f Wᵀ`` whose ``W`` is set from its inputs' correlation.

    Args:
        dim: feature dimension (input = output).
        rho: weight of the old F in ``F ← ρ·F + (1 − ρ)·E[f fᵀ]``.
        eps: added to every eigenvalue factor (DirectPred) or to the diagonal (DirectCopy).
        freq: set W at calls 1, 1 + freq, 1 + 2·freq, … of ``step()`` (the authors' schedule).
        power: exponent of the normalized eigenvalues (0.5: DirectPred).
        mode: ``"directpred"`` or ``"directcopy"``.
        floor: the smallest eigenvalue factor (DirectPred; the authors clamp at 1e-4, so the null
            space of F keeps a small gain even with ``eps=0``).
        trainable: W is an ``nn.Parameter`` trained by gradient between sets (the authors' setup
            when ``freq > 1``); by default a buffer no gradient reaches.

    Example:
        >>> p = normfx.nn.DirectPred(4)
        >>> _ = p.train()(torch.randn(8, 4))
        >>> p.step()
        >>> p.weight.shape, p.weight.requires_grad
        (torch.Size([4, 4]), False)
    """

    weight: torch.Tensor
    corr: torch.Tensor
    pending: torch.Tensor
    pending_count: torch.Tensor
    steps: torch.Tensor

    def __init__(self, dim: int, *, rho: float = 0.3, eps: float = 0.01, freq: int = 1, power: float = 0.5,
                 mode: Mode = "directpred", floor: float = 1e-4, trainable: bool = False) -> None:
        super().__init__()
        if mode not in ("directpred", "directcopy"):
            raise ValueError(f"mode must be 'directpred' or 'directcopy', got {mode!r}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        if isinstance(freq, bool) or int(freq) != freq or freq < 1:
            raise ValueError(f"freq must be a positive integer, got {freq!r}")
        if eps < 0 or power <= 0 or floor < 0:
            raise ValueError(f"eps and floor must be ≥ 0 and power > 0, got eps={eps}, floor={floor}, power={power}")
        self.dim, self.rho, self.eps, self.freq, self.power, self.mode = int(dim), float(rho), float(eps), \
            int(freq), float(power), mode
        self.floor, self.trainable = float(floor), bool(trainable)
        if trainable:
            self.weight = nn.Parameter(torch.eye(dim))                        # trained between sets
        else:
            self.register_buffer("weight", torch.eye(dim))                   # the predictor: starts as the identity
        self.register_buffer("corr", torch.zeros(dim, dim, dtype=torch.float64))     # F
        self.register_buffer("pending", torch.zeros(dim, dim, dtype=torch.float64))  # Σ f fᵀ since the last step
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if isinstance(f, torch.Tensor) and f.shape[-1] != self.dim:
            raise ValueError(f"DirectPred({self.dim}) got features of size {f.shape[-1]}")
        # Compiled code collects too (an in-place buffer update under no_grad is part of the graph).
        if self.training and not torch.jit.is_tracing() and not _fx_tracing():
            with torch.no_grad():
                flat = f.detach().reshape(-1, self.dim).to(torch.float64)
                self.pending.add_(flat.T @ flat)
                self.pending_count.add_(flat.shape[0])
        return f @ self.weight.to(f.dtype).T

    @torch.no_grad()
    def step(self) -> None:
        """Fold the collected ``E[f fᵀ]`` into F; at steps 1, 1 + freq, … set W from F. Call it once
        per optimizer step (after ``optimizer.step()``); a step with nothing collected changes nothing."""
        if float(self.pending_count) == 0:
            return
        batch = self.pending / self.pending_count
        first = int(self.steps) == 0
        self.corr.copy_(batch if first else self.rho * self.corr + (1.0 - self.rho) * batch)
        self.pending.zero_()
        self.pending_count.zero_()
        if int(self.steps) % self.freq == 0:     # the 0-based count before this step, as the authors'
            self.weight.copy_(self.predictor(self.corr).to(self.weight.dtype))
        self.steps.add_(1)

    def predictor(self, corr: torch.Tensor) -> torch.Tensor:
        """W for a correlation matrix ``corr`` (symmetrized first), in float64."""
        f = 0.5 * (corr.double() + corr.double().T)
        s, u = torch.linalg.eigh(f)
        top = s.max()
        if not top > 0:
            gain = self.eps if self.mode == "directcopy" else max(self.eps, self.floor)
            return torch.eye(self.dim, dtype=torch.float64, device=f.device) * gain
        if self.mode == "directcopy":
            return f / top + self.eps * torch.eye(self.dim, dtype=torch.float64, device=f.device)
        p = ((s.clamp_min(0) / top) ** self.power + self.eps).clamp_min(self.floor)
        return (u * p) @ u.T

    def extra_repr(self) -> str:
        extra = (f", floor={self.floor}" if self.mode == "directpred" else "") + (
            ", trainable=True" if self.trainable else "")
        return (f"{self.dim}, mode={self.mode!r}, rho={self.rho}, eps={self.eps}, freq={self.freq}, "
                f"power={self.power}{extra}")


def _fx_tracing() -> bool:
    from torch.fx import _symbolic_trace

    check = getattr(_symbolic_trace, "is_fx_symbolic_tracing", None) or _symbolic_trace.is_fx_tracing
    return bool(check())


def step_all(model: nn.Module) -> int:
    """``step()`` every DirectPred in ``model``; returns how many there are."""
    found = [m for m in model.modules() if isinstance(m, DirectPred)]
    for m in found:
        m.step()
    return len(found)
