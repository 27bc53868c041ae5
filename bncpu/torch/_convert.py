"""Model surgery: ``convert`` swaps torch.nn's norm modules for bncpu's (optionally fusing
batch norm + ReLU; the torch.fx pass is in ``_fuse``), ``fold`` folds evaluation-mode batch
norms into the convolution or linear layer before them."""
import collections
import copy
import warnings

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

import bncpu
from bncpu.torch._fuse import HOOK_DICTS, fuse_graphs, has_hooks
from bncpu.torch._modules import FUSED_RELU, REPLACEMENTS, BatchNorm1d, BatchNorm2d, BatchNorm3d


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
    deep copy and leaves ``module`` alone.

    With ``fuse=True``, batch norm + ReLU (and a residual add between them) run as one
    ``batch_norm_relu`` call, with the same parameters and state_dict keys:

    * in an ``nn.Sequential``, a batch norm directly followed by ``nn.ReLU`` becomes one
      ``BatchNormReLU{1,2,3}d`` and the ReLU an ``nn.Identity``;
    * in the ``forward`` of a user-defined module, traced with ``torch.fx``,
      ``relu(bn(x))`` and ``relu(bn(x) + residual)`` (any spelling: ``nn.ReLU``,
      ``F.relu``, ``torch.relu``, ``+``/``+=``/``torch.add``/``add_``) become one call of
      the batch norm (then a ``FusedBatchNorm{1,2,3}d``), and that module's ``forward``
      the rewritten graph's. A module whose forward cannot be traced, or takes optional
      or variadic arguments, is left unfused, with a warning naming it. Like any fx graph, the rewritten forward keeps the Python
      branches taken at conversion (forwards that depend on ``self.training`` are not
      rewritten). The rewritten forward is an attribute of the module: a whole-model
      pickle (``torch.save(model)``) loads with the class's forward, correct but unfused.

    A batch norm with hooks, one used at more than one place, or one whose output is used
    elsewhere too, is left unfused, and so is a ReLU with hooks.
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
                    and not has_hooks(norm) and not has_hooks(relu)):
                norm.__class__ = FUSED_RELU[type(norm)]
                sequential[index + 1] = nn.Identity()
        fuse_graphs(module, uses)
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


def _float64(tensor):
    """A parameter or buffer as a float64 NumPy array (bfloat16 and float16 included)."""
    return None if tensor is None else tensor.detach().to("cpu", torch.float64).numpy()


# The hooks of torch.nn.utils.weight_norm and spectral_norm (the older, hook-based forms)
# recompute the weight before each forward; removing one bakes the current weight.
_WEIGHT_HOOKS = {WeightNorm: torch.nn.utils.remove_weight_norm,
                 SpectralNorm: torch.nn.utils.remove_spectral_norm}


def _weight_hooks(layer):
    """(removal function, tensor name) of each weight-recomputing hook of ``layer``, or None
    when ``layer`` has some other hook, which folding would silently bypass."""
    removals = []
    for hooks in (getattr(layer, name) for name in HOOK_DICTS):
        for hook in hooks.values():
            remove = _WEIGHT_HOOKS.get(type(hook))
            if remove is None or hooks is not layer._forward_pre_hooks:
                return None
            removals.append((remove, hook.name))
    return removals


def _bake(layer, removals):
    """Replace the weight recomputed by a parametrization or hook by its current value, so
    that the folded value is what the layer uses."""
    for remove, name in removals:
        remove(layer, name)
    if parametrize.is_parametrized(layer):
        # torch removes the parametrization's property from the module's class, which a
        # deep copy shares with the original: give this module a class of its own first.
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
        for name in list(layer.parametrizations):
            parametrize.remove_parametrizations(layer, name, leave_parametrized=True)


def _fold_pair(layer, norm):
    """Fold ``norm`` into ``layer`` in float64, writing the results in the layer's dtype
    and on its device."""
    weight, bias = bncpu.fold_batch_norm(
        _float64(layer.weight), _float64(layer.bias), _float64(norm.running_mean),
        _float64(norm.running_var), _float64(norm.weight), _float64(norm.bias), norm.eps)
    like = dict(dtype=layer.weight.dtype, device=layer.weight.device)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight).to(**like))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.from_numpy(bias).to(**like),
                                      requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(torch.from_numpy(bias).to(**like))


def fold(model, inplace=False):
    """Fold each evaluation-mode batch norm into the Conv1d/2d/3d or Linear layer directly
    before it in an ``nn.Sequential`` (``bncpu.fold_batch_norm``, float64 arithmetic): the
    layer's weight and bias become ``weight·scale`` and ``(bias - running_mean)·scale +
    bn_bias`` with ``scale = bn_weight/sqrt(running_var + eps)``, and the batch norm an
    ``nn.Identity``. The model must be in evaluation mode (``model.eval()``). Linear ->
    BatchNorm1d is folded as the pair is used on (N, features) input. Layers or norms used
    at more than one place are left alone. ``inplace=False`` folds a deep copy.

    The results are cast to the layer's dtype and device (float16 and bfloat16 included;
    a bias the layer lacked is created so). A layer whose weight is parametrized
    (``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm``, or the older
    hook-based ``weight_norm``/``spectral_norm``) gets its current weight baked in as a
    plain parameter, then folded. A pair where either module has any other hook is left
    unfolded, with a warning naming it.
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
    names = {id(m): name for name, m in model.named_modules()}
    for sequential, index in _adjacent_pairs(model):
        layer, norm = sequential[index], sequential[index + 1]
        if not (isinstance(layer, nn.Module) and getattr(layer, "weight", None) is not None
                and _foldable(layer, norm) and uses[id(layer)] == 1 and uses[id(norm)] == 1):
            continue
        removals = _weight_hooks(layer)
        if removals is None or has_hooks(norm):
            warnings.warn(f"fold: {names[id(layer)]!r} ({type(layer).__name__}) -> "
                          f"{names[id(norm)]!r} ({type(norm).__name__}) left unfolded: a "
                          "hook on either would no longer see what it sees now",
                          stacklevel=2)
            continue
        _bake(layer, removals)
        _fold_pair(layer, norm)
        sequential[index + 1] = nn.Identity()
    return model
