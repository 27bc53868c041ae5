"""Benchmark cases and the timing harness, shared by the speed report (``python -m bncpu``,
bncpu/__main__.py) and the pytest-benchmark suite (benchmarks/): one registry, so the two
always time the same things.

A case is one operation on one input shape and dtype. Its inputs are made once and handed
to up to four implementations:

``bncpu``      the library, called as a user calls it (each call allocates its results);
``reference``  ``bncpu.reference``, the plain-NumPy twin with the same name and arguments;
``torch``      PyTorch's CPU kernel for the same operation, when torch is importable and
               has one (its split-phase batch-norm ops are CUDA-only: "n/a");
``floor``      the streaming floor: one pass over the bytes the operation cannot avoid
               moving (see ``Operation.reads``/``writes``), written into a preallocated
               array, at the same thread count. With torch: ``torch.add(b, x, alpha=a,
               out=y)`` (y = a*x + b), ``torch.add(dy, x, out=dx)``, or ``torch.sum`` of
               each input for the reductions. Without torch: NumPy's ``multiply``/``add``/
               ``add.reduce`` on one contiguous slice per thread (NumPy releases the GIL).

``measure`` times the implementations of a case round-robin (bncpu, torch, floor,
reference, bncpu, ...) so that a noisy neighbour on a 2-core machine hits all of them
alike, and reports medians.
"""
import ctypes
import dataclasses
import functools
import gc
import inspect
import math
import os
import platform
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

try:
    import resource
except ImportError:   # Windows
    resource = None

import numpy as np

import bncpu
from bncpu import _onednn, _registry, reference

try:
    import torch
except ImportError:
    torch = None

EPS = 1e-5
MOMENTUM = 0.1
RMS_EPS = 1e-6

# ``bncpu`` allocates its results as a caller does; ``bncpu_out`` writes the input-sized
# result into a preallocated ``out=`` (the other results are small); ``bncpu_bn``, for the
# fused operations only, is bncpu's batch norm alone on the same input. ``onednn`` runs
# oneDNN's primitive on the case's own layout, ``onednn_best`` on the fastest of its
# layouts for the shape (bncpu/_onednn.py). All but the reference are timed round-robin;
# the reference, whose calls on large inputs take tenths of a second and churn through
# temporaries, is timed apart afterwards.
IMPLEMENTATIONS = ("bncpu", "bncpu_out", "bncpu_bn", "torch", "onednn", "onednn_best", "floor",
                   "reference")
TIMED_APART = ("reference",)


# An implementation that cannot run this case (not installed, no CPU kernel, no primitive).
Unavailable = _onednn.Unavailable


# ---------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Calls:
    """How each library runs one operation on a case's inputs:
    ``bncpu.<function>(*args, **kwargs)`` and the same in ``bncpu.reference``;
    ``torch(tensor)`` returns the torch call to time, ``tensor`` turning each ndarray into a
    tensor sharing its memory (channels-last data: an NCHW view with channels-last strides).
    ``baseline``: for a fused operation, the Calls of bncpu's batch norm alone."""
    function: str
    args: tuple
    torch: object
    kwargs: dict = dataclasses.field(default_factory=dict)
    baseline: object = None


@dataclasses.dataclass(frozen=True)
class Operation:
    """One timed operation. ``streams`` names the input-sized arrays of ``Inputs`` it must
    at least read, ``writes`` counts those it writes: the bytes the streaming floor moves.
    An operation that writes one takes ``out=`` for it."""
    key: str
    function: str      # the bncpu function timed (Calls.function: the same name)
    label: str
    streams: tuple
    writes: int
    calls: object      # Inputs -> Calls

    @property
    def reads(self):
        return len(self.streams)


def _aten(name):
    return getattr(torch.ops.aten, name).default


def _aten_call(name, *args):
    """The torch side of Calls: torch.ops.aten.<name>(*args), arrays passed as tensors."""
    return lambda tensor: functools.partial(_aten(name), *map(tensor, args))


def _bn_forward(training):
    def calls(inputs):
        arrays = (inputs.x, inputs.weight, inputs.bias, inputs.running_mean, inputs.running_var)
        return Calls("batch_norm_forward", arrays + (training, MOMENTUM, EPS),
                     _aten_call("native_batch_norm", *arrays, training, MOMENTUM, EPS),
                     inputs.axis_kwargs)
    return calls


def _bn_backward(training):
    def calls(inputs):
        save_mean, save_invstd = inputs.bn_saved if training else (None, None)
        arrays = (inputs.dy, inputs.x, inputs.weight, inputs.running_mean, inputs.running_var,
                  save_mean, save_invstd)
        return Calls("batch_norm_backward", arrays + (training, EPS),
                     _aten_call("native_batch_norm_backward", *arrays, training, EPS, [True] * 3),
                     inputs.axis_kwargs)
    return calls


def _bn_relu_forward(training, residual):
    """relu(batch_norm(x) [+ residual]); torch: native_batch_norm, [add_,] relu_."""
    def calls(inputs):
        arrays = (inputs.x, inputs.weight, inputs.bias, inputs.running_mean, inputs.running_var)
        kwargs = dict(inputs.axis_kwargs, residual=inputs.residual) if residual else dict(
            inputs.axis_kwargs)

        def torch_call(tensor):
            tensors = [tensor(array) for array in arrays]
            skip = tensor(inputs.residual) if residual else None

            def run():
                output = _aten("native_batch_norm")(*tensors, training, MOMENTUM, EPS)[0]
                if skip is not None:
                    output.add_(skip)
                return output.relu_()
            return run
        return Calls("batch_norm_relu_forward", arrays + (training, MOMENTUM, EPS), torch_call,
                     kwargs, _bn_forward(training)(inputs))
    return calls


def _bn_relu_backward(inputs):
    """Backward through relu(batch_norm(x)); torch: threshold_backward then
    native_batch_norm_backward."""
    save_mean, save_invstd = inputs.bn_saved
    arrays = (inputs.dy, inputs.relu_output, inputs.x, inputs.weight, inputs.running_mean,
              inputs.running_var, save_mean, save_invstd)

    def torch_call(tensor):
        dy, output, x = tensor(inputs.dy), tensor(inputs.relu_output), tensor(inputs.x)
        rest = [tensor(array) for array in arrays[3:]]

        def run():
            grad = _aten("threshold_backward")(dy, output, 0)
            return _aten("native_batch_norm_backward")(grad, x, *rest, True, EPS, [True] * 3)
        return run
    return Calls("batch_norm_relu_backward", arrays + (True, EPS), torch_call, inputs.axis_kwargs,
                 _bn_backward(True)(inputs))


