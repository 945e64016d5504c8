"""The one-liners: each builds its transform's options (a frozen, validated config) and calls
``normfx.apply``, which runs the registered transforms (``normfx.passes.registry``) through the one
runner (``normfx.runner.transform``)."""
from __future__ import annotations

from typing import Literal, Sequence, TypeVar

import torch
import torch.nn as nn

from normfx.functional import KHotCode, Overflow, Rounding
from normfx.nn.directpred import Mode
from normfx.nn.evonorm import Preset
from normfx.passes.directpred import DirectPredConfig
from normfx.passes.evonorm import EvoNormConfig
from normfx.passes.fixed_point import TARGETS, FixedPointConfig, Target
from normfx.passes.fold_convbn import ConvBNConfig, ConvBNMode
from normfx.passes.freeze import FreezeConfig, Role
from normfx.passes.linear_attention import LinearAttentionConfig
from normfx.passes.registry import DeployConfig, transform_for
from normfx.passes.swap_layernorm import RepBNConfig
from normfx.passes.sync_bn import SyncBNConfig
from normfx.runner import transform
from normfx.scope import FilterFn, LeafModules, make_scope
from normfx.shapes import as_inputs

__all__ = ["apply", "convbn", "deploy", "repbn", "evonorm", "directpred", "linear_attention", "freeze",
           "fixed_point", "sync_bn", "M", "Role"]

M = TypeVar("M", bound=nn.Module)
"""The caller's model type: every one-liner returns the caller's class (a forward it rewrote makes
the class a subclass of it), so ``net = normfx.convbn(net)`` keeps ``net``'s type."""

