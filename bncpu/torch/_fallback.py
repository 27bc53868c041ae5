"""Calls that bncpu does not compute go to PyTorch's own operator; each one is counted
here and logged at DEBUG level on the ``bncpu.torch`` logger, so a slow path is never
silent.

=============================================  ===========================================
case                                           what runs
=============================================  ===========================================
input not on the CPU (CUDA, MPS, meta, ...)    torch's operator (``torch.nn.functional``)
input neither float32 nor float64 (bfloat16,   torch's operator
float16, integer)
weight, bias or running statistics of another  torch's operator (its own dtype rules and
dtype or device than the input                 errors)
a sparse or otherwise non-strided input        torch's operator
running statistics that require grad           torch's operator
forward-mode AD (dual tensors) or a           torch's operator (see ``_route``)
``torch.func`` transform (vmap, grad, jvp)
double backward (``create_graph=True``)        bncpu's forward; the backward is recomputed
                                               with torch's operator, differentiable
=============================================  ===========================================
"""
import collections
import logging

import torch

from bncpu.torch._route import transform_reason

_FLOAT32, _FLOAT64, _STRIDED = torch.float32, torch.float64, torch.strided
_log = logging.getLogger("bncpu.torch")
_counts = collections.Counter()


def fallback_counts():
    """How many calls went to PyTorch's operator, by (function, reason), since import or
    the last ``reset_fallback_counts()``."""
    return dict(_counts)


def reset_fallback_counts():
    """Set every fallback count back to zero."""
    _counts.clear()


def record(function, reason):
    """Count one call of ``function`` that runs torch's operator because of ``reason``."""
    _counts[(function, reason)] += 1
    _log.debug("bncpu.torch.%s: %s; running torch's operator", function, reason)


def reason(input, tensors, running=()):
    """Why bncpu cannot compute this call (a short phrase), or None when it can.

    ``tensors`` are the optional parameters (weight, bias, residual), ``running`` the
    optional running statistics; None entries are absent arguments.
    """
    if not isinstance(input, torch.Tensor):
        return "input is not a tensor"
    if not input.is_cpu:
        return f"{input.device.type} input"
    if input.layout is not _STRIDED:
        return f"{input.layout} input"
    dtype = input.dtype
    if dtype is not _FLOAT32 and dtype is not _FLOAT64:
        return f"{dtype} input"
    # (plain loops, no generators: this runs on every call, small inputs included)
    for group in (tensors, running):
        for tensor in group:
            if tensor is not None and not _like_input(tensor, dtype):
                return "parameters of another dtype or device than the input"
    for tensor in running:
        if tensor is not None and tensor.requires_grad:
            return "running statistics require grad"
    return transform_reason((input, *tensors, *running))


def _like_input(tensor, dtype):
    """Whether ``tensor`` is a strided CPU tensor of ``dtype``."""
    return (isinstance(tensor, torch.Tensor) and tensor.dtype is dtype and tensor.is_cpu
            and tensor.layout is _STRIDED)


def double_backward(function, torch_forward, inputs, grad_output):
    """Gradients of ``torch_forward(*inputs)`` for ``grad_output``, with a graph (for
    ``create_graph=True``): the backward of a bncpu operator when a higher derivative is
    asked for. Entries of ``inputs`` that are None or need no grad get None."""
    record(function, "double backward")
    needed = [tensor for tensor in inputs if tensor is not None and tensor.requires_grad]
    with torch.enable_grad():
        output = torch_forward(*inputs)
    grads = iter(torch.autograd.grad(output, needed, grad_output, create_graph=True,
                                     allow_unused=True))
    return tuple(next(grads) if tensor is not None and tensor.requires_grad else None
                 for tensor in inputs)