def _bn_stats(inputs):
    return Calls("batch_norm_stats", (inputs.x,), _aten_call("batch_norm_stats", inputs.x, EPS))


def _bn_elemt(inputs):
    arrays = (inputs.x, inputs.weight, inputs.bias) + inputs.bn_global
    return Calls("batch_norm_elemt", arrays, _aten_call("batch_norm_elemt", *arrays, EPS))


def _bn_backward_reduce(inputs):
    mean, invstd = inputs.bn_global
    return Calls("batch_norm_backward_reduce", (inputs.dy, inputs.x, mean, invstd, inputs.weight),
                 _aten_call("batch_norm_backward_reduce", inputs.dy, inputs.x, mean, invstd,
                            inputs.weight, True, True, True))


def _bn_backward_elemt(inputs):
    arrays = (inputs.dy, inputs.x) + inputs.bn_global + (inputs.weight,) + inputs.bn_sums
    count = inputs.x.size // inputs.x.shape[1]
    return Calls("batch_norm_backward_elemt", arrays + (count,),
                 _aten_call("batch_norm_backward_elemt", *arrays, np.array([count], np.int32)))


def _layer_norm_forward(inputs):
    shape = inputs.case.param
    return Calls("layer_norm_forward", (inputs.x, shape, inputs.weight, inputs.bias, EPS),
                 _aten_call("native_layer_norm", inputs.x, list(shape), inputs.weight,
                            inputs.bias, EPS))


def _layer_norm_backward(inputs):
    shape = inputs.case.param
    _, mean, rstd = bncpu.layer_norm_forward(inputs.x, shape, inputs.weight, inputs.bias, EPS)

    def torch_call(tensor):
        x, weight, bias = tensor(inputs.x), tensor(inputs.weight), tensor(inputs.bias)
        _, torch_mean, torch_rstd = _aten("native_layer_norm")(x, list(shape), weight, bias, EPS)
        return functools.partial(_aten("native_layer_norm_backward"), tensor(inputs.dy), x,
                                 list(shape), torch_mean, torch_rstd, weight, bias, [True] * 3)
    return Calls("layer_norm_backward", (inputs.dy, inputs.x, shape, mean, rstd, inputs.weight),
                 torch_call)


def _group_dims(inputs):
    """(N, C, HxW, groups): native_group_norm's explicit sizes."""
    n, c = inputs.x.shape[0], inputs.channels
    return n, c, inputs.x.size // (n * c), inputs.case.param


def _group_norm_forward(inputs):
    args = (inputs.x, inputs.case.param, inputs.weight, inputs.bias, EPS)
    return Calls("group_norm_forward", args,
                 _aten_call("native_group_norm", inputs.x, inputs.weight, inputs.bias,
                            *_group_dims(inputs), EPS), inputs.axis_kwargs)


def _group_norm_backward(inputs):
    groups = inputs.case.param
    _, mean, rstd = bncpu.group_norm_forward(inputs.x, groups, inputs.weight, inputs.bias, EPS,
                                             **inputs.axis_kwargs)

    def torch_call(tensor):
        x, weight = tensor(inputs.x), tensor(inputs.weight)
        _, torch_mean, torch_rstd = _aten("native_group_norm")(
            x, weight, tensor(inputs.bias), *_group_dims(inputs), EPS)
        return functools.partial(_aten("native_group_norm_backward"), tensor(inputs.dy), x,
                                 torch_mean, torch_rstd, weight, *_group_dims(inputs), [True] * 3)
    return Calls("group_norm_backward", (inputs.dy, inputs.x, groups, mean, rstd, inputs.weight),
                 torch_call, inputs.axis_kwargs)


def _instance_norm_forward(inputs):
    # aten::instance_norm is what torch.nn.functional.instance_norm runs: batch norm on the
    # input viewed as (1, N*C, *) with weight and bias repeated N times.
    arrays = (inputs.x, inputs.weight, inputs.bias, None, None)
    return Calls("instance_norm_forward", arrays + (True, MOMENTUM, EPS),
                 _aten_call("instance_norm", *arrays, True, MOMENTUM, EPS, False))


def _instance_norm_backward(inputs):
    _, mean, rstd = bncpu.instance_norm_forward(inputs.x, inputs.weight, inputs.bias, None, None,
                                                True, MOMENTUM, EPS)

    def torch_call(tensor):
        # The backward autograd runs for instance_norm: batch norm's on the (1, N*C, *)
        # view, then the repeated weight's gradient summed back over the batch.
        n, c = inputs.x.shape[:2]
        x = tensor(inputs.x).reshape(1, n * c, -1)
        dy = tensor(inputs.dy).reshape(1, n * c, -1)
        weight = tensor(inputs.weight).repeat(n)
        _, torch_mean, torch_invstd = _aten("native_batch_norm")(x, weight, None, None, None,
                                                                 True, 0.0, EPS)

        def backward():
            grad_input, grad_weight, grad_bias = _aten("native_batch_norm_backward")(
                dy, x, weight, None, None, torch_mean, torch_invstd, True, EPS, [True] * 3)
            return (grad_input.view(inputs.x.shape), grad_weight.view(n, c).sum(0),
                    grad_bias.view(n, c).sum(0))
        return backward
    return Calls("instance_norm_backward", (inputs.dy, inputs.x, mean, rstd, inputs.weight),
                 torch_call)


def _rms_norm_forward(inputs):
    shape = inputs.case.param
    return Calls("rms_norm_forward", (inputs.x, shape, inputs.weight, RMS_EPS),
                 _aten_call("_fused_rms_norm", inputs.x, list(shape), inputs.weight, RMS_EPS))


