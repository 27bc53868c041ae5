"""Every computing function of bncpu, with what the tests, the digest and the speed report
need to know about it: how to make its inputs, its NumPy twin, its PyTorch counterpart,
which of its arguments it writes in place, and which of its operations the report times.

    from bncpu._registry import FUNCTIONS
    spec = FUNCTIONS["batch_norm_forward"]
    args = spec.inputs((8, 3, 5, 5), np.float32, seed=0)      # a dict of arguments
    result = spec.call(args)                                  # bncpu's results, a tuple
    expected = spec.call_twin(args)                           # bncpu.reference's
    spec.torch_results(torch, args)                           # torch's (None: no CPU op)

A ``Function`` (every field by keyword):

  name       the public name (bncpu.<name>, bncpu.reference.<name>)
  family     batch_norm, layer_norm, group_norm, instance_norm, rms_norm, or fused (batch
             norm with ReLU and a residual, or folded into a layer: bncpu/_fused.py)
  params     argument names in call order; the keyword-only ones are also in ``keyword``
  generator  generator(draws, shape, dtype, options) -> {argument: value}: a valid call
             on an input of that shape (the function's own layout: (N, C, *spatial),
             (N, *spatial, C) for options.axis = -1, or rows); ``inputs`` calls it
  shapes     small shapes that reach the function's work modes, for the tests
  written    arguments it may write in place (running statistics)
  has_out    whether it takes out= (for the one result of the input's size)
  torch      torch(torch, args, tensor) -> a zero-argument callable running PyTorch's CPU
             counterpart (tensors made beforehand with ``tensor``), whose results compare
             with bncpu's; None when PyTorch has no CPU kernel for the operation
  bad        bad(args) -> [(what, args, twin_raises)]: invalid calls, each one argument
             spoiled; bncpu must raise ValueError/TypeError and write nothing (out=,
             written arguments), and so must the twin where twin_raises
  baseline   for a fused function, the function it extends (its cost alone is the
             yardstick of the fusion's)
  timed      the operations the speed report times (``Timed``), or
  not_timed  why it times none
(The one-result wrappers batch_norm, layer_norm, group_norm, instance_norm, rms_norm and
batch_norm_relu return the first result of their *_forward, which is listed.)
Every function's results are a tuple (a single array is wrapped), None where a result is
absent (e.g. grad_weight without weight).
This module imports NumPy only; torch comes in as an argument.
"""
import collections
import dataclasses
import functools

import numpy as np

import bncpu
from bncpu import reference

# The arguments of the input's size (the data, its gradient, the fused output and
# residual): what a kernel cannot avoid streaming through memory.
STREAMED = ("grad_output", "output", "input", "residual")


class Draws:
    """Where a generator's values come from: one random generator, drawn in order. A
    caller may hand a generator other draws with the same two methods: the digest's are
    keyed by name, the speed report's start on a cache line and are shared between cases.
    ``name`` says what the array is: x, dy, w, b, rm, rv, residual, layer_weight,
    layer_bias."""

    def __init__(self, seed=0):
        self._rng = np.random.default_rng(seed)

    def normal(self, name, shape, dtype, loc=0.0, scale=1.0):
        return self._rng.normal(loc, scale, size=shape).astype(dtype)

    def uniform(self, name, shape, dtype, low, high):
        return self._rng.uniform(low, high, size=shape).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Options:
    """What a generator may be asked for beyond shape and dtype (each applies where the
    function has it):

    affine           weight and bias given (False: None)
    axis             the channel axis: 1, or -1 for channels-last data
    training         batch norm's mode (training=False: evaluation)
    residual         the fused forward's residual input, and the gradient for it backward
    groups           group norm's num_groups (None: 2 when C is even, else 1)
    normalized_dims  layer and RMS norm: how many trailing dimensions are normalized
    """
    affine: bool = True
    axis: int = 1
    training: bool = True
    residual: bool = True
    groups: int = None
    normalized_dims: int = 1


@dataclasses.dataclass(frozen=True)
class Timed:
    """One operation of the speed report: ``key`` names it in case ids (and --cases),
    ``label`` in the table; ``options`` go to the function's generator."""
    key: str
    label: str
    options: dict = dataclasses.field(default_factory=dict)


