"""``convert(fuse=True)``'s graph pass: batch norm -> (add) -> ReLU written in a module's
``forward`` (a ResNet block's ``relu(bn2(conv2(y)) + identity)``) becomes one
``batch_norm_relu`` call with the residual.

Each user-defined module that holds a fusable batch norm as a direct child is traced with
``torch.fx`` (its children as leaves, so their hooks and their own forwards are kept). The
patterns ``bn -> relu`` and ``bn -> add -> relu`` in that graph (``nn.ReLU``,
``F.relu``, ``torch.relu``, ``Tensor.relu`` and their in-place forms; ``+``, ``+=``,
``torch.add``, ``Tensor.add``/``add_``) are replaced by one call
``bn(x, residual, relu=True)``, and the module's ``forward`` becomes the rewritten graph's.
The batch norm's class becomes ``FusedBatchNorm*d``, which is the same batch norm when
called as one (``bn(x)``), so code that still calls it so stays correct.
"""
import inspect
import operator
import types
import warnings

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from bncpu.torch import functional
from bncpu.torch._modules import BatchNorm1d, BatchNorm2d, BatchNorm3d


class _FusedForward:
    """A batch norm that the rewritten forward of the module holding it calls as
    ``relu(bn(x) + residual)``; called as ``bn(x)``, a batch norm."""

    def forward(self, input, residual=None, *, relu=False, add_inplace=False):
        if not relu:
            return super().forward(input)
        self._check_input_dim(input)
        running_mean, running_var, training, momentum = self._call_arguments()
        if residual is None or (isinstance(residual, torch.Tensor)
                                and residual.shape == input.shape
                                and residual.dtype == input.dtype
                                and residual.device == input.device):
            return functional.batch_norm_relu(input, running_mean, running_var, self.weight,
                                              self.bias, training, momentum, self.eps,
                                              residual=residual)
        # A residual that broadcasts or promotes: the add as the original graph did it.
        output = functional.batch_norm(input, running_mean, running_var, self.weight,
                                       self.bias, training, momentum, self.eps)
        return torch.relu(output.add_(residual) if add_inplace else output + residual)


class FusedBatchNorm1d(_FusedForward, BatchNorm1d):
    """bncpu's BatchNorm1d, fused with the ReLU (and add) after it by the module's forward."""


class FusedBatchNorm2d(_FusedForward, BatchNorm2d):
    """bncpu's BatchNorm2d, fused with the ReLU (and add) after it by the module's forward."""


class FusedBatchNorm3d(_FusedForward, BatchNorm3d):
    """bncpu's BatchNorm3d, fused with the ReLU (and add) after it by the module's forward."""


FUSED = {BatchNorm1d: FusedBatchNorm1d, BatchNorm2d: FusedBatchNorm2d,
         BatchNorm3d: FusedBatchNorm3d}

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add: False, operator.iadd: True, torch.add: False}
_ADD_METHODS = {"add": False, "add_": True}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def has_hooks(module):
    return any(getattr(module, name, None) for name in HOOK_DICTS)