def _rms_norm_backward(inputs):
    shape = inputs.case.param
    _, rstd = bncpu.rms_norm_forward(inputs.x, shape, inputs.weight, RMS_EPS)

    def torch_call(tensor):
        # torch has no CPU kernel for _fused_rms_norm_backward: on the CPU, autograd
        # differentiates the composite forward, and that backward pass is what is timed.
        x, weight = tensor(inputs.x).requires_grad_(), tensor(inputs.weight).requires_grad_()
        output = torch.nn.functional.rms_norm(x, list(shape), weight, RMS_EPS)
        return functools.partial(torch.autograd.grad, output, (x, weight), tensor(inputs.dy),
                                 retain_graph=True)
    return Calls("rms_norm_backward", (inputs.dy, inputs.x, shape, rstd, inputs.weight),
                 torch_call)


_X, _DX = ("x",), ("dy", "x")
OPERATIONS = {op.key: op for op in (
    Operation("bn_fwd_train", "batch_norm_forward", "batch_norm fwd train", _X, 1,
              _bn_forward(True)),
    Operation("bn_fwd_eval", "batch_norm_forward", "batch_norm fwd eval", _X, 1,
              _bn_forward(False)),
    Operation("bn_bwd_train", "batch_norm_backward", "batch_norm bwd train", _DX, 1,
              _bn_backward(True)),
    Operation("bn_bwd_eval", "batch_norm_backward", "batch_norm bwd eval", _DX, 1,
              _bn_backward(False)),
    Operation("bn_stats", "batch_norm_stats", "batch_norm_stats", _X, 0, _bn_stats),
    Operation("bn_elemt", "batch_norm_elemt", "batch_norm_elemt", _X, 1, _bn_elemt),
    Operation("bn_bwd_reduce", "batch_norm_backward_reduce", "batch_norm_backward_reduce",
              _DX, 0, _bn_backward_reduce),
    Operation("bn_bwd_elemt", "batch_norm_backward_elemt", "batch_norm_backward_elemt",
              _DX, 1, _bn_backward_elemt),
    Operation("bnr_fwd_train", "batch_norm_relu_forward", "bn+relu fwd train", _X, 1,
              _bn_relu_forward(True, False)),
    Operation("bnr_fwd_eval", "batch_norm_relu_forward", "bn+relu fwd eval", _X, 1,
              _bn_relu_forward(False, False)),
    Operation("bnar_fwd_train", "batch_norm_relu_forward", "bn+add+relu fwd train",
              ("x", "residual"), 1, _bn_relu_forward(True, True)),
    Operation("bnr_bwd_train", "batch_norm_relu_backward", "bn+relu bwd train",
              ("dy", "relu_output", "x"), 1, _bn_relu_backward),
    Operation("ln_fwd", "layer_norm_forward", "layer_norm fwd", _X, 1, _layer_norm_forward),
    Operation("ln_bwd", "layer_norm_backward", "layer_norm bwd", _DX, 1, _layer_norm_backward),
    Operation("gn_fwd", "group_norm_forward", "group_norm fwd", _X, 1, _group_norm_forward),
    Operation("gn_bwd", "group_norm_backward", "group_norm bwd", _DX, 1, _group_norm_backward),
    Operation("in_fwd", "instance_norm_forward", "instance_norm fwd", _X, 1,
              _instance_norm_forward),
    Operation("in_bwd", "instance_norm_backward", "instance_norm bwd", _DX, 1,
              _instance_norm_backward),
    Operation("rms_fwd", "rms_norm_forward", "rms_norm fwd", _X, 1, _rms_norm_forward),
    Operation("rms_bwd", "rms_norm_backward", "rms_norm bwd", _DX, 1, _rms_norm_backward),
)}


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    op: str          # key of OPERATIONS
    shape: tuple
    dtype: str
    param: object = None   # layer/RMS norm: normalized_shape; group norm: num_groups
    quick: bool = False    # part of the --quick subset
    axis: int = 1          # the channel axis: -1 for channels-last data

    @property
    def operation(self):
        return OPERATIONS[self.op]

    @property
    def label(self):
        """Operation label with its parameter, e.g. 'group_norm fwd G=32'."""
        label = self.operation.label
        if self.op.startswith(("ln_", "rms_")):
            label = f"{label} over {len(self.param)}d"
        if self.op.startswith("gn_"):
            label = f"{label} G={self.param}"
        return label + (" axis=-1" if self.axis == -1 else "")

    @property
    def id(self):
        """A pytest id: 'bn_fwd_train-32x64x56x56-float32' ('-chlast': channels-last)."""
        param = "" if self.param is None else "-" + (
            f"g{self.param}" if isinstance(self.param, int) else f"last{len(self.param)}")
        layout = "-chlast" if self.axis == -1 else ""
        return f"{self.op}{param}{layout}-{'x'.join(map(str, self.shape))}-{self.dtype}"

    @property
    def input_bytes(self):
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def bytes_moved(self):
        """Bytes an ideal kernel reads and writes: what the streaming floor moves."""
        return (self.operation.reads + self.operation.writes) * self.input_bytes


# The first speed round's batch-norm shapes: LeNet-with-batch-norm at batch 256 on Fashion-MNIST
# ((256, 6, 24, 24), (256, 16, 8, 8), (256, 120)), ResNet-50 layers, a high-resolution
# early layer, fewer channels than threads, and a wide MLP layer. float64 for two of them.
BN_SHAPES = (
    ((256, 6, 24, 24), ("float32",)),
    ((256, 16, 8, 8), ("float32",)),
    ((256, 120), ("float32", "float64")),
    ((32, 64, 56, 56), ("float32", "float64")),
    ((32, 256, 56, 56), ("float32",)),
    ((32, 2048, 7, 7), ("float32",)),
    ((8, 32, 112, 112), ("float32",)),
    ((4, 1, 512, 512), ("float32",)),
    ((1024, 512), ("float32",)),
)
BN_OPS = ("bn_fwd_train", "bn_fwd_eval", "bn_bwd_train", "bn_bwd_eval",
          "bn_stats", "bn_elemt", "bn_bwd_reduce", "bn_bwd_elemt")
_MAIN_SHAPE = (32, 64, 56, 56)
# The forward and backward batch-norm functions (the split-phase ones aside).
_BN_MAIN_OPS = ("bn_fwd_train", "bn_fwd_eval", "bn_bwd_train", "bn_bwd_eval")
# --quick: the shapes with targets, all ops on the main one, the forward and backward on
# the others.
QUICK_BN = {(256, 120): ("float32",), (256, 16, 8, 8): ("float32",),
            (32, 64, 56, 56): ("float32",), (4, 1, 512, 512): ("float32",)}
