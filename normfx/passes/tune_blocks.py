"""Tune blocks in a traced graph: make one from a Conv+BN site (a leaf change when the BN is a
module: both keep their slots, only their classes change), and take one apart again (Deploy, when
it cannot fold). The graph edits of the ConvBN transform's Tune half; ``fold_convbn`` decides."""
from __future__ import annotations

from typing import Any

import torch.fx as fx
import torch.nn.functional as F

from normfx.kinds import original_class
from normfx.match import get_attr
from normfx.nn.convbn import tune, tune_convbn, tune_convbn_functional, tuned_pair, untune
from normfx.passes.convbn_sites import Ctx, Site, fn_args
from normfx.report import Change

__all__ = ["make_tune_block", "untune_modules", "untune_node"]


def untune_modules(ctx: Ctx, bn: Any) -> None:  # bn: the Tune block's BatchNorm
    """Give a Tune block's BN, and the conv that folds it, their own classes back."""
    for m in ctx.mods.values():
        pair = tuned_pair(m)
        if pair is not None and pair is bn:
            untune(m, pair)
    bn.__class__ = original_class(bn)


def make_tune_block(gm: fx.GraphModule, site: Site, producer: Any) -> Change:
    if site.module is not None:
        # A leaf change: the conv and BN keep their slots (the parent's forward is untouched).
        tune(get_attr(gm, str(producer.target)), site.module)
        return Change(site.name, "tune", f"{producer.target} + {site.name}")
    graph = gm.graph
    node = site.node
    with graph.inserting_before(node):
        conv_ref = graph.get_attr(producer.target)
        if node.op == "call_module":
            bn_ref = graph.get_attr(node.target)
            new = graph.call_function(tune_convbn, (producer.args[0], conv_ref, bn_ref))
        else:
            a = fn_args(node)
            new = graph.call_function(
                tune_convbn_functional,
                (producer.args[0], conv_ref, a["running_mean"], a["running_var"], a["weight"], a["bias"], a["eps"]),
            )
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    graph.erase_node(producer)
    return Change(site.name, "tune", f"{producer.target} + {site.name}")


def untune_node(gm: fx.GraphModule, site: Site, conv_call: fx.Node) -> None:
    node = site.node
    with gm.graph.inserting_after(conv_call):
        if node.target is tune_convbn:
            bn_call = gm.graph.call_module(node.args[2].target, (conv_call,))
        else:
            _, _, mean, var, w, b, eps = node.args
            bn_call = gm.graph.call_function(F.batch_norm, (conv_call, mean, var, w, b, False, 0.0, eps))
    node.replace_all_uses_with(bn_call)
    gm.graph.erase_node(node)
