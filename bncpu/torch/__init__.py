"""bncpu inside PyTorch: custom operators, torch.nn.functional-style functions, drop-in
modules and model conversion. Importing this module imports torch; ``import bncpu`` never
does.

* ``torch.ops.bncpu.*``: the kernels as custom operators (``torch.library``), with fake
  kernels and autograd, so they run in eager mode, show as ``bncpu::...`` in the profiler
  and trace under ``torch.compile(fullgraph=True)``.
* ``batch_norm``, ``layer_norm``, ``group_norm``, ``instance_norm``, ``rms_norm`` (and
  ``batch_norm_relu``) with ``torch.nn.functional``'s signatures.
* ``BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``, ``InstanceNorm1d/2d/3d``,
  ``RMSNorm``: subclasses of torch.nn's; ``BatchNormReLU1d/2d/3d`` fused.
* ``convert(module, inplace=False, fuse=False)``, ``fold(model, inplace=False)``; with
  ``fuse=True`` a torch.fx pass also fuses ``bn -> relu`` and ``bn -> add -> relu`` written
  in a module's ``forward`` (a ResNet block) into ``FusedBatchNorm1d/2d/3d``.
* ``fallback_counts()``: calls that ran torch's own operator (non-CPU, bfloat16/float16,
  double backward, forward-mode AD, torch.func, ...), by function and reason; also logged
  at DEBUG on ``bncpu.torch``.

A plain eager call runs the kernels outside torch's dispatcher; anything that records,
traces or intercepts calls (jit tracing, torch.compile, the profiler, modes, subclasses)
gets the operators (``_route.eager_fast_path``; docs/torch.md, "When the eager fast path
runs").
"""
import torch as _torch  # noqa: F401  (the point of this module; fails early without PyTorch)

from bncpu.torch import _autograd  # noqa: F401  (registers torch.ops.bncpu.*)
from bncpu.torch._fallback import fallback_counts, reset_fallback_counts
from bncpu.torch.functional import (
    batch_norm, batch_norm_relu, group_norm, instance_norm, layer_norm, rms_norm,
)
from bncpu.torch._modules import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d,
    GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, RMSNorm,
)
from bncpu.torch._convert import convert, fold
from bncpu.torch._fuse import FusedBatchNorm1d, FusedBatchNorm2d, FusedBatchNorm3d
from bncpu.torch._sync import SyncBatchNorm, convert_sync_batchnorm

__all__ = [
    "batch_norm", "batch_norm_relu", "group_norm", "instance_norm", "layer_norm", "rms_norm",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
    "BatchNormReLU3d", "FusedBatchNorm1d", "FusedBatchNorm2d", "FusedBatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "LayerNorm", "RMSNorm", "SyncBatchNorm", "convert", "convert_sync_batchnorm", "fold",
    "fallback_counts", "reset_fallback_counts",
]
