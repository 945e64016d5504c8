"""BatchNorm (+ its activation) → EvoNorm-B0/S0 (Liu et al., NeurIPS 2020).

Sites: every ``BatchNorm2d`` a graph calls (the stem's too) and timm's ``BatchNormAct2d``.

* A BatchNorm whose only user is an activation (``nn.ReLU``/``ReLU6``/``SiLU``/``GELU``/``Hardswish``/
  ``LeakyReLU``/``ELU``/``Mish``, the same as functions or tensor methods) becomes an EvoNorm with its
  nonlinearity; the activation goes: its slot holds ``nn.Identity`` when the module is called
  nowhere else, otherwise the graph stops calling it here (the region's forward is rewritten).
* A BatchNorm none of whose users is an activation becomes the EvoNorm without nonlinearity
  (``x·γ + β``, as the paper's code defines it).
* A BatchNorm whose output feeds an activation and something else is skipped (``multi-user output``):
  the other user would see a different tensor.
* ``BatchNormAct2d``: with the nonlinearity unless its ``act`` is an identity.

γ and β are the BatchNorm's own tensors (trained values kept); ``v`` starts at 1; B0's running
variance starts from the BatchNorm's.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from normfx.analysis import Outside
from normfx.kinds import bn_kind
from normfx.match import module_uses, set_module
from normfx.config import check_choice, check_int, check_positive
from normfx.nn.evonorm import PRESETS, EvoNorm2dB0, EvoNorm2dS0, Preset, fit_groups
from normfx.report import Change, PassResult, Skip, SkipReason
from normfx.scope import EVERYWHERE, Scope
from normfx.transform import Step, Transform

__all__ = ["swap_evonorm", "swap_evonorm_outside", "ACTIVATION_MODULES", "ACTIVATION_FUNCTIONS", "EvoNormConfig",
           "EVONORM"]

ACTIVATION_MODULES: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU,
                                        nn.Mish)
ACTIVATION_FUNCTIONS: tuple[Any, ...] = (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu,
                                         F.hardswish, F.leaky_relu, F.elu, F.mish)
_ACTIVATION_METHODS = ("relu", "relu_")


def _is_activation(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(str(node.target)), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _act_name(node: fx.Node, mods: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(mods[str(node.target)]).__name__
    return getattr(node.target, "__name__", str(node.target))


def _make(bn: Any, variant: str, apply_act: bool, groups: int, eps: float | None, preset: str,
          site: str) -> nn.Module:
    p = PRESETS[preset]
    c = int(bn.num_features)
    new: nn.Module
    if variant == "B0":
        new = EvoNorm2dB0(c, apply_act=apply_act, eps=p.eps_b0 if eps is None else eps, momentum=p.momentum,
                          unbiased_running=p.unbiased_running)
        if getattr(bn, "running_var", None) is not None:
            with torch.no_grad():
                new.running_var.copy_(bn.running_var)
    else:
        g = fit_groups(c, groups, site, warn=apply_act)   # groups only matter with the nonlinearity
        new = EvoNorm2dS0(c, groups=g, apply_act=apply_act, eps=p.eps_s0 if eps is None else eps)
    ref = bn.weight if getattr(bn, "weight", None) is not None else getattr(bn, "running_var", None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    # γ and β: the BatchNorm's own Parameters (trained values, optimizer state and sharing kept)
    if getattr(bn, "weight", None) is not None:
        new.weight = bn.weight
    if getattr(bn, "bias", None) is not None:
        new.bias = bn.bias
    new.train(bn.training)
    return new


def _detail(variant: str, new: nn.Module, act: str | None) -> str:
    groups = f", {new.groups} groups" if isinstance(new, EvoNorm2dS0) and new.apply_act else ""
    return f"{variant}{groups}, replaces {act}" if act else f"{variant} without nonlinearity (x·γ + β)"


def swap_evonorm(gm: fx.GraphModule, scope: Scope = EVERYWHERE, *, variant: str = "B0", groups: int = 32,
                 eps: float | None = None,
                 preset: str = "paper") -> PassResult:
    """BatchNorm(+activation) sites of ``gm`` become EvoNorm modules (in place); see the module docstring."""
    changes: list[Change] = []
    skips: list[Skip] = []
    mods = dict(gm.named_modules())
    uses = module_uses(gm)
    rewired = False
    seen: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        site = str(node.target)
        m = mods.get(site)
        if isinstance(m, (EvoNorm2dB0, EvoNorm2dS0)):
            if site not in seen:
                seen.add(site)
                skips.append(Skip(site, SkipReason.ALREADY_DONE, f"already {type(m).__name__}"))
            continue
        if not isinstance(m, _BatchNorm) or site in seen:
            continue
        seen.add(site)
        result = _check_bn(site, m, uses)
        if result is not None:
            skips.append(result)
            continue
        if bn_kind(m) == "norm_act":   # timm's BatchNormAct2d: BN, drop and act in one module
            apply_act = not isinstance(m.act, nn.Identity)
            excluded = scope.skip(site, (site, m))
            if excluded:
                skips.append(excluded)
                continue
            new = _make(m, variant, apply_act, groups, eps, preset, site)
            if not scope.plan:
                set_module(gm, site, new)
            changes.append(Change(site, "evonorm", _detail(variant, new, type(m.act).__name__ if apply_act else None)))
            continue
        users = list(node.users)
        acts = [u for u in users if _is_activation(u, mods)]
        if acts and len(users) > 1:
            skips.append(Skip(site, SkipReason.MULTI_USER,
                              f"its output feeds {_act_name(acts[0], mods)} and {len(users) - 1} other node(s)"))
            continue
        if acts:
            act = acts[0]
            if act.op == "call_module" and (act.kwargs or len(act.args) != 1):
                skips.append(Skip(site, SkipReason.UNSUPPORTED, "activation called with extra arguments"))
                continue
            excluded = scope.skip(site, (site, m), (str(act.target), mods[str(act.target)]) if act.op == "call_module"
                                  else ("", None))
            if excluded:
                skips.append(excluded)
                continue
            new = _make(m, variant, True, groups, eps, preset, site)
            name = _act_name(act, mods)
            if scope.plan:
                changes.append(Change(site, "evonorm", _detail(variant, new, name)))
                continue
            set_module(gm, site, new)
            if act.op == "call_module" and uses[id(mods[str(act.target)])] == 1:
                # a leaf swap (the forward is unchanged), in the activation's mode
                set_module(gm, str(act.target), nn.Identity().train(mods[str(act.target)].training))
            else:                                                  # shared module or a function: rewire
                act.replace_all_uses_with(node)
                gm.graph.erase_node(act)
                rewired = True
            changes.append(Change(site, "evonorm", _detail(variant, new, name)))
        else:
            excluded = scope.skip(site, (site, m))
            if excluded:
                skips.append(excluded)
                continue
            new = _make(m, variant, False, groups, eps, preset, site)
            if not scope.plan:
                set_module(gm, site, new)
            changes.append(Change(site, "evonorm", _detail(variant, new, None)))
    if rewired:
        gm.graph.lint()
        gm.recompile()
    return PassResult("evonorm", tuple(changes), tuple(skips))


def _check_bn(site: str, m: _BatchNorm, uses: Any) -> Skip | None:
    if not isinstance(m, nn.BatchNorm2d) and bn_kind(m) != "norm_act":
        return Skip(site, SkipReason.UNSUPPORTED, f"{type(m).__name__}: EvoNorm2d replaces 2d BatchNorm only")
    if bn_kind(m) is None:
        return Skip(site, SkipReason.UNSUPPORTED, f"{type(m).__name__} has its own forward")
    if uses[id(m)] > 1:
        return Skip(site, SkipReason.SHARED_MODULE, "called at more than one place")
    return None


def swap_evonorm_outside(model: nn.Module, outside: list[Outside], scope: Scope = EVERYWHERE, **_: Any) -> PassResult:
    """BatchNorms no traced region calls: which activation follows them is in the untraced forward,
    so each is reported with the reason that forward was not traced."""
    skips = [scope.skip(o.qualname, (o.qualname, o.module)) or Skip(o.qualname, SkipReason.UNTRACEABLE, o.why)
             for o in outside if isinstance(o.module, _BatchNorm)]
    return PassResult("evonorm", (), tuple(skips))


@dataclass(frozen=True)
class EvoNormConfig:
    """Options of ``normfx.evonorm`` (see it for their meaning)."""

    variant: Literal["B0", "S0"] = "B0"
    groups: int = 32
    eps: float | None = None
    preset: Preset = "paper"

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, ("B0", "S0"))
        check_choice("preset", self.preset, list(PRESETS))
        check_int("groups", self.groups, lo=1)
        if self.eps is not None:
            check_positive("eps", self.eps)


def _steps(config: EvoNormConfig) -> tuple[Step, ...]:
    opts: dict[str, Any] = dict(variant=config.variant, groups=config.groups, eps=config.eps, preset=config.preset)
    return (Step("evonorm", partial(swap_evonorm, **opts), swap_evonorm_outside, view="module"),)


EVONORM = Transform(
    name="evonorm", config=EvoNormConfig, steps=_steps, exact=False,
    summary="BatchNorm + activation → one EvoNorm-B0/S0 layer (deploy folds the variant without nonlinearity)",
    paper="Liu et al., Evolving Normalization-Activation Layers (NeurIPS 2020)",
    page="evonorm.md",
    inspect=(("evonorm", EvoNormConfig()),),
)
