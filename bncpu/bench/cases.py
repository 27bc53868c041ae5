"""What the speed report times: operations, from the registry, on the report's shapes.

An operation is one of a registry function's ``Timed`` entries (bncpu/_registry.py): its
key, its label and the options its inputs are made with; or a framework's training step
of batch norm (``FRAMEWORK_OPERATIONS``: the registry's forward and backward, run inside
JAX or Keras). A case is one operation on one input shape and dtype; its inputs come from
the function's own generator, drawn here so that each large array starts on a cache line
and is made once for all the cases of a shape.
"""
import dataclasses
import functools
import math
import zlib

import numpy as np

from bncpu._registry import FUNCTIONS, Function
from bncpu.bench import frameworks


@dataclasses.dataclass(frozen=True)
class Operation:
    """One timed operation: ``spec`` is the registry function, ``options`` what its
    generator is asked for (mode, residual). A framework's training step (``framework``:
    'jax' or 'keras', bncpu/bench/frameworks.py) runs ``spec`` (the forward) and then
    ``backward``."""
    key: str
    label: str
    spec: Function
    options: dict
    backward: Function = None
    framework: str = None

    @property
    def function(self):
        return self.spec.name

    @property
    def streams(self):
        """The arguments of the input's size it reads: the bytes the floor moves."""
        steps = (self.spec,) if self.backward is None else (self.spec, self.backward)
        return sum((step.streamed(self.options) for step in steps), ())

    @property
    def reads(self):
        return len(self.streams)

    @property
    def writes(self):
        """Input-sized results: the one an out= takes (a training step: y and dx)."""
        if self.backward is not None:
            return 2
        return 1 if self.spec.has_out else 0


OPERATIONS = {timed.key: Operation(timed.key, timed.label, spec, timed.options)
              for spec in FUNCTIONS.values() for timed in spec.timed}

# A training step (forward + backward) of the registry's batch norm inside a framework,
# against the framework's own batch norm.
FRAMEWORK_OPERATIONS = {
    key: Operation(key, label, FUNCTIONS["batch_norm_forward"], dict(training=True),
                   backward=FUNCTIONS["batch_norm_backward"], framework=framework)
    for key, label, framework in (
        ("jax_bn_step", "bncpu.jax batch_norm fwd+bwd", "jax"),
        ("keras_bn_step", "bncpu.keras BatchNorm fwd+bwd", "keras"))}

# Registry functions the report does not time, and why.
NOT_TIMED = {spec.name: spec.not_timed for spec in FUNCTIONS.values() if not spec.timed}


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
        return OPERATIONS.get(self.op) or FRAMEWORK_OPERATIONS[self.op]

    @property
    def family(self):
        return self.operation.spec.family

    @property
    def options(self):
        """The options of the function's generator for this case."""
        options = dict(self.operation.options, axis=self.axis)
        if self.family == "group_norm":
            options["groups"] = self.param
        if self.family in ("layer_norm", "rms_norm"):
            options["normalized_dims"] = len(self.param)
        return options

    @property
    def label(self):
        """Operation label with its parameter, e.g. 'group_norm fwd G=32'."""
        label = self.operation.label
        if self.family in ("layer_norm", "rms_norm"):
            label = f"{label} over {len(self.param)}d"
        if self.family == "group_norm":
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
MAIN_SHAPE = (32, 64, 56, 56)
# The forward and backward batch-norm functions (the split-phase ones aside).
BN_MAIN_OPS = ("bn_fwd_train", "bn_fwd_eval", "bn_bwd_train", "bn_bwd_eval")
# --quick: the shapes with targets, all ops on the main one, the forward and backward on
# the others.
QUICK_BN = {(256, 120): ("float32",), (256, 16, 8, 8): ("float32",),
            (32, 64, 56, 56): ("float32",), (4, 1, 512, 512): ("float32",)}
QUICK_BN_OPS = ("bn_fwd_train", "bn_fwd_eval", "bn_bwd_train")

# The other norms: (operation prefix, shape, param, in --quick).
OTHER_NORMS = (
    ("ln", (8192, 1024), (1024,), True),
    ("ln", (32, 64, 56, 56), (64, 56, 56), False),
    ("gn", (32, 64, 56, 56), 32, True),
    ("gn", (8, 256, 28, 28), 32, False),
    ("in", (32, 64, 56, 56), None, True),
    ("rms", (8192, 1024), (1024,), True),
)