def apply(model: M, *configs: object, filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None,
          inplace: bool = False, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> M:
    """Run several transforms in one call: one copy of ``model``, the configs' steps in the order given.

    Each config is a registered transform's options (``normfx.ConvBNConfig``, ``RepBNConfig``,
    ``LinearAttentionConfig``, ``FixedPointConfig``, ...); the kwargs one-liners are this with one
    config. Each transform's preconditions are checked on the caller's model before anything is
    copied; consecutive graph steps that want the same regions share one analysis.

    Args:
        model: an ``nn.Module`` or ``GraphModule``; never modified unless ``inplace=True``.
        configs: one or more transform configs, applied in order.
        filter_fn: ``filter_fn(module, fqn) -> bool``; a site whose modules it rejects is left as it
            is and reported skipped (``excluded by filter_fn``). A site belongs to the modules it
            changes: a Conv+BN fold to both, a weight cast to its layer, an activation cast to the
            module producing the activation, a cast on an input, a function's output or an add to
            the module whose forward holds it (the model's inputs: the root, fqn ``""``).
        leaf_modules: qualified names or module types to keep opaque and unchanged: not traced
            into, nothing inside them transformed (reported ``inside a leaf module``).
        inplace: transform the caller's modules instead of a deep copy.
        example_inputs: the model's positional inputs (a tensor or a tuple). Optional: with them
            the passes see tensor shapes, so sites whose exactness depends on a shape can apply (a
            BatchNorm after a reshape of a linear's output, in ``deploy``); without them such a site
            is skipped and says so. Only their shapes are used: the traced forward runs once on
            fake tensors, and the model, its state and its hooks see nothing.

    Returns:
        The caller's module tree, changed where it had to be; ``normfx.last_report(m)`` holds one
        result per step.

    Raises:
        TypeError: a config that is no registered transform's, or ``filter_fn`` not callable.
        ValueError: no config; ``leaf_modules`` names a module the model does not have; a
            transform's own preconditions.

    Example:
        >>> vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
        >>> m = normfx.apply(vit, normfx.RepBNConfig(total_steps=100), normfx.LinearAttentionConfig())
        >>> print(normfx.last_report(m).summary().splitlines()[0:2])
        ['swap_layernorm: 5 sites, 5 transformed, 0 skipped', 'linear_attention: 2 sites, 2 transformed, 0 skipped']
    """
    if not configs:
        raise ValueError("normfx.apply needs at least one config, e.g. normfx.ConvBNConfig(mode='deploy')")
    if not isinstance(model, nn.Module):
        raise TypeError(f"normfx expects an nn.Module, got {type(model).__name__}")
    transforms = [transform_for(c) for c in configs]
    scope = make_scope(model, filter_fn, leaf_modules)
    for t, c in zip(transforms, configs):
        if t.check is not None:
            t.check(model, c)
    steps = [step for t, c in zip(transforms, configs) for step in t.steps(c)]
    tensors: Literal["share", "own"] = "own" if any(t.tensors == "own" for t in transforms) else "share"
    return transform(model, steps, inplace=inplace, tensors=tensors, scope=scope,
                     example_inputs=as_inputs(example_inputs))


def convbn(model: M, mode: ConvBNMode = "tune", *,
           filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None,
           inplace: bool = False) -> M:
    """Turn every Conv/Linear + BatchNorm block into Tune mode or fold it (Deploy mode).

    * ``mode="tune"``: each block's conv and BN become ``normfx.nn.TuneConv``/``TuneBN`` (their
      classes swapped for subclasses, the objects and their slots kept): Train mode while the BN is
      in training mode; otherwise one conv on BN-folded weights built inside autograd, so gradients
      are Eval mode's and neither the BN input nor the folded weights are kept for backward.
      ``state_dict`` keys are unchanged.
    * ``mode="deploy"``: folds permanently (in float64, cast back) into the conv's weights; the BN's
      slot holds ``nn.Identity`` (a norm-act layer's activation). Needs the model in eval mode.

    Args:
        model: an ``nn.Module`` or ``GraphModule``; never modified unless ``inplace=True``.
        mode: ``"tune"`` or ``"deploy"``.
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: transform the caller's modules instead of a deep copy.

    Returns:
        The caller's module tree, changed where it had to be (same class, submodules, hooks; a
        GraphModule only in the slot of a module whose forward had to change: a functional
        ``F.batch_norm``). ``normfx.last_report(m)`` says, site by site, what was transformed and
        what was skipped and why.

    Raises:
        TrainingModeError: ``mode="deploy"`` on a BatchNorm in training mode.

    Example:
        >>> m = normfx.convbn(torchvision.models.resnet18().eval(), mode="deploy")
        >>> normfx.last_report(m).summary()
        'fold_convbn: 20 sites, 20 transformed, 0 skipped'
    """
    return apply(model, ConvBNConfig(mode), filter_fn=filter_fn, leaf_modules=leaf_modules, inplace=inplace)


def deploy(model: M, *, filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None,
           inplace: bool = False, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> M:
    """Finalize every normfx construct for inference and fold what can be folded.

    Runs ``normfx.passes.DEPLOY_STEPS`` in order over every traced region and the modules outside them:
    Tune-mode ConvBN blocks and plain eval-mode BatchNorms fold into their convs/linears; later
    passes add their own steps. Exact: the result equals the eval-mode input model. It contains no
    normfx training-time construct (a Tune block that cannot fold goes back to conv -> BN, reported).

    Args:
        model: an ``nn.Module`` or ``GraphModule`` in eval mode; never modified unless ``inplace``.
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: transform the caller's modules instead of a deep copy.
        example_inputs: optional inputs whose shapes let BatchNorms after a reshape fold (LeViT's
            ``bn(linear(x).flatten(0, 1))``); see ``normfx.apply``.

    Raises:
        TrainingModeError: a BatchNorm that would fold is in training mode.

    Example:
        >>> tuned = normfx.convbn(torchvision.models.resnet18(), mode="tune")
        >>> m = normfx.deploy(tuned.eval())
        >>> normfx.last_report(m).summary()
        'fold_convbn: 20 sites, 20 transformed, 0 skipped'
    """
    return apply(model, DeployConfig(), filter_fn=filter_fn, leaf_modules=leaf_modules, inplace=inplace,
                 example_inputs=example_inputs)


def repbn(model: M, *, total_steps: int, eta_init: float = 1.0,
          filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None,
          inplace: bool = False) -> M:
    """Replace every LayerNorm with progressive re-parameterized BatchNorm (SLAB's PRepBN).

    Each last-dim LayerNorm (and channels-first LayerNorm2d) becomes ``ProgressiveRepBN``:
    ``λ·LN(x) + (1 − λ)·(BN(x) + η·x)``. λ starts at 1 (the model is unchanged) and is moved to 0 by
    ``normfx.RepBNScheduler(model)`` over ``total_steps``, one ``step()`` per optimizer step. At λ = 0,
    ``normfx.deploy`` folds each RepBN into a neighbouring Linear, so the deployed model has no
    normalization left. LayerNorms over several dims and q/k norms inside attention are skipped.

    Args:
        model: an ``nn.Module`` or ``GraphModule``; never modified unless ``inplace=True``.
        total_steps: scheduler steps over which λ falls to 0; stored on every ProgressiveRepBN,
            where ``RepBNScheduler`` and error messages read it (given once, here).
        eta_init: initial η of every RepBN.
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: transform the caller's modules instead of a deep copy.

    Example:
        >>> m = normfx.repbn(torchvision.models.vit_b_16(), total_steps=10_000)
        >>> sched = normfx.RepBNScheduler(m)
        >>> normfx.last_report(m).summary()
        'swap_layernorm: 25 sites, 25 transformed, 0 skipped'
        >>> type(m).__name__, type(m.encoder.ln).__name__
        ('VisionTransformer', 'ProgressiveRepBN')
    """
    return apply(model, RepBNConfig(total_steps, eta_init), filter_fn=filter_fn, leaf_modules=leaf_modules,
                 inplace=inplace)


def evonorm(model: M, *, variant: Literal["B0", "S0"] = "B0", groups: int = 32, eps: float | None = None,
            preset: Preset = "paper",
            filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None, inplace: bool = False) -> M:
    """BatchNorm and the activation after it → one EvoNorm layer (Liu et al., NeurIPS 2020).

    Every ``BatchNorm2d`` a traced graph calls (stem included) and every timm ``BatchNormAct2d``:
    with an activation (ReLU, SiLU, GELU, ... module, function or method) as its only user it
    becomes ``normfx.nn.EvoNorm2dB0``/``EvoNorm2dS0`` with the nonlinearity and the activation goes;
    with no activation after it, the variant without nonlinearity (``x·γ + β``). A BatchNorm whose
    output feeds an activation and something else is skipped with its reason. γ and β are the
    BatchNorm's own; ``v`` starts at 1; B0's running variance starts from the BatchNorm's.

    It changes the function (a different normalization, meant to be trained): not exact.

    Args:
        model: any ``nn.Module``; never modified unless ``inplace=True``.
        variant: ``"B0"`` (batch and instance statistics) or ``"S0"`` (group statistics, batch-free).
        groups: S0's channel groups, lowered (with a warning) until they divide a layer's channels.
        eps: ε under the square roots; ``None`` takes the preset's.
        preset: ``"paper"`` (the authors' code, ``tensorflow/tpu``,
            ``models/official/resnet/resnet_model.py``: ε 1e-5, decay 0.9, biased running variance)
            or ``"timm"`` (``timm/layers/evo_norm.py``: B0 ε 1e-3, unbiased running variance).
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: swap the caller's modules instead of a copy's.

    Raises:
        ValueError: an unknown variant or preset, or ``groups < 1``.

    Example:
        >>> m = normfx.evonorm(torchvision.models.resnet18(), variant="S0")
        >>> normfx.last_report(m).summary().splitlines()[0]
        'evonorm: 20 sites, 20 transformed, 0 skipped'
    """
    return apply(model, EvoNormConfig(variant, groups, eps, preset), filter_fn=filter_fn, leaf_modules=leaf_modules,
                 inplace=inplace)


def directpred(model: M, *, predictor: str = "predictor", rho: float = 0.3, eps: float = 0.01,
               freq: int = 1, power: float = 0.5, mode: Mode = "directpred", dim: int | None = None,
               floor: float = 1e-4, trainable: bool = False,
               filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None, inplace: bool = False) -> M:
    """Replace the predictor of a BYOL/SimSiam-style model with ``normfx.nn.DirectPred`` (Tian et al.,
    ICML 2021): a bias-free linear map set from its inputs' correlation, not trained by gradients.

    After each optimizer step call ``normfx.nn.directpred.step_all(model)`` (or ``.step()`` on the
    module): training forwards only collect ``E[f fᵀ]``; the step folds it into F and sets W.
    ``normfx.deploy`` bakes W into a plain bias-free Linear.

    Args:
        model: any ``nn.Module``; never modified unless ``inplace=True``.
        predictor: qualified name of the submodule to replace (any module, e.g. lightly's or
            solo-learn's prediction head).
        rho, eps, freq, power, mode, floor, trainable: see ``normfx.nn.DirectPred``
            (``mode="directcopy"``: Wang et al.'s ``W = F/‖F‖ + εI``; ``trainable``: W also trained
            by gradient between sets, as in the authors' code).
        dim: the feature size; by default read from the predictor's first and last Linear.
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: swap the caller's module instead of a copy's.

    Raises:
        ValueError: no submodule ``predictor``; its feature size cannot be read (pass ``dim``) or
            its input and output sizes differ.
        AlreadyTransformedError: ``predictor`` is a DirectPred already.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> net.add_module("predictor", nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4)))
        >>> m = normfx.directpred(net)
        >>> m.predictor
        DirectPred(4, mode='directpred', rho=0.3, eps=0.01, freq=1, power=0.5, floor=0.0001)
    """
    config = DirectPredConfig(predictor, rho, eps, freq, power, mode, dim, floor, trainable)
    return apply(model, config, filter_fn=filter_fn, leaf_modules=leaf_modules, inplace=inplace)


def linear_attention(model: M, *, kernel_size: int = 5, stages: Sequence[int] | None = None,
                     cls_token: Literal["exclude", "drop"] = "exclude", image_size: int | tuple[int, int] | None = None,
                     filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None,
                     inplace: bool = False) -> M:
    """Softmax self-attention → SLAB's Simplified Linear Attention (``normfx.nn.SimplifiedLinearAttention``):
    ``ReLU(Q)(ReLU(K + P)ᵀV) / (ReLU(Q)·ΣReLU(K + P)) + DWC(V)``, cost linear in the number of tokens.

    Sites: timm ``Attention`` (ViT, DeiT), torchvision's ViT ``nn.MultiheadAttention`` self-attention,
    and Swin window attention (timm ``WindowAttention``, torchvision ``ShiftedWindowAttention``) in the
    selected stages, where as in SLAB's Swin the window is widened to the stage's resolution and the
    shift dropped. Each keeps its q/k/v and output projections (the same Parameters); the positional
    encoding P starts at zero and the depthwise conv at torch's default init. Skipped with their reason:
    q/k-normalized or gated attention, attention without a known token grid (cross-attention, text),
    dynamic image sizes, Swin V2's cosine attention, stages not selected. It changes the function:
    fine-tune after the swap (SLAB's recipe: with PRepBN, ``normfx.repbn``; the softmax model can serve
    as a distillation teacher).

    Args:
        model: any ``nn.Module``; never modified unless ``inplace=True``.
        kernel_size: the depthwise convolution's kernel (odd; SLAB uses 5).
        stages: the stages to swap, numbered from 0 by resolution (a ViT is stage 0). ``None``: a ViT's
            attention, and the first half of a Swin's stages (SLAB's ``LLSS``: softmax window attention
            stays in the low-resolution stages).
        cls_token: ``"exclude"``: prefix tokens (class, distillation) attend linearly and stay out of the
            DWC term. ``"drop"``: SLAB-DeiT's head, the class token removed and the patch tokens
            average-pooled (timm ViTs; ``cls_token`` leaves the ``state_dict``).
        image_size: the input's ``(H, W)`` (or one int), needed for torchvision's Swin, which does not
            record it; the swapped model then takes that size only.
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: swap the caller's modules instead of a copy's.

    Raises:
        ValueError: an even or non-positive ``kernel_size``; ``stages`` the model does not have;
            ``cls_token="drop"`` on a model whose head reads the class token (torchvision's ViT, a
            distilled DeiT).

    Example:
        >>> vit = torchvision.models.VisionTransformer(32, 8, 2, 2, 32, 64, num_classes=10)
        >>> m = normfx.linear_attention(vit)
        >>> normfx.last_report(m).summary().splitlines()[0]
        'linear_attention: 2 sites, 2 transformed, 0 skipped'
        >>> swin = torchvision.models.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10)
        >>> m = normfx.linear_attention(swin, image_size=32)     # stages 8×8 and 4×4: the first swapped
        >>> [c.site for c in normfx.last_report(m).changes]
        ['features.1.0.attn', 'features.1.1.attn']
    """
    config = LinearAttentionConfig(kernel_size, stages, cls_token, image_size)  # type: ignore[arg-type]
    return apply(model, config, filter_fn=filter_fn, leaf_modules=leaf_modules, inplace=inplace)


def freeze(model: M, *, keep: Sequence[Role] | Role = ("norm",),
           random: int | Literal["match", "per_channel"] = 0,
           seed: int = 0, freeze_stats: bool = False,
           filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None, inplace: bool = False) -> M:
    """Freeze every parameter except the roles in ``keep`` (Frankle et al.'s BatchNorm-only training).

    Roles are found from the graph and module types, never from parameter names: ``"norm"`` (every
    normalization layer's own parameters: BatchNorm/LayerNorm/GroupNorm γ/β, RepBN's η, ...),
    ``"head"`` (the Linear/Conv nearest the output on every path) and ``"bias"`` (Linear/Conv
    biases). Every parameter's ``requires_grad`` is set: kept roles train, the rest is frozen at its
    current value.

    ``random="per_channel"`` is the paper's control: it also trains two entries drawn at random
    (seeded) in each output channel of every frozen conv/linear weight, as many as the BatchNorms
    after them hold. ``random=N`` is a uniform control instead: N entries drawn uniformly from every
    frozen tensor (biases and norm parameters included); ``"match"`` draws as many as ``keep``
    selects. Those entries live
    in their own Parameter (``torch.nn.utils.parametrize``), so no optimizer, momentum or weight
    decay can move a frozen entry. State-dict keys stay the original ones; the control adds
    ``<layer>.parametrizations.<tensor>.0.values`` and ``.index``.

    Args:
        model: any ``nn.Module`` (or a normfx result); never modified unless ``inplace=True``.
        keep: roles that stay trainable, any of ``"norm"``, ``"head"``, ``"bias"``; ``()`` freezes all.
        random: ``"per_channel"`` (two per output channel of each frozen conv/linear), a number of
            entries drawn uniformly from all frozen tensors, or ``"match"`` (as many as ``keep`` selects).
        seed: seed of the random draw.
        freeze_stats: BatchNorms whose γ/β are frozen also stop updating their running statistics:
            they run in eval mode (running statistics used) whatever ``model.train()`` says.
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: set the flags on the caller's parameters instead of a copy's.

    Raises:
        ValueError: an unknown role; a role in ``keep`` that selects nothing (a model without
            normalization layers, a head that cannot be found); ``random`` out of range;
            ``random="per_channel"`` on a model with no frozen conv/linear weight.

    Example:
        >>> m = normfx.freeze(torchvision.models.resnet18(), keep=("norm",))
        >>> normfx.trainable_summary(m).trainable
        9600
    """
    config = FreezeConfig(keep, random, seed, freeze_stats)  # type: ignore[arg-type]
    return apply(model, config, filter_fn=filter_fn, leaf_modules=leaf_modules, inplace=inplace)


def fixed_point(model: M, *, bits: int = 8, int_bits: float | None = None,
                rounding: Rounding = "nearest_even", overflow: Overflow = "saturate",
                targets: Sequence[Target] = TARGETS,
                per_channel: bool = False, k_hot: int | None = None, k_hot_weights: bool = False,
                k_hot_code: KHotCode = "csd", fold_bn: bool = False, weight_bits: int | None = None,
                filter_fn: FilterFn | None = None, leaf_modules: LeafModules | None = None,
                inplace: bool = False) -> M:
    """Insert trainable fixed-point casts (QFX): ``ap_fixed<bits, I, rounding, overflow>`` with a
    trainable binary point ``I`` on weights, biases, activations, BatchNorm and residual adds.

    Args:
        model: any ``nn.Module``; never modified unless ``inplace=True``.
        bits: the word length W of every cast (2 to 24) but the weights' when ``weight_bits`` is set.
        int_bits: fix every binary point at this I instead of training it.
        rounding: ``"nearest_even"`` (AP_RND_CONV), ``"half_up"`` (AP_RND), ``"half_zero"``
            (AP_RND_ZERO), ``"half_down"`` (AP_RND_MIN_INF), ``"half_away"`` (AP_RND_INF), ``"floor"``
            (AP_TRN), ``"trunc"`` (AP_TRN_ZERO); HLS names are accepted too.
        overflow: ``"saturate"`` (AP_SAT), ``"saturate_zero"`` (AP_SAT_ZERO), ``"saturate_sym"``
            (AP_SAT_SYM), ``"wrap"`` (AP_WRAP).
        targets: which of ``"weight"``, ``"bias"``, ``"activation"``, ``"norm"``, ``"add"`` to cast.
        per_channel: one binary point per output channel for conv/linear weights.
        k_hot: BatchNorm scales become K-hot: at most K terms (a multiplier of K shifts and adds).
        k_hot_weights: conv/linear weights become K-hot too (needs ``k_hot``).
        k_hot_code: how the K terms count: ``"csd"`` (signed powers of two ``±2^e``, canonical signed
            digit) or ``"binary"`` (ones in the magnitude's binary word, QFX's count; fewer values).
        fold_bn: fold BatchNorm into its conv first (``convbn(mode="deploy")``; the model must be in
            eval mode) and quantize the folded weights, instead of keeping a fixed-point BN.
        weight_bits: the word length of conv/linear weights, when it differs from ``bits`` (e.g.
            ``bits=8, weight_bits=4``: 4-bit weights, 8-bit activations, biases, BatchNorm, adds).
        filter_fn, leaf_modules: where it applies (``normfx.apply``).
        inplace: transform the caller's modules instead of a copy.

    Example:
        >>> q = normfx.fixed_point(torchvision.models.resnet18(), bits=8)
        >>> q = normfx.calibrate(q, [torch.randn(8, 3, 64, 64)], progress=False)
        >>> sum(isinstance(m, normfx.nn.FixedPoint) for m in q.modules()) > 0
        True
    """
    config = FixedPointConfig(bits, int_bits, rounding, overflow, tuple(targets), per_channel, k_hot, k_hot_weights,
                              k_hot_code, fold_bn, weight_bits)
    return apply(model, config, filter_fn=filter_fn, leaf_modules=leaf_modules, inplace=inplace)


def sync_bn(model: M, *, process_group: object | None = None, filter_fn: FilterFn | None = None,
            leaf_modules: LeafModules | None = None, inplace: bool = False) -> M:
    """Every BatchNorm computes its training statistics over the batch of every rank of
    ``process_group`` (``torch.distributed``; CPU and gloo included), each module keeping its class,
    slot and behaviour (a norm-act layer its activation, a Tune block its fused eval path). Exact.
    Order: transform → ``sync_bn`` → ``DistributedDataParallel``; ``deploy`` gives the classes back.
    See docs/distributed.md.

    Example:
        >>> m = normfx.sync_bn(normfx.convbn(torchvision.models.resnet18()))
        >>> type(m.layer1[0].bn1).__name__
        'SyncTuneBatchNorm2d'
    """
    return apply(model, SyncBNConfig(process_group), filter_fn=filter_fn, leaf_modules=leaf_modules, inplace=inplace)
