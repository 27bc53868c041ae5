"""The torch backend: bncpu.torch's functions (torch.library operators with autograd).

They follow torch.nn.functional: channels on dim 1 and the running variance updated with
the unbiased batch variance. Channels elsewhere (Keras's channels-last default) are moved
to dim 1 as a view, which bncpu.torch reads without a copy when the channels end up
last in memory. Keras keeps the biased variance, recovered here from the update, which is
linear in the batch variance v over the M values of a channel:
``unbiased = (1 - m)·old + m·v·M/(M - 1)``, so ``biased = kept + (unbiased - kept)·(M - 1)/M``
with ``kept = (1 - m)·old``.
"""
import math

from bncpu.torch import functional as F


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, unbiased_running_var=True):
    axis %= x.dim()
    new_mean = running_mean.detach().clone()
    new_var = running_var.detach().clone()
    y = F.batch_norm(x.movedim(axis, 1), new_mean, new_var, weight, bias, training, momentum,
                     eps)
    if training and not unbiased_running_var:
        count = math.prod(x.shape) // x.shape[axis]
        kept = (1.0 - momentum) * running_var.detach()
        new_var = kept + (new_var - kept) * ((count - 1) / count)
    return y.movedim(1, axis), new_mean, new_var


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1):
    axis %= x.dim()
    return F.group_norm(x.movedim(axis, 1), num_groups, weight, bias, eps).movedim(1, axis)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    return F.rms_norm(x, tuple(normalized_shape), weight, eps)