def _tensor(torch, array):
    """A NumPy array as a tensor (None stays None)."""
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array))


@dataclasses.dataclass(frozen=True)
class Function:
    name: str
    family: str
    params: tuple
    generator: object
    shapes: tuple
    bad: object
    keyword: tuple = ()
    written: tuple = ()
    has_out: bool = False
    torch: object = None
    baseline: str = None
    timed: tuple = ()
    not_timed: str = None

    def __post_init__(self):
        if bool(self.timed) == bool(self.not_timed):
            raise ValueError(f"{self.name}: give the speed report's operations (timed) or "
                             f"say why it times none (not_timed), not both")

    def inputs(self, shape, dtype, seed=0, draws=None, **options):
        """A valid call's arguments for an input of ``shape``; ``options``: see Options."""
        return self.generator(draws or Draws(seed), tuple(shape), np.dtype(dtype),
                              Options(**options))

    def bind(self, args, out=None, twin=False):
        """bncpu.<name> (the twin's with ``twin``) bound to ``args``: a zero-argument
        callable returning what the function returns."""
        function = getattr(reference if twin else bncpu, self.name)
        positional = [args[p] for p in self.params if p not in self.keyword]
        keywords = {p: args[p] for p in self.keyword if p in args}
        if out is not None:
            keywords["out"] = out
        return functools.partial(function, *positional, **keywords)

    def call(self, args, out=None):
        """bncpu.<name>(**args), results as a tuple."""
        return _as_tuple(self.bind(args, out)())

    def call_twin(self, args):
        """bncpu.reference.<name>(**args), results as a tuple."""
        return _as_tuple(self.bind(args, twin=True)())

    def torch_call(self, torch, args, tensor=None):
        """PyTorch's counterpart bound to ``args`` (each array turned into a tensor by
        ``tensor(array)``, sharing memory where it can): a zero-argument callable, or
        None when PyTorch has no CPU kernel. Like bncpu, it updates the running
        statistics it is given in place."""
        if self.torch is None:
            return None
        return self.torch(torch, args, tensor or functools.partial(_tensor, torch))

    def torch_results(self, torch, args):
        """torch's results as NumPy arrays (None: no CPU counterpart)."""
        call = self.torch_call(torch, args)
        if call is None:
            return None
        return tuple(None if r is None else np.asarray(r.detach().numpy())
                     for r in _as_tuple(call()))

    def copy_args(self, args):
        """Arguments with the written ones copied (so two calls start alike)."""
        return {k: (v.copy() if k in self.written and v is not None else v)
                for k, v in args.items()}

    def updated(self, args):
        """The written arguments this call updates: none in evaluation mode."""
        if not args.get("training", args.get("use_input_stats", True)):
            return ()
        return tuple(name for name in self.written if args.get(name) is not None)

    def streamed(self, options=None):
        """Its arguments of the input's size, under the generator's ``options``."""
        options = Options(**(options or {}))
        return tuple(p for p in self.params
                     if p in STREAMED and (p != "residual" or options.residual))


def _as_tuple(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


# ----------------------------------------------------------------------------------
# Generators: generator(draws, shape, dtype, options) -> arguments
# ----------------------------------------------------------------------------------
EPS, MOMENTUM, RMS_EPS = 1e-5, 0.1, 1e-6


def _axis(o):
    """The axis argument, given only when it is not the default."""
    return {} if o.axis == 1 else {"axis": o.axis}


def _data(draws, shape, dtype):
    return draws.normal("x", shape, dtype, 0.5, 2.0)


def _grad(draws, shape, dtype):
    return draws.normal("dy", shape, dtype, 0.0, 1.0)


def _affine(draws, shape, dtype, o):
    """(weight, bias) of ``shape``, or (None, None) without affine."""
    if not o.affine:
        return None, None
    return draws.normal("w", shape, dtype, 1.0, 0.3), draws.normal("b", shape, dtype, 0.0, 1.0)


def _running(draws, c, dtype):
    return draws.normal("rm", c, dtype, 0.0, 1.0), draws.uniform("rv", c, dtype, 0.5, 2.0)


def _bn_forward(draws, shape, dtype, o):
    c = shape[o.axis]
    weight, bias = _affine(draws, c, dtype, o)
    running_mean, running_var = _running(draws, c, dtype)
    return dict(input=_data(draws, shape, dtype), weight=weight, bias=bias,
                running_mean=running_mean, running_var=running_var, training=o.training,
                momentum=MOMENTUM, eps=EPS, **_axis(o))


def _bn_backward(draws, shape, dtype, o):
    forward = _bn_forward(draws, shape, dtype, o)
    x, weight = forward["input"], forward["weight"]
    running_mean, running_var = forward["running_mean"], forward["running_var"]
    _, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, weight, forward["bias"], running_mean.copy(), running_var.copy(), True, MOMENTUM,
        EPS, **_axis(o))
    return dict(grad_output=_grad(draws, shape, dtype), input=x, weight=weight,
                running_mean=running_mean, running_var=running_var, save_mean=save_mean,
                save_invstd=save_invstd, training=o.training, eps=EPS, **_axis(o))


