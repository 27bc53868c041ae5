"""The autograd formulas of the forward operators, one backward per family, and the
single entry that runs a forward operator (``forward``).

Each family has one ``setup_context`` and one backward, used twice: registered as the
operator's autograd (``torch.library.register_autograd``: through the dispatcher) and
as an ``autograd.Function`` for plain eager calls (see ``_route.eager_fast_path``),
whose forward runs the eager fast path's kernel (``_eager``) when it takes the
arguments, else the operator's CPU kernel. The backward runs the backward kernel of the
same path as the forward (``ctx.arrays``). A backward asked for with a graph
(``create_graph=True``) is recomputed with torch's function, differentiable.
"""
import torch
import torch.nn.functional as F

from bncpu.torch import _eager, _fallback
from bncpu.torch._library import OPERATORS, register_autograd
from bncpu.torch._route import eager_fast_path


def _run(ctx, name, *args):
    """The backward operator ``bncpu::<name>`` on ``args``: the fast path's kernel on the
    forward's views when the forward took it, else the operator (or its CPU kernel where
    the rule allows)."""
    arrays = getattr(ctx, "arrays", None)
    if arrays is not None:
        return _eager.KERNELS[name](*args, arrays=arrays)
    operator, kernel = OPERATORS[name]
    return kernel(*args) if eager_fast_path(args) else operator(*args)


def _bias_grad(grad_bias, weight, bias, grad_output, channel_dims):
    """grad_bias from the backward operator, or Σ grad_output when bias comes without weight
    (the kernels give the parameter gradients only with a weight)."""
    if bias is None or not bias.requires_grad:
        return None
    if weight is not None:
        return grad_bias
    dims = [d for d in range(grad_output.dim()) if d not in channel_dims]
    return grad_output.sum(dim=dims) if dims else grad_output


def _non_differentiable(ctx, statistics):
    """Mark the operator's statistics outputs (None on the fast path, where they are not
    outputs) non-differentiable."""
    if statistics[0] is not None:
        ctx.mark_non_differentiable(*statistics)


def _optional(grad, tensor):
    """``grad`` for a parameter that is present, None for one that is absent."""
    return None if tensor is None else grad