QUICK_BN_OPS = ("bn_fwd_train", "bn_fwd_eval", "bn_bwd_train")

# The other norms: (family, shape, param, in --quick).
OTHER_NORMS = (
    ("ln", (8192, 1024), (1024,), True),
    ("ln", (32, 64, 56, 56), (64, 56, 56), False),
    ("gn", (32, 64, 56, 56), 32, True),
    ("gn", (8, 256, 28, 28), 32, False),
    ("in", (32, 64, 56, 56), None, True),
    ("rms", (8192, 1024), (1024,), True),
)


# Channels-last data (axis=-1), where bncpu takes it: the main shape's data in NHWC, and
# group norm on a ResNeXt-like map.
CHANNELS_LAST_BN = (32, 56, 56, 64)
CHANNELS_LAST_GN = ((8, 28, 28, 256), 32)
# Batch norm fused with ReLU (and a residual add), where bncpu has it.
FUSED_SHAPES = ((32, 64, 56, 56), (32, 256, 56, 56))
FUSED_OPS = ("bnr_fwd_train", "bnr_fwd_eval", "bnar_fwd_train", "bnr_bwd_train")


def _takes_axis(name):
    function = getattr(bncpu, name, None)
    return function is not None and "axis" in inspect.signature(function).parameters


# Functions of the registry (bncpu/_registry.py) the report does not time, and why.
NOT_TIMED = {"batch_norm_gather_stats": "merges C per-channel values: nothing to time",
             "fold_batch_norm": "folds C per-channel values into a layer's weights, once"}


def untimed_functions():
    """Registry functions that no operation times and ``NOT_TIMED`` does not explain: a
    new function must get a row (tests/test_bench.py checks this is empty)."""
    timed = {op.function for op in OPERATIONS.values()}
    return sorted(set(_registry.FUNCTIONS) - timed - set(NOT_TIMED))


def takes_out(function):
    """Whether bncpu's ``function`` takes ``out=``: the registry says so for its
    functions; the others (fused batch norm) are asked."""
    entry = _registry.FUNCTIONS.get(function)
    if entry is not None:
        return entry.has_out
    return "out" in inspect.signature(getattr(bncpu, function)).parameters


def cases(quick=False):
    """The registry: every case, in report order (batch-norm shapes, channels-last and
    fused batch norm when this bncpu has them, then the other norms)."""
    found = []
    for shape, dtypes in BN_SHAPES:
        for dtype in dtypes:
            for op in BN_OPS:
                in_quick = (dtype in QUICK_BN.get(shape, ())
                            and (op in QUICK_BN_OPS or shape == (32, 64, 56, 56)))
                found.append(Case(op, shape, dtype, quick=in_quick))
    if _takes_axis("batch_norm_forward") and _takes_axis("batch_norm_backward"):
        for op in _BN_MAIN_OPS:
            found.append(Case(op, CHANNELS_LAST_BN, "float32", quick=op in QUICK_BN_OPS,
                              axis=-1))
    if hasattr(bncpu, "batch_norm_relu_forward"):
        for shape in FUSED_SHAPES:
            for op in FUSED_OPS:
                found.append(Case(op, shape, "float32",
                                  quick=shape == _MAIN_SHAPE and op == "bnr_fwd_train"))
    for family, shape, param, in_quick in OTHER_NORMS:
        for direction in ("fwd", "bwd"):
            found.append(Case(f"{family}_{direction}", shape, "float32", param, in_quick))
    if _takes_axis("group_norm_forward") and _takes_axis("group_norm_backward"):
        shape, groups = CHANNELS_LAST_GN
        for op in ("gn_fwd", "gn_bwd"):
            found.append(Case(op, shape, "float32", groups, axis=-1))
    return [case for case in found if case.quick or not quick]


LINE = 64
# The large input arrays of the latest shape, shared by its cases (no implementation
# writes into an input): making 100 MB of normal values takes longer than timing a case.
_SHARED = {}
_SHARED_BYTES = 1 << 20


def aligned_empty(shape, dtype):
    """An uninitialized array whose data starts on a 64-byte cache line. NumPy's arrays
    start on any 16-byte boundary, and where input and output sit within a line can
    change a streaming kernel's time (benchmarks/alignment.py): the report fixes both."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + LINE, np.uint8)
    start = -raw.ctypes.data % LINE
    return raw[start:start + size].view(dtype).reshape(shape)


class Inputs:
    """The arrays of one case, made once and shared by all implementations, each starting
    on a cache line. Statistics the backward and split-phase calls take come from bncpu's
    own forward steps."""

    def __init__(self, case, seed=0):
        self.case = case
        self._seed = seed
        dtype = np.dtype(case.dtype)
        self.x = self._normal("x", case.shape, 2.0, 0.5)
        self.channels = case.shape[case.axis]
        # bncpu and the reference are told the channel axis only when it is not 1.
        self.axis_kwargs = {} if case.axis == 1 else {"axis": case.axis}
        if case.op.startswith(("ln_", "rms_")):
            param_shape = case.param
        else:
            param_shape = (self.channels,)
        self.weight = self._normal("weight", param_shape, 0.1, 1.0)
        self.bias = self._normal("bias", param_shape, 0.1, 0.0)
        self.running_mean = np.zeros(self.channels, dtype)
        self.running_var = np.ones(self.channels, dtype)
        self.onednn_primitives = {}   # by (layout, threads): see onednn_call

    def _normal(self, name, shape, scale, loc):
        """loc + scale * standard normal values, from a generator of their own (so that
        every case of a shape gets the same arrays, made once: see ``_SHARED``)."""
        key = (name, tuple(shape), self.case.dtype, self._seed)
        if key in _SHARED:
            return _SHARED[key]
        values = aligned_empty(shape, self.case.dtype)
        rng = np.random.default_rng([self._seed, zlib.crc32(name.encode())])
        values[...] = rng.standard_normal(shape, dtype=np.dtype(self.case.dtype))
        values *= scale
        values += loc
        if values.nbytes >= _SHARED_BYTES:
            if any(other[1:3] != key[1:3] for other in _SHARED):
                _SHARED.clear()   # keep one shape's arrays only
            _SHARED[key] = values
        return values

    @functools.cached_property
    def calls(self):
        """The operation's Calls on these inputs (made once: backward cases run a forward)."""
        return self.case.operation.calls(self)

    @functools.cached_property
    def dy(self):
        return self._normal("dy", self.case.shape, 1.0, 0.0)

    @functools.cached_property
    def bn_saved(self):
        """(save_mean, save_invstd) of a training forward."""
        return bncpu.batch_norm_forward(self.x, self.weight, self.bias, None, None, True,
                                        MOMENTUM, EPS, **self.axis_kwargs)[1:]

    @functools.cached_property
    def residual(self):
        return self._normal("residual", self.case.shape, 1.0, 0.0)

    @functools.cached_property
    def relu_output(self):
        """relu(batch_norm(x)) of a training forward: what the fused backward reads."""
        return bncpu.batch_norm_relu_forward(self.x, self.weight, self.bias, None, None, True,
                                             MOMENTUM, EPS, **self.axis_kwargs)[0]

    @functools.cached_property
    def bn_global(self):
        """(mean, invstd), float64: stats then gather, as one process of a synchronized step."""
        mean, m2, count = bncpu.batch_norm_stats(self.x)
        return bncpu.batch_norm_gather_stats(mean, m2, count, eps=EPS)

    @functools.cached_property
    def bn_sums(self):
        """(sum_dy, sum_dy_xmu) of the backward reduction."""
        mean, invstd = self.bn_global
        return bncpu.batch_norm_backward_reduce(self.dy, self.x, mean, invstd, self.weight)[:2]

    def streams(self):
        """The input-sized arrays the operation reads."""
        return tuple(getattr(self, name) for name in self.case.operation.streams)


