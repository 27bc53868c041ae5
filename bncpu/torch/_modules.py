"""torch.nn's normalization modules with their forward computed by bncpu.

Each class subclasses torch.nn's own (``isinstance``, ``state_dict``, hooks, ``repr``,
``train()``/``eval()``, ``momentum=None``, ``num_batches_tracked`` are torch's) and only
replaces the call to ``torch.nn.functional`` with bncpu's. They hold no state of their
own, which is what lets ``bncpu.torch.convert`` swap the class of an existing module.

Under ``torch.jit.script`` the module's own logic (momentum, buffers, input checks) is
compiled and the call to bncpu stays a Python call (``torch.jit.ignore``): the scripted
module computes what the eager one does, in a Python process (it cannot be saved and
loaded without Python; trace it for that).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from bncpu.torch import functional


class _BatchNormForward:
    """forward of torch's _BatchNorm (same momentum, num_batches_tracked and buffer
    rules), normalizing through ``self._normalize``."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor = self._call_arguments()
        return self._normalize(input, running_mean, running_var, use_batch_stats, factor)

    def _call_arguments(self) -> Tuple[Optional[Tensor], Optional[Tensor], bool, float]:
        """(running_mean, running_var, use_batch_stats, momentum) of this call; counts
        the batch in num_batches_tracked when training, as torch's _BatchNorm does."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:   # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        # Batch statistics in training, and in evaluation when there are no buffers;
        # buffers are passed when they are updated or used.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        return (self.running_mean if keep else None, self.running_var if keep else None,
                use_batch_stats, factor)

    @torch.jit.ignore
    def _normalize(self, input: Tensor, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], training: bool, momentum: float) -> Tensor:
        return functional.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                     training, momentum, self.eps)


class _BatchNormReLUForward(_BatchNormForward):
    """relu(batch_norm(x)) in one bncpu call; made by ``convert(model, fuse=True)`` from a
    batch norm followed by nn.ReLU. Same parameters, buffers and state_dict keys as the
    batch norm it replaces."""

    @torch.jit.ignore
    def _normalize(self, input: Tensor, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], training: bool, momentum: float) -> Tensor:
        return functional.batch_norm_relu(input, running_mean, running_var, self.weight,
                                          self.bias, training, momentum, self.eps)


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by bncpu."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by bncpu."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by bncpu."""


class BatchNormReLU1d(_BatchNormReLUForward, BatchNorm1d):
    """BatchNorm1d followed by ReLU, fused: one bncpu call forward and backward."""


class BatchNormReLU2d(_BatchNormReLUForward, BatchNorm2d):
    """BatchNorm2d followed by ReLU, fused: one bncpu call forward and backward."""


class BatchNormReLU3d(_BatchNormReLUForward, BatchNorm3d):
    """BatchNorm3d followed by ReLU, fused: one bncpu call forward and backward."""


class _InstanceNormForward:
    """torch's _InstanceNorm keeps its forward (checks, unbatched input) and calls this."""

    @torch.jit.ignore
    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        return functional.instance_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0, self.eps)


class InstanceNorm1d(_InstanceNormForward, nn.InstanceNorm1d):
    """torch.nn.InstanceNorm1d computed by bncpu."""


class InstanceNorm2d(_InstanceNormForward, nn.InstanceNorm2d):
    """torch.nn.InstanceNorm2d computed by bncpu."""


class InstanceNorm3d(_InstanceNormForward, nn.InstanceNorm3d):
    """torch.nn.InstanceNorm3d computed by bncpu."""


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm computed by bncpu."""

    @torch.jit.ignore
    def forward(self, input: Tensor) -> Tensor:
        return functional.layer_norm(input, self.normalized_shape, self.weight, self.bias,
                                     self.eps)


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm computed by bncpu."""

    @torch.jit.ignore
    def forward(self, input: Tensor) -> Tensor:
        return functional.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """torch.nn.RMSNorm computed by bncpu."""

    @torch.jit.ignore
    def forward(self, input: Tensor) -> Tensor:
        return functional.rms_norm(input, self.normalized_shape, self.weight, self.eps)


# torch.nn's class -> bncpu's, for convert; fused classes for convert(fuse=True).
REPLACEMENTS = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d, nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d,
    nn.LayerNorm: LayerNorm, nn.GroupNorm: GroupNorm, nn.RMSNorm: RMSNorm,
}
FUSED_RELU = {BatchNorm1d: BatchNormReLU1d, BatchNorm2d: BatchNormReLU2d,
              BatchNorm3d: BatchNormReLU3d}