# ----------------------------------------------------------------------------------
# Batch norm, and relu(batch_norm(x) + residual): one family
# ----------------------------------------------------------------------------------
def _batch_norm_setup(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, training, _, eps = inputs[:8]
    residual = inputs[8] if len(inputs) > 8 else None
    ctx.relu = len(inputs) > 8
    running = (None, None) if training else (running_mean, running_var)
    ctx.save_for_backward(input, weight, bias, *running, output[1], output[2],
                          output[0] if ctx.relu else None, residual)
    _non_differentiable(ctx, output[1:])
    ctx.training, ctx.eps = training, eps


def _batch_norm_grad(ctx, grad_output, *_):
    (input, weight, bias, running_mean, running_var, save_mean, save_invstd, output,
     residual) = ctx.saved_tensors
    if torch.is_grad_enabled():
        def torch_forward(x, w, b, r):
            y = F.batch_norm(x, running_mean, running_var, w, b, ctx.training, 0.0, ctx.eps)
            return torch.relu(y if r is None else y + r) if ctx.relu else y
        grad_input, grad_weight, grad_bias, grad_residual = _fallback.double_backward(
            "batch_norm_relu" if ctx.relu else "batch_norm", torch_forward,
            (input, weight, bias, residual), grad_output)
    elif ctx.relu:
        residual_grad = residual is not None and residual.requires_grad
        grad_input, grad_weight, grad_bias, grad_residual = _run(
            ctx, "batch_norm_relu_backward", grad_output, output, input, weight, running_mean,
            running_var, save_mean, save_invstd, ctx.training, ctx.eps,
            residual_grad or (bias is not None and weight is None))
        # (the bias's gradient is the residual's: both are added after the normalization)
        grad_bias = _bias_grad(grad_bias, weight, bias, grad_residual, (1,))
        grad_residual = grad_residual if residual_grad else None
    else:
        grad_input, grad_weight, grad_bias = _run(
            ctx, "batch_norm_backward", grad_output, input, weight, running_mean, running_var,
            save_mean, save_invstd, ctx.training, ctx.eps)
        grad_bias = _bias_grad(grad_bias, weight, bias, grad_output, (1,))
        grad_residual = None
    grads = (grad_input, _optional(grad_weight, weight), grad_bias, None, None, None, None,
             None)
    return (*grads, grad_residual) if ctx.relu else grads


# ----------------------------------------------------------------------------------
# Layer norm and RMS norm
# ----------------------------------------------------------------------------------
def _layer_norm_setup(ctx, inputs, output):
    input, normalized_shape, weight, bias, eps = inputs
    ctx.save_for_backward(input, weight, bias, output[1], output[2])
    _non_differentiable(ctx, output[1:])
    ctx.normalized_shape, ctx.eps = normalized_shape, eps


def _layer_norm_grad(ctx, grad_output, *_):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grad_input, grad_weight, grad_bias = _fallback.double_backward(
            "layer_norm",
            lambda x, w, b: F.layer_norm(x, ctx.normalized_shape, w, b, ctx.eps),
            (input, weight, bias), grad_output)
    else:
        grad_input, grad_weight, grad_bias = _run(
            ctx, "layer_norm_backward", grad_output, input, ctx.normalized_shape, mean, rstd,
            weight)
        normalized_dims = range(input.dim() - len(ctx.normalized_shape), input.dim())
        grad_weight = _optional(grad_weight, weight)
        grad_bias = _bias_grad(grad_bias, weight, bias, grad_output, normalized_dims)
    return grad_input, None, grad_weight, grad_bias, None


def _rms_norm_setup(ctx, inputs, output):
    input, normalized_shape, weight, eps = inputs
    ctx.save_for_backward(input, weight, output[1])
    _non_differentiable(ctx, output[1:])
    ctx.normalized_shape, ctx.eps = normalized_shape, eps


def _rms_norm_grad(ctx, grad_output, *_):
    input, weight, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grad_input, grad_weight = _fallback.double_backward(
            "rms_norm", lambda x, w: F.rms_norm(x, ctx.normalized_shape, w, ctx.eps),
            (input, weight), grad_output)
    else:
        grad_input, grad_weight = _run(ctx, "rms_norm_backward", grad_output, input,
                                       ctx.normalized_shape, rstd, weight)
        grad_weight = _optional(grad_weight, weight)
    return grad_input, None, grad_weight, None


# ----------------------------------------------------------------------------------
# Group norm, and instance norm with the input's statistics
# ----------------------------------------------------------------------------------
def _group_norm_setup(ctx, inputs, output):
    input, num_groups, weight, bias, eps = inputs
    ctx.save_for_backward(input, weight, bias, output[1], output[2])
    _non_differentiable(ctx, output[1:])
    ctx.num_groups, ctx.eps = num_groups, eps


def _group_norm_grad(ctx, grad_output, *_):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grad_input, grad_weight, grad_bias = _fallback.double_backward(
            "group_norm", lambda x, w, b: F.group_norm(x, ctx.num_groups, w, b, ctx.eps),
            (input, weight, bias), grad_output)
    else:
        grad_input, grad_weight, grad_bias = _run(
            ctx, "group_norm_backward", grad_output, input, ctx.num_groups, mean, rstd, weight)
        grad_weight = _optional(grad_weight, weight)
        grad_bias = _bias_grad(grad_bias, weight, bias, grad_output, (1,))
    return grad_input, None, grad_weight, grad_bias, None


def _instance_norm_setup(ctx, inputs, output):
    input, weight, bias, _, _, _, eps = inputs
    ctx.save_for_backward(input, weight, bias, output[1], output[2])
    _non_differentiable(ctx, output[1:])
    ctx.eps = eps


def _instance_norm_grad(ctx, grad_output, *_):
    input, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():
        grad_input, grad_weight, grad_bias = _fallback.double_backward(
            "instance_norm",
            lambda x, w, b: F.instance_norm(x, None, None, w, b, True, 0.0, ctx.eps),
            (input, weight, bias), grad_output)
    else:
        grad_input, grad_weight, grad_bias = _run(
            ctx, "instance_norm_backward", grad_output, input, mean, rstd, weight)
        grad_weight = _optional(grad_weight, weight)
        grad_bias = _bias_grad(grad_bias, weight, bias, grad_output, (1,))
    return grad_input, grad_weight, grad_bias, None, None, None, None


# ----------------------------------------------------------------------------------
# Registration, and the eager twin of each forward operator
# ----------------------------------------------------------------------------------
_FORMULAS = {   # forward operator -> (setup_context, backward)
    "batch_norm_forward": (_batch_norm_setup, _batch_norm_grad),
    "batch_norm_relu_forward": (_batch_norm_setup, _batch_norm_grad),
    "layer_norm_forward": (_layer_norm_setup, _layer_norm_grad),
    "rms_norm_forward": (_rms_norm_setup, _rms_norm_grad),
    "group_norm_forward": (_group_norm_setup, _group_norm_grad),
    "instance_norm_forward": (_instance_norm_setup, _instance_norm_grad),
}


def _write_running(name, args, outputs):
    """Copy the new running statistics that a training forward of batch norm, or any of
    instance norm, returns (outputs 3 and 4) into the running statistics (arguments 3
    and 4), after the kernel succeeded; the fast path returns None there, having updated
    them in place."""
    if name == "instance_norm_forward" or (name.startswith("batch_norm") and args[5]):
        for running, new in zip(args[3:5], outputs[3:5]):
            if running is not None and new is not None:
                running.copy_(new)


def _eager_forward(name):
    """(the forward operator's kernel for a plain eager call: the fast path's where it
    takes the arguments, else the CPU kernel's, running statistics updated; its
    autograd.Function, which returns the output alone)."""
    setup_context, backward = _FORMULAS[name]
    direct_kernel, kernel = _eager.KERNELS.get(name), OPERATORS[name][1]

    def run(*args):
        """(the operator's results, the fast path's NumPy views or None when the CPU
        kernel computed them)."""
        if direct_kernel is not None:
            result = direct_kernel(*args)
            if result is not None:
                return result
        outputs = kernel(*args)
        _write_running(name, args, outputs)
        return outputs, None

    def function_forward(ctx, *args):
        # (forward with ctx, not a separate setup_context: Function.apply binds the
        # arguments with inspect.signature on every call for the latter; and one output,
        # not the operator's five: each output costs apply several microseconds)
        outputs, ctx.arrays = run(*args)
        setup_context(ctx, args, outputs)
        return outputs[0]

    function = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(function_forward), "backward": staticmethod(backward)})
    return run, function.apply


for _name, (_setup_context, _backward) in _FORMULAS.items():
    register_autograd(_name, _backward, _setup_context)
_EAGER = {name: _eager_forward(name) for name in _FORMULAS}


def forward(name, *args):
    """The output of the forward operator ``bncpu::<name>`` on ``args`` (input first),
    its running statistics (if any) updated: through the dispatcher unless
    ``eager_fast_path`` allows a plain eager call, which runs the kernel with the
    family's autograd formulas as an ``autograd.Function``, or the kernel alone when no
    gradient is wanted."""
    if not eager_fast_path(args):
        outputs = OPERATORS[name][0](*args)
        _write_running(name, args, outputs)
        return outputs[0]
    run, apply = _EAGER[name]
    if torch.is_grad_enabled():
        for arg in args:   # (a loop, not any() over a generator: this runs on every call)
            if isinstance(arg, torch.Tensor) and arg.requires_grad:
                return apply(*args)
    return run(*args)[0][0]