# ---------------------------------------------------------------------------------------
# The streaming floor
# ---------------------------------------------------------------------------------------
def floor_description():
    if torch is not None:
        return ("torch, one multi-threaded pass: y = a*x + b (torch.add(b, x, alpha=a, out=y)), "
                "dx = dy + x (torch.add(..., out=)), or torch.sum of each input for reductions")
    return ("NumPy, one pass split over the threads: y = a*x (np.multiply(..., out=)), "
            "dx = dy + x (np.add(..., out=)), or np.add.reduce of each input for reductions")


def _as_tensor(value):
    """An ndarray as a tensor sharing its memory; anything else unchanged."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _tensor_converter(case):
    """``_as_tensor``, except that channels-last input-sized arrays become NCHW-shaped
    views with channels-last strides: torch's own channels_last memory format."""
    if case.axis == 1:
        return _as_tensor

    def tensor(value):
        converted = _as_tensor(value)
        if isinstance(value, np.ndarray) and value.shape == case.shape:
            return converted.movedim(-1, 1)
        return converted
    return tensor


def _floor_torch(reads, out):
    if out is None:
        tensors = [torch.from_numpy(array) for array in reads]
        return lambda: [torch.sum(tensor) for tensor in tensors]
    y = torch.from_numpy(out)
    if len(reads) == 1:
        x, b = torch.from_numpy(reads[0]), torch.tensor(0.25, dtype=y.dtype)
        return functools.partial(torch.add, b, x, alpha=1.5, out=y)
    if len(reads) == 3:   # y = a + b*c, one pass
        return functools.partial(torch.addcmul, *map(torch.from_numpy, reads), out=y)
    return functools.partial(torch.add, *map(torch.from_numpy, reads), out=y)


# NumPy ufuncs release the GIL, so a thread per slice gives a multi-threaded pass.
_pools = {}


