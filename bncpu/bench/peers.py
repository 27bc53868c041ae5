"""What a case's implementations run: bncpu, its NumPy twin, PyTorch, oneDNN and the
streaming floor, each a zero-argument callable on the case's inputs.

``bncpu``        the library, called as a user calls it (each call allocates its results);
``bncpu_out``    the same, writing the input-sized result into a preallocated ``out=``
                 (the other results are small);
``bncpu_bn``     for the fused operations only: the function they extend (batch norm
                 alone) on the same input, the registry's ``baseline``;
``torch``        PyTorch's CPU counterpart, the registry's (its split-phase batch-norm ops
                 are CUDA-only: "n/a");
``onednn``       oneDNN's primitive on the case's own layout; ``onednn_best`` on the
                 fastest of its layouts for the shape (bncpu/bench/onednn.py);
``floor``        the streaming floor: one pass over the bytes the operation cannot avoid
                 moving (``Operation.streams`` and ``writes``), written into a preallocated
                 array, at the same thread count. With torch: ``torch.add(b, x, alpha=a,
                 out=y)`` (y = a*x + b), ``torch.add(dy, x, out=dx)``, or ``torch.sum`` of
                 each input for the reductions. Without torch: NumPy's ``multiply``/``add``/
                 ``add.reduce`` on one contiguous slice per thread (NumPy releases the GIL);
``reference``    ``bncpu.reference``, the plain-NumPy twin with the same name and arguments;
``stock``        for the Keras and JAX rows only: the framework's own batch norm, whose
                 training step the row's ``bncpu`` (bncpu inside the framework) is compared
                 with (bncpu/bench/frameworks.py); those rows have no other implementation.
"""
import functools
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bncpu._registry import EPS, FUNCTIONS
from bncpu.bench import frameworks, onednn
from bncpu.bench.cases import FUSED_OPS, aligned_empty
from bncpu.bench.timing import Unavailable

try:
    import torch
except ImportError:
    torch = None

# All but the reference are timed round-robin (timing.TIMED_APART).
IMPLEMENTATIONS = ("bncpu", "bncpu_out", "bncpu_bn", "torch", "onednn", "onednn_best", "floor",
                   "stock", "reference")


def implementation_calls(inputs, n_threads):
    """{implementation: callable or Exception}, in round-robin order."""
    return {impl: implementation_call(inputs, impl, n_threads) for impl in IMPLEMENTATIONS}


def implementation_call(inputs, implementation, n_threads):
    """The zero-argument callable that runs ``implementation`` on ``inputs``, or the
    Exception that says why it cannot (``Unavailable``, or a bncpu error while preparing a
    backward case from its forward)."""
    framework = inputs.case.operation.framework
    if framework is not None:
        try:
            return frameworks.implementation_call(inputs, implementation, framework)
        except Exception as error:
            return error
    if implementation == "stock":
        return Unavailable("only for the Keras and JAX rows")
    if implementation == "torch" and torch is None:
        return Unavailable("torch not installed")
    try:
        if implementation == "floor":
            return floor_call(inputs, n_threads)
        if implementation.startswith("onednn"):
            return onednn_call(inputs, implementation == "onednn_best", n_threads)
        spec, args = inputs.case.operation.spec, inputs.args
        if implementation == "torch":
            call = spec.torch_call(torch, args, tensor_converter(inputs.case))
            return Unavailable("no CPU kernel in torch") if call is None else call
        if implementation == "bncpu_bn":
            if spec.baseline is None:
                return Unavailable("only for fused operations")
            spec = FUNCTIONS[spec.baseline]
        if implementation == "bncpu_out":
            if not spec.has_out:
                return Unavailable(f"{spec.name} takes no out=")
            return spec.bind(args, out=aligned_empty(inputs.x.shape, inputs.x.dtype))
        return spec.bind(args, twin=implementation == "reference")
    except Exception as error:
        return error


