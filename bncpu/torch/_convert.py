"""Model surgery: ``convert`` swaps torch.nn's norm modules for bncpu's (optionally fusing
batch norm + ReLU), ``fold`` folds evaluation-mode batch norms into the convolution or
linear layer before them."""
import collections
import copy

import torch
import torch.nn as nn

import bncpu
from bncpu.torch._modules import FUSED_RELU, REPLACEMENTS, BatchNorm1d, BatchNorm2d, BatchNorm3d

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _has_hooks(module):
    return any(getattr(module, name, None) for name in _HOOK_DICTS)


def _uses(model):
    """How many places of the model hold each module (by id)."""
    return collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _adjacent_pairs(model):
    """(sequential, index) of each pair sequential[index], sequential[index + 1]."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for index in range(len(module) - 1):
                yield module, index


def convert(module, inplace=False, fuse=False):
    """``module`` with every torch.nn norm module (BatchNorm1d/2d/3d, LayerNorm, GroupNorm,
    InstanceNorm1d/2d/3d, RMSNorm; exactly those classes, not subclasses of them) computed
    by bncpu.

    The modules keep their parameters, buffers, ``requires_grad``, hooks, training mode and
    sharing: only their class changes to the bncpu subclass. ``inplace=False`` converts a
    deep copy and leaves ``module`` alone. With ``fuse=True``, a batch norm directly followed
    by ``nn.ReLU`` in an ``nn.Sequential`` becomes one ``BatchNormReLU{1,2,3}d`` (same
    parameters and state_dict keys) and the ReLU an ``nn.Identity``; pairs where either
    module has hooks, or the batch norm is used elsewhere too, are left unfused.
    Returns the converted module.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(module).__name__}")
    if not inplace:
        module = copy.deepcopy(module)
    for submodule in module.modules():
        replacement = REPLACEMENTS.get(type(submodule))
        if replacement is not None:
            submodule.__class__ = replacement
    if fuse:
        uses = _uses(module)
        for sequential, index in _adjacent_pairs(module):
            norm, relu = sequential[index], sequential[index + 1]
            if (type(norm) in FUSED_RELU and type(relu) is nn.ReLU and uses[id(norm)] == 1
                    and not _has_hooks(norm) and not _has_hooks(relu)):
                norm.__class__ = FUSED_RELU[type(norm)]
                sequential[index + 1] = nn.Identity()
    return module


_FOLD_PAIRS = (
    (nn.Linear, (nn.BatchNorm1d,)),
    (nn.Conv1d, (nn.BatchNorm1d,)),
    (nn.Conv2d, (nn.BatchNorm2d,)),
    (nn.Conv3d, (nn.BatchNorm3d,)),
)
_FOLDABLE_NORMS = {nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                   BatchNorm1d, BatchNorm2d, BatchNorm3d}


def _foldable(layer, norm):
    if type(norm) not in _FOLDABLE_NORMS or norm.running_mean is None or norm.training:
        return False
    if norm.num_features != layer.weight.shape[0]:
        return False
    if type(norm) is nn.SyncBatchNorm:
        return isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return any(isinstance(layer, kind) and isinstance(norm, norms) for kind, norms in _FOLD_PAIRS)


def _numpy(tensor):
    return None if tensor is None else tensor.detach().cpu().numpy()


def fold(model, inplace=False):
    """Fold each evaluation-mode batch norm into the Conv1d/2d/3d or Linear layer directly
    before it in an ``nn.Sequential`` (``bncpu.fold_batch_norm``, float64 arithmetic): the
    layer's weight and bias become ``weight·scale`` and ``(bias - running_mean)·scale +
    bn_bias`` with ``scale = bn_weight/sqrt(running_var + eps)``, and the batch norm an
    ``nn.Identity``. The model must be in evaluation mode (``model.eval()``). Linear ->
    BatchNorm1d is folded as the pair is used on (N, features) input. Layers or norms used
    at more than one place are left alone. ``inplace=False`` folds a deep copy.
    Returns the folded model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("fold needs a model in evaluation mode: call model.eval() first "
                         "(a training batch norm normalizes with batch statistics, which "
                         "cannot be folded)")
    if not inplace:
        model = copy.deepcopy(model)
    uses = _uses(model)
    for sequential, index in _adjacent_pairs(model):
        layer, norm = sequential[index], sequential[index + 1]
        if (isinstance(layer, nn.Module) and getattr(layer, "weight", None) is not None
                and _foldable(layer, norm) and uses[id(layer)] == 1 and uses[id(norm)] == 1):
            weight, bias = bncpu.fold_batch_norm(
                _numpy(layer.weight), _numpy(layer.bias), _numpy(norm.running_mean),
                _numpy(norm.running_var), _numpy(norm.weight), _numpy(norm.bias), norm.eps)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(weight))
                if layer.bias is None:
                    layer.bias = nn.Parameter(
                        torch.from_numpy(bias).to(layer.weight.device),
                        requires_grad=layer.weight.requires_grad)
                else:
                    layer.bias.copy_(torch.from_numpy(bias))
            sequential[index + 1] = nn.Identity()
    return model