# Channels-last data (axis=-1): the main shape's data in NHWC, and group norm on a
# ResNeXt-like map.
CHANNELS_LAST_BN = (32, 56, 56, 64)
CHANNELS_LAST_GN = ((8, 28, 28, 256), 32)
# Batch norm fused with ReLU (and a residual add).
FUSED_SHAPES = ((32, 64, 56, 56), (32, 256, 56, 56))
FUSED_OPS = tuple(key for key, op in OPERATIONS.items() if op.spec.family == "fused")


def untimed_functions():
    """Registry functions that no case times and ``NOT_TIMED`` does not explain (the
    registry refuses such an entry; this checks the case tables cover what it times)."""
    timed = {case.operation.function for case in cases()}
    return sorted(set(FUNCTIONS) - timed - set(NOT_TIMED))


def cases(quick=False):
    """Every case, in report order (batch-norm shapes, channels-last and fused batch
    norm, the other norms, then the framework steps of the frameworks that import
    here)."""
    found = []
    for shape, dtypes in BN_SHAPES:
        for dtype in dtypes:
            for op in BN_OPS:
                in_quick = (dtype in QUICK_BN.get(shape, ())
                            and (op in QUICK_BN_OPS or shape == MAIN_SHAPE))
                found.append(Case(op, shape, dtype, quick=in_quick))
    for op in BN_MAIN_OPS:
        found.append(Case(op, CHANNELS_LAST_BN, "float32", quick=op in QUICK_BN_OPS, axis=-1))
    for shape in FUSED_SHAPES:
        for op in FUSED_OPS:
            found.append(Case(op, shape, "float32",
                              quick=shape == MAIN_SHAPE and op == "bnr_fwd_train"))
    for prefix, shape, param, in_quick in OTHER_NORMS:
        for direction in ("fwd", "bwd"):
            found.append(Case(f"{prefix}_{direction}", shape, "float32", param, in_quick))
    shape, groups = CHANNELS_LAST_GN
    for op in ("gn_fwd", "gn_bwd"):
        found.append(Case(op, shape, "float32", groups, axis=-1))
    for op, operation in FRAMEWORK_OPERATIONS.items():
        if frameworks.missing(operation.framework) is None:
            found.append(Case(op, CHANNELS_LAST_BN, "float32", quick=True, axis=-1))
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


class _SharedDraws:
    """The registry generators' draws for the report: each array from a generator of its
    own (seeded by its name), on a cache line, and the large ones made once for all the
    cases of a shape (see ``_SHARED``)."""

    def __init__(self, seed):
        self._seed = seed

    def _rng(self, name):
        return np.random.default_rng([self._seed, zlib.crc32(name.encode())])

    def normal(self, name, shape, dtype, loc=0.0, scale=1.0):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        key = (name, shape, np.dtype(dtype).name, self._seed)
        if key in _SHARED:
            return _SHARED[key]
        values = aligned_empty(shape, dtype)
        values[...] = self._rng(name).standard_normal(shape, dtype=np.dtype(dtype))
        values *= scale
        values += loc
        if values.nbytes >= _SHARED_BYTES:
            if any(other[1:3] != key[1:3] for other in _SHARED):
                _SHARED.clear()   # keep one shape's arrays only
            _SHARED[key] = values
        return values

    def uniform(self, name, shape, dtype, low, high):
        return self._rng(name).uniform(low, high, shape).astype(dtype)


class Inputs:
    """The arguments of one case, made once (on first use) and shared by all
    implementations; statistics the backward and split-phase calls take come from
    bncpu's own forward steps, as the registry's generators make them."""

    def __init__(self, case, seed=0):
        self.case = case
        self._seed = seed
        self.onednn_primitives = {}   # by (layout, threads): see peers.onednn_call

    @functools.cached_property
    def args(self):
        return self.case.operation.spec.inputs(self.case.shape, self.case.dtype,
                                               draws=_SharedDraws(self._seed),
                                               **self.case.options)

    @property
    def x(self):
        return self.args["input"]

    @functools.cached_property
    def grad_output(self):
        """A training step's output gradient: its backward's, from the same draws."""
        backward = self.case.operation.backward
        return backward.inputs(self.case.shape, self.case.dtype, draws=_SharedDraws(self._seed),
                               **self.case.options)["grad_output"]

    def streams(self):
        """The input-sized arrays the operation reads."""
        return tuple(self.args[name] for name in self.case.operation.streams)