def _is_relu_of(node, source, root):
    """Whether ``node`` is ``relu(source)`` in any of its spellings."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return (type(module) is nn.ReLU and not has_hooks(module) and len(node.args) == 1
                and not node.kwargs)
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    return (node.op == "call_method" and node.target in _RELU_METHODS
            and len(node.args) == 1 and not node.kwargs)


def _residual_of(node, source):
    """(residual, in place) when ``node`` adds a tensor to ``source`` (the batch norm's
    output), else None. An in-place add must write into ``source``: one writing into the
    residual changes a tensor that others may read."""
    if node.op == "call_function":
        inplace = _ADD_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        inplace = _ADD_METHODS.get(node.target)
    else:
        return None
    if inplace is None or len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    residual = second if first is source else first
    if (not isinstance(residual, fx.Node) or residual is source
            or (inplace and first is not source)):
        return None
    return residual, inplace


def _may_write(node, root):
    """Whether ``node`` may write into a tensor it is given (an in-place call)."""
    if node.op == "call_method":
        return node.target.endswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_FUNCTIONS or name.endswith("_")
                or bool(node.kwargs.get("inplace")) or "out" in node.kwargs)
    if node.op == "call_module":
        # A user-defined module may write into its input; torch.nn's do when inplace=True.
        return any(not _is_builtin(module) or getattr(module, "inplace", False)
                   for module in root.get_submodule(node.target).modules())
    return False


def _fuse_graph(graph, root, candidates):
    """Rewrite each fusable pattern in ``graph`` (of module ``root``) whose batch norm is
    the child named in ``candidates`` and called once; the names fused."""
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in candidates:
            calls.setdefault(node.target, []).append(node)
    fused = []
    for name, nodes in calls.items():
        if len(nodes) != 1:
            continue
        order = {node: index for index, node in enumerate(graph.nodes)}
        norm = nodes[0]
        if len(norm.args) != 1 or norm.kwargs or len(norm.users) != 1:
            continue
        user = next(iter(norm.users))
        residual, add_inplace, last = None, False, user
        if not _is_relu_of(user, norm, root):
            found = _residual_of(user, norm)
            if found is None or len(user.users) != 1:
                continue
            residual, add_inplace = found
            last = next(iter(user.users))
            if not _is_relu_of(last, user, root):
                continue
        # The fused call runs where both its inputs exist: it reads the batch norm's input
        # later and the residual earlier than the original did, so nothing between the
        # batch norm and the add may write into a tensor.
        anchor = residual if residual is not None and order[residual] > order[norm] else norm
        if any(_may_write(node, root) for node in graph.nodes
               if order[norm] < order[node] < order[user]):
            continue
        with graph.inserting_after(anchor):
            call = graph.call_module(name, (norm.args[0], residual),
                                     {"relu": True, "add_inplace": add_inplace})
        last.replace_all_uses_with(call)
        for node in (last, user) if user is not last else (last,):
            graph.erase_node(node)
        graph.erase_node(norm)
        fused.append(name)
    return fused


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf."""

    def __init__(self, root):
        super().__init__()
        self.traced_root = root

    def is_leaf_module(self, module, qualified_name):
        return module is not self.traced_root


def _trace(module):
    """The graph of ``module.forward``; raises when it cannot be traced or depends on
    ``self.training`` (a traced graph keeps the branch taken)."""
    if "forward" in vars(module):
        raise TypeError("its forward is an instance attribute")
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.default is not p.empty or p.kind is not p.POSITIONAL_OR_KEYWORD
           for p in parameters):
        # fx traces each argument as a tensor: `if mask is None` would keep one branch.
        raise TypeError("its forward takes optional or variadic arguments")
    training = module.training
    try:
        graphs = []
        for mode in (training, not training):
            module.training = mode
            graphs.append(_ChildrenAsLeaves(module).trace(module))
    finally:
        module.training = training
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise TypeError("its forward depends on self.training")
    return graphs[0]


def _is_builtin(module):
    """torch.nn's and bncpu's own modules: their forwards are left as they are (an
    nn.Sequential's pairs are fused by module swapping)."""
    return type(module).__module__.startswith(("torch.", "bncpu."))


def fuse_graphs(model, uses):
    """Fuse batch norm -> (add) -> ReLU in the forward of every user-defined module of
    ``model``; ``uses`` counts the places each module (by id) is held. A module that
    cannot be traced is left as it is, with a warning naming it."""
    for qualified_name, module in list(model.named_modules()):
        candidates = {name for name, child in module.named_children()
                      if type(child) in FUSED and uses[id(child)] == 1
                      and not has_hooks(child)}
        if not candidates or _is_builtin(module):
            continue
        try:
            graph = _trace(module)
        except Exception as error:  # noqa: BLE001 (fx raises many kinds; all mean "untraceable")
            warnings.warn(
                f"convert(fuse=True): {qualified_name or 'the model'!r} "
                f"({type(module).__name__}) could not be traced with torch.fx "
                f"({type(error).__name__}: {error}); the batch norms its forward calls "
                "stay unfused", stacklevel=3)
            continue
        fused = _fuse_graph(graph, module, candidates)
        if not fused:
            continue
        for name in fused:
            child = module.get_submodule(name)
            child.__class__ = FUSED[type(child)]
        graph.lint()
        traced = fx.GraphModule(module, graph)
        # The generated forward refers to children and attributes by their names, which
        # are module's own: bound to module, it runs on the same parameters and hooks.
        module.forward = types.MethodType(type(traced).forward, module)