def _bn_relu_forward(draws, shape, dtype, o):
    args = _bn_forward(draws, shape, dtype, o)
    if o.residual:
        args["residual"] = draws.normal("residual", shape, dtype, 0.0, 1.0)
    return args


def _bn_relu_backward(draws, shape, dtype, o):
    forward = _bn_relu_forward(draws, shape, dtype, o)
    output, save_mean, save_invstd = bncpu.batch_norm_relu_forward(
        forward["input"], forward["weight"], forward["bias"], None, None, True, MOMENTUM, EPS,
        residual=forward.get("residual"), **_axis(o))
    return dict(grad_output=_grad(draws, shape, dtype), output=output, input=forward["input"],
                weight=forward["weight"], running_mean=forward["running_mean"],
                running_var=forward["running_var"], save_mean=save_mean,
                save_invstd=save_invstd, training=o.training, eps=EPS,
                residual_grad=o.residual, **_axis(o))


def _fold(draws, shape, dtype, o):
    """A layer weight of C = shape[1] output channels (the rest of the shape after them)
    and a batch norm of C channels."""
    c = shape[1]
    weight = draws.normal("layer_weight", (c,) + (shape[2:] or shape[:1]), dtype, 0.5, 2.0)
    bn_weight, bn_bias = _affine(draws, c, dtype, o)
    running_mean, running_var = _running(draws, c, dtype)
    return dict(weight=weight, bias=draws.normal("layer_bias", c, dtype, 0.0, 1.0),
                running_mean=running_mean, running_var=running_var, bn_weight=bn_weight,
                bn_bias=bn_bias, eps=EPS)


def _bn_stats(draws, shape, dtype, o):
    return dict(input=_data(draws, shape, dtype), **_axis(o))


def _gather_args(x, running_mean, running_var, o):
    """Statistics of x's two halves along the batch, as two processes would report them."""
    parts = [bncpu.batch_norm_stats(part, **_axis(o)) for part in np.array_split(x, 2, axis=0)]
    return dict(mean=np.stack([p[0] for p in parts]), m2=np.stack([p[1] for p in parts]),
                count=np.array([p[2] for p in parts]), running_mean=running_mean,
                running_var=running_var, momentum=MOMENTUM, eps=EPS)


def _bn_gather(draws, shape, dtype, o):
    running_mean, running_var = _running(draws, shape[o.axis], dtype)
    return _gather_args(_data(draws, shape, dtype), running_mean, running_var, o)


def _bn_global(draws, shape, dtype, o):
    """x, weight, bias and the global (mean, invstd) of x, float64, as the synchronized
    step computes them: stats of each half, then gathered."""
    x = _data(draws, shape, dtype)
    weight, bias = _affine(draws, shape[o.axis], dtype, o)
    running_mean, running_var = _running(draws, shape[o.axis], dtype)
    gathered = _gather_args(x, running_mean.copy(), running_var.copy(), o)
    return x, weight, bias, bncpu.batch_norm_gather_stats(**gathered)


def _bn_elemt(draws, shape, dtype, o):
    x, weight, bias, (mean, invstd) = _bn_global(draws, shape, dtype, o)
    return dict(input=x, weight=weight, bias=bias, mean=mean, invstd=invstd, **_axis(o))