# ---------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------
def _as_tensor(value):
    """An ndarray as a tensor sharing its memory; anything else unchanged."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def tensor_converter(case):
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


# ---------------------------------------------------------------------------------------
# The streaming floor
# ---------------------------------------------------------------------------------------
def floor_description():
    if torch is not None:
        return ("torch, one multi-threaded pass: y = a*x + b (torch.add(b, x, alpha=a, out=y)), "
                "dx = dy + x (torch.add(..., out=)), or torch.sum of each input for reductions")
    return ("NumPy, one pass split over the threads: y = a*x (np.multiply(..., out=)), "
            "dx = dy + x (np.add(..., out=)), or np.add.reduce of each input for reductions")


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


# ---------------------------------------------------------------------------------------
# oneDNN
# ---------------------------------------------------------------------------------------
_ONEDNN_BATCH_NORM = {"bn_fwd_train": "forward_training", "bn_fwd_eval": "forward_inference",
                      "bn_bwd_train": "backward_training", "bn_bwd_eval": "backward_inference"}

# (N, C) batch norm and layer norm have one layout: the oneDNN column is also the best.
ONE_LAYOUT = "one layout: as the oneDNN column"


def cached_primitive(inputs, layout, n_threads, make):
    """The primitive of ``inputs`` in ``layout`` for ``n_threads``, made once for both
    oneDNN columns. A oneDNN primitive keeps the thread count it was created with: one
    made at 1 thread and reused at 2 (the report's ``--threads 1,2`` makes a case's inputs
    once) ran single-threaded, and the 2-thread oneDNN columns read up to 2.9x too slow."""
    key = (layout, n_threads)
    if key not in inputs.onednn_primitives:
        inputs.onednn_primitives[key] = make()
    return inputs.onednn_primitives[key]


def _variance(invstd):
    return 1.0 / invstd.astype(np.float64) ** 2 - EPS


def _onednn_layer_norm(inputs):
    """Layer norm over the case's normalized shape, flattened: oneDNN normalizes the last
    dimension of a (rows, width) tensor. Its backward computes the shift's gradient when
    given a shift, as bncpu's and torch's do: zeros."""
    args = inputs.args
    x = args["input"].reshape(-1, math.prod(args["normalized_shape"]))
    weight = args["weight"]
    bias = args.get("bias", np.zeros_like(weight))
    if inputs.case.op == "ln_fwd":
        return onednn.layer_norm("forward_training", x, weight, bias, eps=EPS)
    return onednn.layer_norm("backward", x, weight, bias, args["mean"], _variance(args["rstd"]),
                             args["grad_output"].reshape(x.shape), eps=EPS)


def onednn_call(inputs, best, n_threads):
    """oneDNN's primitive for ``inputs``: on the case's layout, or (``best``) on the
    fastest of the layouts oneDNN has for the shape; the callable's ``layout`` says which."""
    case, args = inputs.case, inputs.args
    onednn.library()   # Unavailable when not installed
    if case.dtype != "float32":
        raise Unavailable("oneDNN: float32 only (no float64 normalization on the CPU)")
    onednn.set_num_threads(n_threads)
    if case.op in _ONEDNN_BATCH_NORM:
        kind = _ONEDNN_BATCH_NORM[case.op]
        if kind == "backward_training":
            mean, variance = args["save_mean"], _variance(args["save_invstd"])
        elif kind.endswith("inference"):
            mean, variance = args["running_mean"], args["running_var"]
        else:
            mean, variance = (np.zeros_like(args["running_mean"]),
                              np.ones_like(args["running_var"]))
        x, dy = args["input"], args["grad_output"] if kind.startswith("backward") else None
        own_layout = "plain"
        if case.axis == -1:   # channels-last data: oneDNN's NHWC is its own layout
            if x.ndim != 4:
                raise Unavailable("channels-last: this harness runs 4-D input")
            x, dy = (None if a is None else a.transpose(0, 3, 1, 2) for a in (x, dy))
            own_layout = "nhwc"
        if best and x.ndim != 4:
            raise Unavailable(ONE_LAYOUT)
        # oneDNN's primitive always has a shift (the backward computes its gradient, as
        # bncpu's does): the backward's arguments have none, so zeros.
        bias = args.get("bias", np.zeros_like(args["weight"]))
        make = functools.partial(onednn.batch_norm, kind, x, args["weight"], bias, mean,
                                 variance, dy, eps=EPS)
        if not best:
            return cached_primitive(inputs, own_layout, n_threads,
                                    functools.partial(make, layout=own_layout))
        primitives = []
        for layout in onednn.LAYOUTS:
            try:
                primitives.append(cached_primitive(
                    inputs, layout, n_threads,
                    functools.partial(make, layout=layout, optimized_only=True)))
            except Unavailable:   # oneDNN's reference code for this layout
                continue
        if not primitives:
            raise Unavailable("oneDNN has only reference code for this shape")
        return onednn.fastest(primitives)
    if case.op in ("ln_fwd", "ln_bwd"):
        if best:
            raise Unavailable(ONE_LAYOUT)
        return cached_primitive(inputs, "plain", n_threads,
                                functools.partial(_onednn_layer_norm, inputs))
    if case.op in FUSED_OPS:
        raise Unavailable("oneDNN's batch norm + ReLU fusion is not in this harness")
    raise Unavailable(f"oneDNN 3.2 has no {case.operation.label.split()[0]} primitive")
