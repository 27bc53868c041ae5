"""Stateful normalization layers with torch.nn's behaviour, on NumPy arrays.

``BatchNorm1d/2d/3d``, ``InstanceNorm1d/2d/3d``, ``GroupNorm``, ``LayerNorm`` and
``RMSNorm`` take torch.nn's constructor arguments (plus keyword-only ``dtype`` and, for
batch, instance and group norm, the channel axis ``axis``), keep torch's state
(``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``,
``training``), and follow its train/eval semantics. ``layer(x)`` returns a new array and
saves what ``layer.backward(grad_output)`` needs; the parameter gradients accumulate in
``grad_weight`` / ``grad_bias`` until ``zero_grad()``. ``state_dict()`` and
``load_state_dict()`` use torch's keys, so state moves between torch modules and these
layers both ways.
"""
from bncpu.nn._module import IncompatibleKeys, Module, StateDictError
from bncpu.nn._batch_norm import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)
from bncpu.nn._row_norm import GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "GroupNorm", "LayerNorm", "RMSNorm",
    "Module", "StateDictError", "IncompatibleKeys",
]
