"""Re-parameterized BatchNorm (SLAB, Guo et al., ICML 2024) and its progressive LayerNorm blend.

* ``RepBN(x) = BN(x) + η·x`` per channel, η a learnable scalar (init 1). Statistics are taken per
  channel over every other axis (batch × tokens for ``[B, N, C]``; batch × H × W channels-first).
* ``ProgressiveRepBN(x) = λ·LN(x) + (1 − λ)·RepBN(x)``; λ is a buffer that ``RepBNScheduler`` moves
  from 1 to 0, once per optimizer step, so tracing, checkpointing and evaluation never move it.
* In eval mode RepBN is the per-channel affine ``a·x + b`` with ``a = γ/sqrt(σ² + ε) + η`` and
  ``b = β − γ·μ/sqrt(σ² + ε)`` (``RepBN.affine()``), which ``normfx.deploy`` folds into a Linear.
"""
from __future__ import annotations

from typing import Any, Iterable, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from normfx.batches import ForwardFn, run_batch
from normfx.nn.sync_bn import is_synced, sync, unsync, world_size

M = TypeVar("M", bound=nn.Module)

__all__ = ["RepBN", "ProgressiveRepBN", "ChannelAffine", "RepBNScheduler", "recalibrate_bn"]


class RepBN(nn.Module):
    """``BN(x) + η·x`` over the channel axis: the last one (``channels_last=True``, tokens) or dim 1."""

    normfx_norm_layer = True
    eta: nn.Parameter

    def __init__(self, num_features: int, *, eta_init: float = 1.0, eps: float = 1e-5, momentum: float = 0.1,
                 channels_last: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)
        # One element, not a 0-dim tensor (as SLAB's ``alpha = nn.Parameter(torch.ones(1))``): FSDP's
        # ``fully_shard`` refuses scalar parameters.
        self.eta = nn.Parameter(torch.full((1,), float(eta_init)))
        self.channels_last = channels_last

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[override]
                              unexpected_keys, error_msgs):
        eta = state_dict.get(prefix + "eta")
        if isinstance(eta, torch.Tensor) and eta.dim() == 0:   # a checkpoint from before η had one element
            state_dict[prefix + "eta"] = eta.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if not torch.is_autocast_enabled(dev):
            return self._forward(x)
        # Under autocast: statistics in the parameters' precision (float32, as BatchNorm's running
        # statistics are), output in the dtype the replaced LayerNorm gives under the same autocast
        # (float32 on CUDA, which autocasts layer_norm to float32; the input's dtype on CPU).
        c = x.shape[-1] if self.channels_last else x.shape[1]
        out_dtype = F.layer_norm(x.new_empty((0, c)), (c,)).dtype
        with torch.autocast(dev, enabled=False):
            return self._forward(x.to(torch.promote_types(x.dtype, self.eta.dtype))).to(out_dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            y = self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        else:
            y = self.bn(x.flatten(2)).reshape(x.shape)
        return y + self.eta * x

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` in float64 with ``RepBN_eval(x) = a·x + b`` per channel."""
        bn = self.bn
        inv = torch.rsqrt(bn.running_var.double() + bn.eps)
        g = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
        a = g * inv + self.eta.double()
        b = beta - g * bn.running_mean.double() * inv
        return a, b


class ProgressiveRepBN(nn.Module):
    """``λ·norm(x) + (1 − λ)·repbn(x)``; ``norm`` is the original LayerNorm, kept with its parameters.

    The same blend is used in train and eval mode (running statistics in eval), so validation during
    training measures the model being trained. At λ = 1 the output is ``norm(x)`` exactly; at λ = 0
    it is ``repbn(x)`` and ``norm`` is not computed. ``total_steps`` is recorded for error messages.
    """

    normfx_norm_layer = True
    lam: torch.Tensor

    def __init__(self, norm: nn.Module, repbn: RepBN, *, total_steps: int) -> None:
        super().__init__()
        self.norm = norm
        self.repbn = repbn
        self.total_steps = int(total_steps)
        self.register_buffer("lam", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # No Python number read from λ (a graph break for dynamo, a data-dependent guard for
            # torch.export): the blend, which is exactly the branches below — 1·a + 0·b == a for
            # finite b, and a RepBN run in eval mode has no side effect to skip.
            return self.lam * self.norm(x) + (1.0 - self.lam) * self.repbn(x)
        lam = float(self.lam)
        if lam <= 0.0:
            return self.repbn(x)
        if lam >= 1.0 and not self.training:
            return self.norm(x)
        # Training at λ = 1 still runs RepBN so its statistics are warm when λ starts to fall;
        # 1·a + 0·b == a exactly for finite b, so the output is the LayerNorm's bit for bit.
        return lam * self.norm(x) + (1.0 - lam) * self.repbn(x)

    def extra_repr(self) -> str:
        return f"lam={float(self.lam):.4f}, total_steps={self.total_steps}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[override]
                              unexpected_keys, error_msgs):
        """A checkpoint of the model before ``normfx.repbn`` holds this slot's LayerNorm as
        ``<prefix>weight``/``<prefix>bias``: they load into ``norm``, and what the LayerNorm did not
        have (RepBN, η, λ) keeps its current values, so ``load_state_dict(original, strict=True)``
        works. A checkpoint of the transformed model loads as it is."""
        if (prefix + "norm.weight") not in state_dict and any(prefix + k in state_dict for k in ("weight", "bias")):
            for k in ("weight", "bias"):
                if prefix + k in state_dict:
                    state_dict[prefix + "norm." + k] = state_dict.pop(prefix + k)
            for key, value in self.state_dict(prefix=prefix, keep_vars=True).items():
                state_dict.setdefault(key, value.detach())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class ChannelAffine(nn.Module):
    """``x·scale + shift`` over the channel axis: what is left of a RepBN that could not fold."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, *, channels_last: bool = True) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return torch.addcmul(self.shift, x, self.scale)
        view = (-1,) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(view), x, self.scale.view(view))


class RepBNScheduler:
    """Moves λ of every ``ProgressiveRepBN`` in ``model`` linearly from 1 to 0 over the
    ``total_steps`` they were made with (``normfx.repbn(model, total_steps=...)``: given once),
    after ``warmup_steps`` at λ = 1 (SLAB's ``warm``: LayerNorm alone first).

    Call ``step()`` once per optimizer step. Shaped like ``torch.optim.lr_scheduler``: ``state_dict()``
    and ``load_state_dict()`` resume exactly (λ also lives in each module's buffer).

    Args:
        model: a model with ``ProgressiveRepBN`` modules (``normfx.repbn``).
        warmup_steps: steps at λ = 1 before λ starts to fall; λ reaches 0 after
            ``warmup_steps + total_steps`` steps.

    Example:
        >>> m = normfx.repbn(torchvision.models.vit_b_16(), total_steps=1000)
        >>> sched = normfx.RepBNScheduler(m, warmup_steps=100)
        >>> sched.total_steps, sched.lam
        (1000, 1.0)
    """

    def __init__(self, model: nn.Module, *, warmup_steps: int = 0) -> None:
        self.modules = [m for m in model.modules() if isinstance(m, ProgressiveRepBN)]
        if not self.modules:
            raise ValueError(f"{type(model).__name__} has no ProgressiveRepBN; call normfx.repbn(model, ...) first")
        steps = {m.total_steps for m in self.modules}
        if len(steps) > 1:
            raise ValueError(f"the ProgressiveRepBNs of {type(model).__name__} were made with different total_steps "
                             f"{sorted(steps)}; call normfx.repbn once on the whole model")
        if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        self.total_steps = steps.pop()
        self.warmup_steps = int(warmup_steps)
        self.last_step = 0
        self._apply()

    @property
    def lam(self) -> float:
        return min(1.0, max(0.0, 1.0 - (self.last_step - self.warmup_steps) / self.total_steps))

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        for m in self.modules:
            m.lam.fill_(self.lam)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state.get("warmup_steps", 0))
        for m in self.modules:
            m.total_steps = self.total_steps
        self._apply()


@torch.no_grad()
def recalibrate_bn(model: M, batches: Iterable, *, steps: int | None = None,
                   progress: bool = True, forward_fn: ForwardFn | None = None,
                   process_group: Any = None, sync_ranks: bool = True) -> M:
    """Re-estimate every BatchNorm's running statistics from ``batches`` (SLAB does this after training).

    The model runs in eval mode — Dropout, DropPath and stochastic depth off, as at inference — with
    only its normalization layers in training mode (BatchNorms, and the RepBN/PRepBN modules that
    hold them), so the statistics describe the activations the eval-mode model will see.
    (``torch.optim.swa_utils.update_bn`` runs the whole model in train mode instead, dropout
    included.) Statistics are reset and accumulated as a cumulative average (``momentum=None``)
    over the batches, without gradients; the model's modes and momenta are restored after. Batches
    follow ``normfx.batches``: a tensor, a tuple/list whose first item is the input, a dict of
    keyword arguments, or anything with ``forward_fn(model, batch)``. ``progress=False`` turns off
    the tqdm progress bar.

    Under ``torch.distributed`` (more than one rank in ``process_group``, the default group when
    ``None``) every rank must call it, each with its own share of the batches: the BatchNorms compute
    their batch statistics over every rank's batch (``normfx.sync_bn`` for the duration of the call),
    so every rank ends with the same statistics, those of one process on the global batches.
    ``sync_ranks=False`` keeps each rank's own.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.BatchNorm1d(6))
        >>> loader = [(torch.randn(8, 4), None) for _ in range(3)]
        >>> model = normfx.recalibrate_bn(model, (x for x, _ in loader), steps=100, progress=False)
        >>> model[2].num_batches_tracked.item()
        3
    """
    bns: list[nn.modules.batchnorm._BatchNorm] = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        raise ValueError(f"{type(model).__name__} has no BatchNorm with running statistics to recalibrate")
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    synced = [m for m in bns if sync_ranks and world_size(process_group) > 1 and not is_synced(m)]
    try:
        for m in synced:
            sync(m, process_group)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.eval()
        for mod in model.modules():
            # A PRepBN at λ = 1 in eval mode skips its RepBN: in training mode it runs it (and its
            # output is still exactly the LayerNorm's).
            if isinstance(mod, (RepBN, ProgressiveRepBN)):
                mod.training = True
        for m in bns:
            m.training = True
        it = tqdm(batches, total=steps, desc="recalibrating BatchNorm", leave=False, disable=not progress)
        for i, batch in enumerate(it):
            if steps is not None and i >= steps:
                break
            run_batch(model, batch, forward_fn)
    finally:
        for mod, mode in modes.items():
            mod.training = mode
        for m, mom in momenta.items():
            m.momentum = mom
        for m in synced:
            unsync(m)
    return model
