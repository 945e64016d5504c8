"""Which values of a traced graph the fixed-point pass casts: tensors of values (not shapes, indices
or tuples), whether they are unsigned, and which ops pass values through unchanged (a cast after
them would repeat the one before). Pure reading of a graph; nothing here changes it."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from normfx.kinds import bn_kind, is_frozen_bn, is_mode_dependent_leaf, is_norm_layer
from normfx.match import get_attr as getattr_path

__all__ = ["ADDS", "same_values", "unsigned", "integer_indices", "returns_one_tensor", "tensor_nodes"]

_UNSIGNED_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_UNSIGNED_FUNCS = {F.relu, torch.relu, F.relu6, torch.sigmoid, F.sigmoid, F.hardsigmoid}
_SAME_VALUES_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                        nn.Unflatten)
_SAME_VALUES_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                      torch.unsqueeze, operator.getitem, getattr, F.dropout, F.max_pool1d, F.max_pool2d,
                      F.max_pool3d, torch.cat, torch.chunk, torch.split}
_SAME_VALUES_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                        "unsqueeze", "expand", "size", "dim", "chunk", "split", "unbind"}
ADDS = {operator.add, torch.add, operator.iadd}


def same_values(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _SAME_VALUES_MODULES)
    if node.op == "call_function":
        return node.target in _SAME_VALUES_FUNCS
    if node.op == "call_method":
        return node.target in _SAME_VALUES_METHODS
    return node.op in ("get_attr", "output")


def unsigned(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _UNSIGNED_MODULES)
    if node.op == "call_function":
        return node.target in _UNSIGNED_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_", "sigmoid")


def integer_indices(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every use of ``node`` is as the indices of an embedding lookup (an integer tensor,
    such as a language model's ``input_ids``: a fixed-point cast would refuse it)."""
    def index_use(u: fx.Node) -> bool:
        if not u.args or u.args[0] is not node:
            return False
        if u.op == "call_module":
            return isinstance(gm.get_submodule(str(u.target)), (nn.Embedding, nn.EmbeddingBag))
        return u.op == "call_function" and u.target in (F.embedding, F.embedding_bag, F.one_hot)
    return bool(node.users) and all(index_use(u) for u in node.users)


_TUPLE_MODULES = (nn.MultiheadAttention, nn.RNNBase)


def returns_one_tensor(m: nn.Module) -> bool:
    """Whether a leaf module is known to return one tensor: torch.nn's and normfx's modules (but
    attention and RNNs, which return tuples) and the norm/mode-dependent leaves normfx keeps. A module
    kept opaque because its forward could not be traced may return anything (an FPN returns a dict)."""
    if isinstance(m, _TUPLE_MODULES):
        return False
    own = type(m).__module__.startswith(("torch.nn.", "normfx."))
    return own or bn_kind(m) is not None or is_frozen_bn(m) or is_norm_layer(m) or is_mode_dependent_leaf(m)


def tensor_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that produce tensors (not sizes, dims or other Python values), by a forward dataflow
    pass: inputs, modules known to return one tensor and tensor attributes do; ``size()``/``.shape``
    and what is computed only from them do not."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.args:
            continue   # an argument fixed at its default when traced (a Python value, not a tensor)
        if n.op == "placeholder" or (n.op == "call_module" and returns_one_tensor(gm.get_submodule(str(n.target)))):
            out.add(n)
        elif n.op == "get_attr":
            if isinstance(getattr_path(gm, n.target), torch.Tensor):
                out.add(n)
        elif n.op == "call_method" and n.target in ("size", "dim", "numel", "tolist", "item"):
            continue
        elif n.op == "call_function" and n.target is getattr:
            continue
        elif n.op in ("call_function", "call_method") and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