def _bn_backward_reduce(draws, shape, dtype, o):
    x, weight, _, (mean, invstd) = _bn_global(draws, shape, dtype, o)
    return dict(grad_output=_grad(draws, shape, dtype), input=x, mean=mean, invstd=invstd,
                weight=weight, **_axis(o))


def _bn_backward_elemt(draws, shape, dtype, o):
    args = _bn_backward_reduce(draws, shape, dtype, o)
    sum_dy, sum_dy_xmu, _, _ = bncpu.batch_norm_backward_reduce(**args)
    return dict(args, sum_dy=sum_dy, sum_dy_xmu=sum_dy_xmu,
                count=np.int64(args["input"].size // shape[o.axis]))


def _rows(draws, shape, dtype, o):
    normalized = tuple(shape[-o.normalized_dims:])
    return (_data(draws, shape, dtype), normalized) + _affine(draws, normalized, dtype, o)


def _ln_forward(draws, shape, dtype, o):
    x, normalized, weight, bias = _rows(draws, shape, dtype, o)
    return dict(input=x, normalized_shape=normalized, weight=weight, bias=bias, eps=EPS)


def _ln_backward(draws, shape, dtype, o):
    x, normalized, weight, bias = _rows(draws, shape, dtype, o)
    _, mean, rstd = bncpu.layer_norm_forward(x, normalized, weight, bias, EPS)
    return dict(grad_output=_grad(draws, shape, dtype), input=x, normalized_shape=normalized,
                mean=mean, rstd=rstd, weight=weight)


def _rms_forward(draws, shape, dtype, o):
    x, normalized, weight, _ = _rows(draws, shape, dtype, o)
    return dict(input=x, normalized_shape=normalized, weight=weight, eps=RMS_EPS)


def _rms_backward(draws, shape, dtype, o):
    x, normalized, weight, _ = _rows(draws, shape, dtype, o)
    _, rstd = bncpu.rms_norm_forward(x, normalized, weight, RMS_EPS)
    return dict(grad_output=_grad(draws, shape, dtype), input=x, normalized_shape=normalized,
                rstd=rstd, weight=weight)


def _grouped(draws, shape, dtype, o):
    c = shape[o.axis]
    groups = o.groups or (2 if c % 2 == 0 else 1)
    return (_data(draws, shape, dtype), groups) + _affine(draws, c, dtype, o)


def _gn_forward(draws, shape, dtype, o):
    x, groups, weight, bias = _grouped(draws, shape, dtype, o)
    return dict(input=x, num_groups=groups, weight=weight, bias=bias, eps=EPS, **_axis(o))


def _gn_backward(draws, shape, dtype, o):
    x, groups, weight, bias = _grouped(draws, shape, dtype, o)
    _, mean, rstd = bncpu.group_norm_forward(x, groups, weight, bias, EPS, **_axis(o))
    return dict(grad_output=_grad(draws, shape, dtype), input=x, num_groups=groups, mean=mean,
                rstd=rstd, weight=weight, **_axis(o))


def _in_forward(draws, shape, dtype, o):
    x, _, weight, bias = _grouped(draws, shape, dtype, o)
    c = shape[o.axis]
    return dict(input=x, weight=weight, bias=bias, running_mean=np.zeros(c, dtype),
                running_var=np.ones(c, dtype), use_input_stats=o.training, momentum=MOMENTUM,
                eps=EPS, **_axis(o))


def _in_backward(draws, shape, dtype, o):
    forward = _in_forward(draws, shape, dtype, dataclasses.replace(o, training=True))
    _, mean, rstd = bncpu.instance_norm_forward(**forward)
    return dict(grad_output=_grad(draws, shape, dtype), input=forward["input"], mean=mean,
                rstd=rstd, weight=forward["weight"], **_axis(o))


# ----------------------------------------------------------------------------------
# Bad calls: one argument spoiled each
# ----------------------------------------------------------------------------------
def _spoil(args, name, value):
    spoiled = dict(args)
    spoiled[name] = value
    return spoiled


def _bad_common(args, twin_checks_weight=True):
    """Spoiled calls that apply to every function: a complex input, a wrong-length
    weight, a NaN eps. Each is (what, args, twin_raises): whether bncpu.reference
    refuses it too (it checks shapes, not every dtype and scalar)."""
    cases = []
    first = "grad_output" if "grad_output" in args else "input"
    if first in args:
        cases.append(("complex input", _spoil(args, first, args[first].astype(np.complex128)),
                      False))
    if args.get("weight") is not None:
        weight = args["weight"]
        longer = np.ones(weight.shape[:-1] + (weight.shape[-1] + 1,), weight.dtype)
        cases.append(("weight one too long", _spoil(args, "weight", longer), twin_checks_weight))
    if "eps" in args:
        cases.append(("eps = NaN", _spoil(args, "eps", float("nan")), False))
    return cases


def _bad_running(args):
    cases = _bad_common(args)
    if args.get("running_mean") is not None:
        cases.append(("running_mean too short",
                      _spoil(args, "running_mean", args["running_mean"][:-1].copy()), True))
    if "momentum" in args:
        cases.append(("momentum = NaN", _spoil(args, "momentum", float("nan")), False))
    return cases


def _bad_backward_reduce(args):
    return _bad_common(args, twin_checks_weight=False)


def _bad_relu(args):
    """The batch-norm cases, and a residual or an output of another shape."""
    cases = _bad_running(args) if "momentum" in args else _bad_common(args)
    for name in ("residual", "output"):
        if name in args:
            cases.append((f"{name} of another shape", _spoil(args, name, args[name][:1]), True))
    return cases


def _bad_fold(args):
    return [("complex weight", _spoil(args, "weight", args["weight"].astype(np.complex128)),
             False),
            ("bn_weight one too long", _spoil(args, "bn_weight", np.ones(args["bias"].size + 1)),
             True),
            ("running_mean too short",
             _spoil(args, "running_mean", args["running_mean"][:-1].copy()), True),
            ("eps = NaN", _spoil(args, "eps", float("nan")), False)]


# ----------------------------------------------------------------------------------
# PyTorch counterparts: torch(torch, args, tensor) -> zero-argument callable. The aten
# overloads are resolved here, once, so that a timed call is the kernel's dispatch only.
# ----------------------------------------------------------------------------------
def _aten(torch, name):
    return getattr(torch.ops.aten, name).default


def _torch_bn_forward(torch, a, tensor):
    return functools.partial(
        _aten(torch, "native_batch_norm"), tensor(a["input"]), tensor(a["weight"]),
        tensor(a["bias"]), tensor(a["running_mean"]), tensor(a["running_var"]), a["training"],
        a["momentum"], a["eps"])


def _bn_backward_tensors(a, tensor):
    return [tensor(a[name]) for name in ("input", "weight", "running_mean", "running_var",
                                         "save_mean", "save_invstd")]


def _torch_bn_backward(torch, a, tensor):
    return functools.partial(_aten(torch, "native_batch_norm_backward"),
                             tensor(a["grad_output"]), *_bn_backward_tensors(a, tensor),
                             a["training"], a["eps"], [True] * 3)


def _torch_bn_relu_forward(torch, a, tensor):
    """native_batch_norm, [add_,] relu_: what a model without the fusion runs."""
    forward = _torch_bn_forward(torch, a, tensor)
    residual = tensor(a.get("residual"))

    def run():
        output, save_mean, save_invstd = forward()
        if residual is not None:
            output.add_(residual)
        return output.relu_(), save_mean, save_invstd
    return run


def _torch_bn_relu_backward(torch, a, tensor):
    """threshold_backward, then native_batch_norm_backward; the first is the residual's
    gradient."""
    grad_output, output = tensor(a["grad_output"]), tensor(a["output"])
    rest = _bn_backward_tensors(a, tensor)
    threshold, backward = _aten(torch, "threshold_backward"), _aten(
        torch, "native_batch_norm_backward")

    def run():
        grad = threshold(grad_output, output, 0)
        grads = tuple(backward(grad, *rest, a["training"], a["eps"], [True] * 3))
        return grads + ((grad,) if a.get("residual_grad") else ())
    return run


def _torch_ln_forward(torch, a, tensor):
    return functools.partial(_aten(torch, "native_layer_norm"), tensor(a["input"]),
                             list(a["normalized_shape"]), tensor(a["weight"]),
                             tensor(a["bias"]), a["eps"])


def _torch_ln_backward(torch, a, tensor):
    """native_layer_norm_backward on torch's own statistics. It computes a bias gradient
    only when given a bias: zeros, which leave torch's statistics alone."""
    x, weight = tensor(a["input"]), tensor(a["weight"])
    bias = None if a["weight"] is None else tensor(np.zeros_like(a["weight"]))
    shape = list(a["normalized_shape"])
    _, mean, rstd = _aten(torch, "native_layer_norm")(x, shape, weight, bias, EPS)
    return functools.partial(_aten(torch, "native_layer_norm_backward"),
                             tensor(a["grad_output"]), x, shape, mean, rstd, weight, bias,
                             [True] * 3)


def _group_sizes(a):
    """(N, C, HxW, groups): native_group_norm's explicit sizes."""
    x = a["input"]
    n, c = x.shape[0], x.shape[a.get("axis", 1)]
    return n, c, x.size // (n * c), a["num_groups"]


def _torch_gn_forward(torch, a, tensor):
    return functools.partial(_aten(torch, "native_group_norm"), tensor(a["input"]),
                             tensor(a["weight"]), tensor(a["bias"]), *_group_sizes(a), a["eps"])


def _torch_gn_backward(torch, a, tensor):
    """native_group_norm_backward on torch's own statistics."""
    x, weight = tensor(a["input"]), tensor(a["weight"])
    _, mean, rstd = _aten(torch, "native_group_norm")(x, weight, None, *_group_sizes(a), EPS)
    return functools.partial(_aten(torch, "native_group_norm_backward"),
                             tensor(a["grad_output"]), x, mean, rstd, weight, *_group_sizes(a),
                             [True] * 3)


def _torch_in_forward(torch, a, tensor):
    """aten::instance_norm, what torch.nn.functional.instance_norm runs: batch norm on the
    input viewed as (1, N*C, *) with weight and bias repeated N times."""
    return functools.partial(_aten(torch, "instance_norm"), tensor(a["input"]),
                             tensor(a["weight"]), tensor(a["bias"]), tensor(a["running_mean"]),
                             tensor(a["running_var"]), a["use_input_stats"], a["momentum"],
                             a["eps"], False)


def _torch_in_backward(torch, a, tensor):
    """What autograd runs for instance_norm: batch norm's backward on the (1, N*C, *) view,
    on torch's own statistics, then the repeated weight's gradient summed over the batch."""
    shape = a["input"].shape
    n, c = shape[:2]
    x = tensor(a["input"]).reshape(1, n * c, -1)
    grad_output = tensor(a["grad_output"]).reshape(1, n * c, -1)
    weight = None if a["weight"] is None else tensor(a["weight"]).repeat(n)
    _, mean, invstd = _aten(torch, "native_batch_norm")(x, weight, None, None, None, True, 0.0,
                                                         EPS)
    backward = _aten(torch, "native_batch_norm_backward")

    def run():
        grad_input, grad_weight, grad_bias = backward(grad_output, x, weight, None, None, mean,
                                                      invstd, True, EPS, [True] * 3)
        return (grad_input.view(shape), grad_weight.view(n, c).sum(0),
                grad_bias.view(n, c).sum(0))
    return run


def _torch_rms_forward(torch, a, tensor):
    return functools.partial(_aten(torch, "_fused_rms_norm"), tensor(a["input"]),
                             list(a["normalized_shape"]), tensor(a["weight"]), a["eps"])


def _torch_rms_backward(torch, a, tensor):
    """torch has no CPU kernel for _fused_rms_norm_backward: on the CPU autograd
    differentiates the composite forward, and that backward pass is what runs."""
    x = tensor(a["input"]).requires_grad_()
    weight = tensor(a["weight"]).requires_grad_()
    output = torch.nn.functional.rms_norm(x, list(a["normalized_shape"]), weight, RMS_EPS)
    return functools.partial(torch.autograd.grad, output, (x, weight), tensor(a["grad_output"]),
                             retain_graph=True)


# ----------------------------------------------------------------------------------
# The functions
# ----------------------------------------------------------------------------------
BATCH_SHAPES = ((300, 17), (16, 8, 6, 6), (4, 6, 70, 70), (3, 1, 80, 80), (5, 3))
ROW_SHAPES = ((33, 100), (6, 7, 40), (3, 20000), (1, 5))
GROUP_SHAPES = ((8, 8, 14, 14), (2, 4, 150, 150), (3, 6, 9), (4, 2))
INSTANCE_SHAPES = GROUP_SHAPES[:3] + ((4, 2, 3),)

_RUNNING = ("running_mean", "running_var")

_FUNCTIONS = (
    Function(
        name="batch_norm_forward", family="batch_norm",
        params=("input", "weight", "bias", "running_mean", "running_var", "training",
                "momentum", "eps", "axis"),
        keyword=("axis",), generator=_bn_forward, shapes=BATCH_SHAPES, written=_RUNNING,
        has_out=True, torch=_torch_bn_forward, bad=_bad_running,
        timed=(Timed("bn_fwd_train", "batch_norm fwd train", dict(training=True)),
               Timed("bn_fwd_eval", "batch_norm fwd eval", dict(training=False)))),
    Function(
        name="batch_norm_backward", family="batch_norm",
        params=("grad_output", "input", "weight", "running_mean", "running_var", "save_mean",
                "save_invstd", "training", "eps", "axis"),
        keyword=("axis",), generator=_bn_backward, shapes=BATCH_SHAPES, has_out=True,
        torch=_torch_bn_backward, bad=_bad_common,
        timed=(Timed("bn_bwd_train", "batch_norm bwd train", dict(training=True)),
               Timed("bn_bwd_eval", "batch_norm bwd eval", dict(training=False)))),
    Function(
        name="batch_norm_stats", family="batch_norm", params=("input", "axis"),
        keyword=("axis",), generator=_bn_stats, shapes=BATCH_SHAPES, bad=_bad_common,
        timed=(Timed("bn_stats", "batch_norm_stats"),)),
    Function(
        name="batch_norm_gather_stats", family="batch_norm",
        params=("mean", "m2", "count", "running_mean", "running_var", "momentum", "eps"),
        generator=_bn_gather, shapes=BATCH_SHAPES, written=_RUNNING, bad=_bad_running,
        not_timed="merges C per-channel values: nothing to time"),
    Function(
        name="batch_norm_elemt", family="batch_norm",
        params=("input", "weight", "bias", "mean", "invstd", "axis"), keyword=("axis",),
        generator=_bn_elemt, shapes=BATCH_SHAPES, has_out=True, bad=_bad_common,
        timed=(Timed("bn_elemt", "batch_norm_elemt"),)),
    Function(
        name="batch_norm_backward_reduce", family="batch_norm",
        params=("grad_output", "input", "mean", "invstd", "weight", "axis"), keyword=("axis",),
        generator=_bn_backward_reduce, shapes=BATCH_SHAPES, bad=_bad_backward_reduce,
        timed=(Timed("bn_bwd_reduce", "batch_norm_backward_reduce"),)),
    Function(
        name="batch_norm_backward_elemt", family="batch_norm",
        params=("grad_output", "input", "mean", "invstd", "weight", "sum_dy", "sum_dy_xmu",
                "count", "axis"),
        keyword=("axis",), generator=_bn_backward_elemt, shapes=BATCH_SHAPES, has_out=True,
        bad=_bad_common, timed=(Timed("bn_bwd_elemt", "batch_norm_backward_elemt"),)),
    Function(
        name="batch_norm_relu_forward", family="fused",
        params=("input", "weight", "bias", "running_mean", "running_var", "training",
                "momentum", "eps", "residual", "axis"),
        keyword=("residual", "axis"), generator=_bn_relu_forward, shapes=BATCH_SHAPES,
        written=_RUNNING, has_out=True, torch=_torch_bn_relu_forward, bad=_bad_relu,
        baseline="batch_norm_forward",
        timed=(Timed("bnr_fwd_train", "bn+relu fwd train", dict(training=True, residual=False)),
               Timed("bnr_fwd_eval", "bn+relu fwd eval", dict(training=False, residual=False)),
               Timed("bnar_fwd_train", "bn+add+relu fwd train",
                     dict(training=True, residual=True)))),
    Function(
        name="batch_norm_relu_backward", family="fused",
        params=("grad_output", "output", "input", "weight", "running_mean", "running_var",
                "save_mean", "save_invstd", "training", "eps", "residual_grad", "axis"),
        keyword=("residual_grad", "axis"), generator=_bn_relu_backward, shapes=BATCH_SHAPES,
        has_out=True, torch=_torch_bn_relu_backward, bad=_bad_relu,
        baseline="batch_norm_backward",
        timed=(Timed("bnr_bwd_train", "bn+relu bwd train", dict(training=True, residual=False)),)),
    Function(
        name="fold_batch_norm", family="fused",
        params=("weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias", "eps"),
        generator=_fold, shapes=BATCH_SHAPES, bad=_bad_fold,
        not_timed="folds C per-channel values into a layer's weights, once"),
    Function(
        name="layer_norm_forward", family="layer_norm",
        params=("input", "normalized_shape", "weight", "bias", "eps"), generator=_ln_forward,
        shapes=ROW_SHAPES, has_out=True, torch=_torch_ln_forward, bad=_bad_common,
        timed=(Timed("ln_fwd", "layer_norm fwd"),)),
    Function(
        name="layer_norm_backward", family="layer_norm",
        params=("grad_output", "input", "normalized_shape", "mean", "rstd", "weight"),
        generator=_ln_backward, shapes=ROW_SHAPES, has_out=True, torch=_torch_ln_backward,
        bad=_bad_common, timed=(Timed("ln_bwd", "layer_norm bwd"),)),
    Function(
        name="group_norm_forward", family="group_norm",
        params=("input", "num_groups", "weight", "bias", "eps", "axis"), keyword=("axis",),
        generator=_gn_forward, shapes=GROUP_SHAPES, has_out=True, torch=_torch_gn_forward,
        bad=_bad_common, timed=(Timed("gn_fwd", "group_norm fwd"),)),
    Function(
        name="group_norm_backward", family="group_norm",
        params=("grad_output", "input", "num_groups", "mean", "rstd", "weight", "axis"),
        keyword=("axis",), generator=_gn_backward, shapes=GROUP_SHAPES, has_out=True,
        torch=_torch_gn_backward, bad=_bad_common, timed=(Timed("gn_bwd", "group_norm bwd"),)),
    Function(
        name="instance_norm_forward", family="instance_norm",
        params=("input", "weight", "bias", "running_mean", "running_var", "use_input_stats",
                "momentum", "eps", "axis"),
        keyword=("axis",), generator=_in_forward, shapes=INSTANCE_SHAPES, written=_RUNNING,
        has_out=True, torch=_torch_in_forward, bad=_bad_running,
        timed=(Timed("in_fwd", "instance_norm fwd"),)),
    Function(
        name="instance_norm_backward", family="instance_norm",
        params=("grad_output", "input", "mean", "rstd", "weight", "axis"), keyword=("axis",),
        generator=_in_backward, shapes=INSTANCE_SHAPES, has_out=True, torch=_torch_in_backward,
        bad=_bad_common, timed=(Timed("in_bwd", "instance_norm bwd"),)),
    Function(
        name="rms_norm_forward", family="rms_norm",
        params=("input", "normalized_shape", "weight", "eps"), generator=_rms_forward,
        shapes=ROW_SHAPES, has_out=True, torch=_torch_rms_forward, bad=_bad_common,
        timed=(Timed("rms_fwd", "rms_norm fwd"),)),
    Function(
        name="rms_norm_backward", family="rms_norm",
        params=("grad_output", "input", "normalized_shape", "rstd", "weight"),
        generator=_rms_backward, shapes=ROW_SHAPES, has_out=True, torch=_torch_rms_backward,
        bad=_bad_common, timed=(Timed("rms_bwd", "rms_norm bwd"),)),
)

FUNCTIONS = collections.OrderedDict((spec.name, spec) for spec in _FUNCTIONS)