def _floor_numpy(reads, out, n_threads):
    flat_reads = [array.reshape(-1) for array in reads]
    flat_out = None if out is None else out.reshape(-1)
    size = flat_reads[0].size
    n_slices = n_threads if size >= (1 << 16) else 1
    bounds = [size * i // n_slices for i in range(n_slices + 1)]
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def one_pass(part):
        if flat_out is None:
            return [np.add.reduce(array[part]) for array in flat_reads]
        if len(flat_reads) == 1:
            return np.multiply(flat_reads[0][part], 1.5, out=flat_out[part])
        np.add(flat_reads[0][part], flat_reads[1][part], out=flat_out[part])
        for array in flat_reads[2:]:   # a second pass over out: NumPy has no 3-input ufunc
            np.add(flat_out[part], array[part], out=flat_out[part])
        return flat_out

    if n_slices == 1:
        return functools.partial(one_pass, slices[0])
    pool = _pools.setdefault(n_slices, ThreadPoolExecutor(n_slices))
    return lambda: list(pool.map(one_pass, slices))


def floor_call(inputs, n_threads):
    writes = inputs.case.operation.writes
    out = aligned_empty(inputs.x.shape, inputs.x.dtype) if writes else None
    return floor_call_into(inputs.streams(), out, n_threads)


def floor_call_into(reads, out, n_threads):
    """The floor's pass over the arrays ``reads`` into ``out`` (None: sums only)."""
    if torch is not None:
        return _floor_torch(reads, out)
    return _floor_numpy(reads, out, n_threads)


def implementation_call(inputs, implementation, n_threads):
    """The zero-argument callable that runs ``implementation`` on ``inputs``, or the
    Exception that says why it cannot (``Unavailable``, torch's NotImplementedError, or a
    bncpu error while preparing a backward case from its forward)."""
    if implementation == "floor":
        return floor_call(inputs, n_threads)
    if implementation == "torch" and torch is None:
        return Unavailable("torch not installed")
    try:
        if implementation.startswith("onednn"):
            return onednn_call(inputs, implementation == "onednn_best", n_threads)
        calls = inputs.calls
        if implementation == "torch":
            return calls.torch(_tensor_converter(inputs.case))
        if implementation == "bncpu_bn":
            if calls.baseline is None:
                return Unavailable("only for fused operations")
            calls = calls.baseline
        library = bncpu if implementation.startswith("bncpu") else reference
        function = getattr(library, calls.function)
        if implementation == "bncpu_out":
            if not takes_out(calls.function):
                return Unavailable(f"{calls.function} takes no out=")
            out = aligned_empty(inputs.x.shape, inputs.x.dtype)
            return functools.partial(function, *calls.args, **calls.kwargs, out=out)
        return functools.partial(function, *calls.args, **calls.kwargs)
    except Exception as error:
        return error


_ONEDNN_BATCH_NORM = {"bn_fwd_train": "forward_training", "bn_fwd_eval": "forward_inference",
                      "bn_bwd_train": "backward_training", "bn_bwd_eval": "backward_inference"}


# (N, C) batch norm and layer norm have one layout: the oneDNN column is also the best.
_ONE_LAYOUT = "one layout: as the oneDNN column"


def _cached_primitive(inputs, layout, n_threads, make):
    """The primitive of ``inputs`` in ``layout`` for ``n_threads``, made once for both
    oneDNN columns. A oneDNN primitive keeps the thread count it was created with: one
    made at 1 thread and reused at 2 (the report's ``--threads 1,2`` makes a case's inputs
    once) ran single-threaded, and the 2-thread oneDNN columns read up to 2.9x too slow."""
    key = (layout, n_threads)
    if key not in inputs.onednn_primitives:
        inputs.onednn_primitives[key] = make()
    return inputs.onednn_primitives[key]


def _onednn_layer_norm(inputs):
    """Layer norm over the case's normalized shape, flattened: oneDNN normalizes the last
    dimension of a (rows, width) tensor."""
    shape = inputs.case.param
    x = inputs.x.reshape(-1, math.prod(shape))
    if inputs.case.op == "ln_fwd":
        return _onednn.layer_norm("forward_training", x, inputs.weight, inputs.bias, eps=EPS)
    _, mean, rstd = bncpu.layer_norm_forward(inputs.x, shape, inputs.weight, inputs.bias, EPS)
    variance = 1.0 / rstd.astype(np.float64) ** 2 - EPS
    return _onednn.layer_norm("backward", x, inputs.weight, inputs.bias, mean, variance,
                              inputs.dy.reshape(x.shape), eps=EPS)


def onednn_call(inputs, best, n_threads):
    """oneDNN's primitive for ``inputs``: on the case's layout, or (``best``) on the
    fastest of the layouts oneDNN has for the shape; the callable's ``layout`` says which."""
    case = inputs.case
    _onednn.library()   # Unavailable when not installed
    if case.dtype != "float32":
        raise Unavailable("oneDNN: float32 only (no float64 normalization on the CPU)")
    _onednn.set_num_threads(n_threads)
    if case.op in _ONEDNN_BATCH_NORM:
        kind = _ONEDNN_BATCH_NORM[case.op]
        if kind == "backward_training":
            save_mean, save_invstd = inputs.bn_saved
            mean, variance = save_mean, 1.0 / save_invstd.astype(np.float64) ** 2 - EPS
        elif kind.endswith("inference"):
            mean, variance = inputs.running_mean, inputs.running_var
        else:
            mean, variance = np.zeros_like(inputs.running_mean), np.ones_like(inputs.running_var)
        x, dy = inputs.x, inputs.dy if kind.startswith("backward") else None
        own_layout = "plain"
        if case.axis == -1:   # channels-last data: oneDNN's NHWC is its own layout
            if x.ndim != 4:
                raise Unavailable("channels-last: this harness runs 4-D input")
            x, dy = (None if a is None else a.transpose(0, 3, 1, 2) for a in (x, dy))
            own_layout = "nhwc"
        if best and x.ndim != 4:
            raise Unavailable(_ONE_LAYOUT)
        if not best:
            return _cached_primitive(inputs, own_layout, n_threads, functools.partial(
                _onednn.batch_norm, kind, x, inputs.weight, inputs.bias, mean, variance, dy,
                layout=own_layout, eps=EPS))
        primitives = []
        for layout in _onednn.LAYOUTS:
            try:
                primitives.append(_cached_primitive(
                    inputs, layout, n_threads, functools.partial(
                        _onednn.batch_norm, kind, x, inputs.weight, inputs.bias, mean,
                        variance, dy, layout=layout, eps=EPS, optimized_only=True)))
            except Unavailable:   # oneDNN's reference code for this layout
                continue
        if not primitives:
            raise Unavailable("oneDNN has only reference code for this shape")
        return _onednn.fastest(primitives)
    if case.op in ("ln_fwd", "ln_bwd"):
        if best:
            raise Unavailable(_ONE_LAYOUT)
        return _cached_primitive(inputs, "plain", n_threads,
                                 functools.partial(_onednn_layer_norm, inputs))
    if case.op in FUSED_OPS:
        raise Unavailable("oneDNN's batch norm + ReLU fusion is not in this harness")
    raise Unavailable(f"oneDNN 3.2 has no {case.operation.label.split()[0]} primitive")


def implementation_calls(inputs, n_threads):
    """{implementation: callable or Exception}, in round-robin order."""
    return {impl: implementation_call(inputs, impl, n_threads) for impl in IMPLEMENTATIONS}


# ---------------------------------------------------------------------------------------
# Threads and environment
# ---------------------------------------------------------------------------------------
def parse_thread_counts(text):
    """'2' or '1,2' -> [2] or [1, 2]; ValueError for anything else."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"expected thread counts like 2 or 1,2; got {text!r}")
    return counts


def set_threads(n_threads):
    """Run bncpu and torch with the same team size."""
    bncpu.set_num_threads(n_threads)
    if torch is not None:
        torch.set_num_threads(n_threads)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment():
    return {
        "bncpu": bncpu.__version__,
        "isa": bncpu.isa(),
        "openmp": bncpu.openmp_enabled(),
        "default_threads": bncpu.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "onednn": _onednn.version(),
        "onednn_missing": _onednn.unavailable_reason(),
        "floor": floor_description(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wait_policy": wait_policy(),
    }


def wait_policy():
    """The OpenMP wait policy in effect, from the environment libgomp read at start-up."""
    settings = [f"{name}={os.environ[name]}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                if os.environ.get(name)]
    return ", ".join(settings) or "default (workers spin ~300,000 iterations, then sleep)"


def reuse_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse: returns True when it agreed.

    By default glibc maps each large block (above a threshold that moves with the history
    of frees, up to 32 MB) fresh from the kernel and hands it back when freed, so a call
    that allocates a large result may pay a page fault per 4 KiB, or not, depending on
    which cases ran before. Fixed, high thresholds give every implementation the steady
    state of a long-running program, and timings that do not depend on case order.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # from glibc's malloc.h
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))


def cpu_snapshot():
    """(wall seconds, CPU-seconds the whole machine has run, CPU-seconds this process has
    run), for ``others_share``; the machine's figure is None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(field) for field in stat.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy,
        # steal being time the hypervisor gave to other guests.
        machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = None
    return time.perf_counter(), machine, time.process_time()


def others_share(before, after):
    """Fraction of the machine's CPU capacity other processes used between two snapshots:
    the noise a run suffered (None when unknown)."""
    if before[1] is None or after[1] is None:
        return None
    capacity = (after[0] - before[0]) * (os.cpu_count() or 1)
    others = (after[1] - before[1]) - (after[2] - before[2])
    return min(1.0, max(0.0, others / capacity)) if capacity > 0 else None


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    """Per-call times (seconds) of one implementation on one case, or why there are none;
    ``note`` says which variant ran when there is a choice (oneDNN's layout)."""
    samples: list = dataclasses.field(default_factory=list)
    calls_per_sample: int = 1
    status: str = "ok"       # "ok", "n/a: <reason>" or "error: <message>"
    note: str = None
    faults: int = 0          # minor page faults during the samples (Linux, macOS)

    @property
    def faults_per_call(self):
        calls = len(self.samples) * self.calls_per_sample
        return self.faults / calls if calls else None

    @property
    def median(self):
        return float(np.median(self.samples)) if self.status == "ok" and self.samples else None


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to time one case: at least ``min_rounds`` round-robin rounds, then more
    until ``seconds`` have passed (at most ``max_rounds``); but never more than
    ``max_seconds`` once 3 rounds are in (a busy machine can make every call 10x
    slower than its calibration, and the report must still end). A sample loops the call
    until it lasts ``sample_seconds``. Implementations timed apart (the reference) then
    get up to ``apart_samples`` samples, at most ``apart_seconds`` in all, and when a
    single call takes longer than ``once_seconds`` its calibration call is its only
    sample."""
    seconds: float
    max_seconds: float
    sample_seconds: float
    min_rounds: int
    max_rounds: int
    apart_samples: int
    apart_seconds: float
    once_seconds: float


# min_rounds: with 7 samples (and the reference's calls between them) the report's
# (32, 64, 56, 56) backward once read 0.93x torch where a two-way round-robin read 2.8x;
# 11 rounds without the reference agree with benchmarks/two_way.py (README).
FULL = Budget(seconds=0.5, max_seconds=6.0, sample_seconds=0.004, min_rounds=11,
              max_rounds=101, apart_samples=7, apart_seconds=0.5, once_seconds=0.5)
QUICK = Budget(seconds=0.3, max_seconds=3.0, sample_seconds=0.003, min_rounds=9,
               max_rounds=61, apart_samples=5, apart_seconds=0.3, once_seconds=0.3)


def describe(error):
    """A Timing status for an implementation that could not run: 'n/a: ...' when it does
    not exist here (not installed, no CPU kernel), 'error: ...' when it failed."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (Unavailable, NotImplementedError)):
        if "CPU" in message and "backend" in message:
            message = "no CPU kernel in torch"
        return f"n/a: {message}"
    return f"error: {type(error).__name__}: {message}"


# What a sample is timed with: wall-clock time, or (``use_cpu_clock``, one thread only)
# the calling thread's CPU time, which a busy machine's other processes do not inflate.
clock = time.perf_counter


def use_cpu_clock(enabled):
    """Time samples with the calling thread's CPU time (True) or the wall clock (False).
    Only meaningful at 1 thread, where every implementation runs on the calling thread."""
    global clock
    clock = time.thread_time if enabled else time.perf_counter


def _time_call(call):
    start = clock()
    call()
    return clock() - start


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _sample(timing, call):
    """One sample of ``call`` into ``timing``: its time per call and its page faults.

    A short call (several per sample) is called once untimed first: its inputs and
    results fit in the caches, and without that call its time would depend on what the
    previous implementation left there (the floor's or oneDNN's buffers)."""
    if timing.calls_per_sample > 1:
        call()
    faults = _minor_faults()
    begin = clock()
    for _ in range(timing.calls_per_sample):
        call()
    timing.samples.append((clock() - begin) / timing.calls_per_sample)
    timing.faults += _minor_faults() - faults


def measure(calls, budget):
    """Time ``calls`` ({name: callable or Exception}); {name: Timing}.

    The implementations not in ``TIMED_APART`` run round-robin, a sample of each per
    round, so that a noisy neighbour hits all of them alike; those timed apart follow,
    back to back, so that their long calls (and the memory they churn) do not sit between
    the others' samples."""
    timings = {name: Timing() for name in calls}
    runnable = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name, call in calls.items():
            if isinstance(call, Exception):
                timings[name].status = describe(call)
                continue
            timings[name].note = getattr(call, "layout", None)
            try:
                # The first call pays one-time costs (first touch of fresh memory, thread
                # start-up); unless it was already too long, the fastest of the next three
                # calibrates (one call, on a busy machine, was off by up to 10x).
                per_call = _time_call(call)
                if per_call <= budget.once_seconds:
                    per_call = min(_time_call(call) for _ in range(3 if per_call < 0.1 else 1))
            except Exception as error:
                timings[name].status = describe(error)
                continue
            runnable[name] = call
            if per_call > budget.once_seconds:
                timings[name].samples.append(per_call)
            timings[name].calls_per_sample = max(1, int(budget.sample_seconds
                                                        / max(per_call, 1e-7)))
        rotation = [name for name in runnable if name not in TIMED_APART]
        start = time.perf_counter()
        for rounds in range(1, budget.max_rounds + 1):
            for name in rotation:
                _sample(timings[name], runnable[name])
            elapsed = time.perf_counter() - start
            if rounds >= budget.min_rounds and elapsed >= budget.seconds:
                break
            if rounds >= 3 and elapsed >= budget.max_seconds:
                break
        for name in runnable:
            if name not in TIMED_APART:
                continue
            timing, start = timings[name], time.perf_counter()
            while (len(timing.samples) < budget.apart_samples
                   and time.perf_counter() - start < budget.apart_seconds):
                _sample(timing, runnable[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


# ---------------------------------------------------------------------------------------
# Ratios and targets
# ---------------------------------------------------------------------------------------
# Metrics that are bncpu's time over another's (at most the bound); the others are
# speed-ups, another's time over bncpu's (at least the bound).
AT_MOST = ("floor", "bn_alone")


@dataclasses.dataclass(frozen=True)
class Target:
    """``metric``: a peer ('torch', 'reference', 'onednn', 'onednn_best': their time /
    bncpu's time, >= bound), 'floor' (bncpu's time / the floor's, <= bound) or
    'bn_alone' (a fused operation's time / bncpu's batch norm alone, <= bound)."""
    metric: str
    bound: float

    def value(self, ratios):
        return ratios.get(self.metric)

    def met(self, ratios):
        value = self.value(ratios)
        if value is None:
            return None
        return value <= self.bound if self.metric in AT_MOST else value >= self.bound

    def __str__(self):
        return f"{self.metric}{'<=' if self.metric in AT_MOST else '>='}{self.bound:.3g}"

    @classmethod
    def parse(cls, text):
        """The target whose ``str`` is ``text`` (as a report's JSON records it)."""
        metric, _, bound = text.partition("<=" if "<=" in text else ">=")
        return cls(metric, float(bound))


PEERS = ("torch", "onednn", "onednn_best", "reference")


def ratios(medians):
    """Speed-ups over the peers (their time / bncpu's) and bncpu's time over the floor's.
    oneDNN runs on preallocated buffers, so its speed-ups are over ``bncpu_out`` (bncpu
    into ``out=``); the others allocate their results, as ``bncpu`` does."""
    found = {}
    for name in PEERS:
        if name.startswith("onednn"):
            own = medians.get("bncpu_out") or medians.get("bncpu")
        else:
            own = medians.get("bncpu")
        if own and medians.get(name):
            found[name] = medians[name] / own
    if "onednn" in found and "onednn_best" not in found:
        found["onednn_best"] = found["onednn"]   # one layout (_ONE_LAYOUT)
    for name, other in (("floor", "floor"), ("bn_alone", "bncpu_bn")):
        if medians.get("bncpu") and medians.get(other):
            found[name] = medians["bncpu"] / medians[other]
    return found


_FEW_CHANNELS = (4, 1, 512, 512)
_SMALL_SHAPES = ((256, 120), (256, 16, 8, 8))
# The first speed round, (32, 64, 56, 56) float32 at 2 threads: {op: (vs torch, x floor)}.
_MAIN_TARGETS = {"bn_fwd_train": (4.0, 2.0), "bn_fwd_eval": (1.0, 1.25),
                 "bn_bwd_train": (3.0, None)}


# Fused batch norm, 2 threads, float32: the training forward costs at most 1.1x batch norm
# alone and beats torch's composition (batch norm, [add_,] relu_) 4x; the backward beats
# threshold_backward + batch-norm backward 2x; inference 1.8x torch, within 1.1x the floor.
_FUSED_TARGETS = {"bnr_fwd_train": (("bn_alone", 1.1), ("torch", 4.0)),
                  "bnar_fwd_train": (("torch", 4.0),),
                  "bnr_bwd_train": (("torch", 2.0),),
                  "bnr_fwd_eval": (("torch", 1.8), ("floor", 1.1))}


def _spatial(shape):
    return math.prod(shape[2:])


def targets(case, n_threads):
    """The goals that apply to ``case`` timed at ``n_threads``."""
    found = []
    if case.op in _BN_MAIN_OPS or case.op in FUSED_OPS or case.op.startswith(
            ("ln_", "gn_", "in_", "rms_")):
        # Not slower than PyTorch on any row, at any thread count; the small shapes of
        # the first round also: per-call time within 1.5x of PyTorch's.
        found.append(Target("torch", 1.0))
        if case.shape in _SMALL_SHAPES:
            found.append(Target("torch", 1 / 1.5))
    if case.dtype == "float32" and case.op in _BN_MAIN_OPS:
        # oneDNN: within 0.9x of its best layout on every batch-norm shape; (N, C) input,
        # where it has one layout, at least as fast; channels-last at least as fast as
        # oneDNN on the same NHWC data.
        if case.axis == -1:
            found.append(Target("onednn", 1.0))
        else:
            found.append(Target("onednn_best", 1.0 if len(case.shape) == 2 else 0.9))
        # Short rows (S = 1, S = 49) at the streaming floor in eval, within 1.3x of it
        # in the training forward.
        if _spatial(case.shape) in (1, 49) and case.op in ("bn_fwd_eval", "bn_fwd_train"):
            found.append(Target("floor", 1.0 if case.op == "bn_fwd_eval" else 1.3))
    if case.dtype == "float32" and case.op.startswith("ln_"):
        found.append(Target("onednn", 1.0))
    if n_threads != 2 or case.dtype != "float32":
        return found
    if case.op in _MAIN_TARGETS and case.shape in (_MAIN_SHAPE, _FEW_CHANNELS):
        vs_torch, x_floor = _MAIN_TARGETS[case.op]
        if vs_torch > 1.0:
            found.append(Target("torch", vs_torch))
        if case.shape == _MAIN_SHAPE:
            if x_floor is not None:
                found.append(Target("floor", x_floor))
            found.append(Target("reference", 20.0))
    if case.op.startswith(("ln_", "gn_", "in_", "rms_")):
        found.append(Target("torch", 1.5))
        if case.op.endswith("_fwd"):
            found.append(Target("floor", 2.0))
    if case.op in _FUSED_TARGETS:
        found += [Target(metric, bound) for metric, bound in _FUSED_TARGETS[case.op]]
    return found


def run_case(case, thread_counts, budget):
    """Make the inputs of ``case`` once and time it at each thread count: yields
    (n_threads, {implementation: Timing}) as each thread count finishes."""
    inputs = Inputs(case)
    for n_threads in thread_counts:
        set_threads(n_threads)
        yield n_threads, measure(implementation_calls(inputs, n_threads), budget)


def format_seconds(seconds):
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"
