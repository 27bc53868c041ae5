"""Argument checks and conversions for the public API: one place, pure Python.

Rules (NumPy's, with PyTorch's names in the messages):
* Inputs are array-likes. float32 and float64 are kept; float16 is computed and
  returned as float32, and so is bfloat16 (ml_dtypes.bfloat16); integer, bool and other
  real types as float64 (like np.mean). Where half-precision kernels exist (batch norm's
  forward and backward: ``as_input(..., half=True)``), float16 and bfloat16 data are
  kept, computed in float32, with float32 parameters and statistics (param_dtype).
  Complex, object, string and datetime inputs raise TypeError naming the dtype.
  Masked arrays raise TypeError (the mask would be silently lost); other ndarray
  subclasses such as np.matrix are converted to plain arrays.
* Any layout is accepted (Fortran order, negative or zero strides, byte-swapped):
  the kernels get a native C-contiguous copy when the input is not one already.
* Running statistics are 1-D ndarrays of the compute dtype (as in PyTorch). In
  training they are updated in place, so they must also be writeable and C-contiguous
  and are never converted; in evaluation they are only read.
* ``out`` follows NumPy's contract: an ndarray of the result's shape, writeable,
  castable from the result dtype under 'same_kind'. It may be non-contiguous or alias
  an input; the kernels then write to a temporary that is copied into ``out``. It may
  not share memory with running statistics the call updates (one write would be lost).
* Flags (``training``, ``use_input_stats``) are bools, Python's or NumPy's: a string or
  a number is a TypeError, as in PyTorch. Numbers too large for a float or for int64
  are a ValueError naming the argument.
* A per-channel array of the right size but another shape (``(1, C, 1, 1)``, ``()``)
  is a ValueError that says its shape and suggests ``.reshape(-1)``.
* Everything is checked before any kernel runs, so an error writes nothing.
"""
import math
import numbers
import operator

import numpy as np

_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
_FLOAT16 = np.dtype(np.float16)


def is_bfloat16(dtype):
    """ml_dtypes.bfloat16, recognized without importing ml_dtypes (an array of it exists
    only once its user has)."""
    return dtype.kind == "V" and dtype.name == "bfloat16" and dtype.itemsize == 2


def is_half(dtype):
    """float16 or bfloat16: the data dtypes of the half-precision kernels."""
    return dtype == _FLOAT16 or is_bfloat16(dtype)


def param_dtype(dtype):
    """The dtype of the parameters and statistics that go with data of ``dtype``: float32
    for half-precision data, else the data's own."""
    return _FLOAT32 if is_half(dtype) else dtype


def compute_dtype(dtype, name):
    """The kernel dtype for an input dtype, or TypeError."""
    if dtype == _FLOAT32 or dtype == _FLOAT64:
        return dtype
    if (dtype.kind == "f" and dtype.itemsize <= 4) or is_bfloat16(dtype):
        return _FLOAT32
    if dtype.kind in "biuf":
        return _FLOAT64
    raise TypeError(f"{name} has unsupported dtype {dtype}: bncpu computes with real numbers "
                    f"(float32, float64; integer and bool inputs are computed as float64)")


def as_array(value, name):
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; bncpu does not handle masks: pass "
                        f"{name}.filled(value) or {name}.data explicitly")
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} cannot be converted to an array: {exc}") from None


def _plain(value, dtype):
    """Whether ``value`` is a plain (not a subclass) C-contiguous ndarray of ``dtype``, one
    of the native compute dtypes: what the common call passes, and what every check below
    would let through unchanged. The fast paths test this first: the full checks cost
    about as much as the kernel on inputs of a few hundred KB ((256, 120) inference)."""
    return (type(value) is np.ndarray and (value.dtype is dtype or value.dtype == dtype)
            and value.flags.c_contiguous)


def as_input(value, name="input", min_ndim=2, dtype=None, half=False):
    """Array, C-contiguous, native, of its compute dtype (or of ``dtype`` when given);
    half: float16 and bfloat16 data are kept (the caller has their kernels)."""
    if type(value) is np.ndarray and value.ndim >= min_ndim and value.flags.c_contiguous:
        if (value.dtype == dtype if dtype is not None
                else value.dtype == _FLOAT32 or value.dtype == _FLOAT64
                or (half and is_half(value.dtype))):
            return value   # the fast path (see _plain): kept as it is
    array = as_array(value, name)
    if dtype is None:
        dtype = array.dtype if half and is_half(array.dtype) else compute_dtype(array.dtype, name)
    elif array.dtype.kind not in "biuf":
        compute_dtype(array.dtype, name)   # raises the TypeError
    if array.ndim < min_ndim:
        raise ValueError(f"Expected {name} with at least {min_ndim} dimensions, "
                         f"got {name} of shape {array.shape}")
    if not (array.dtype == dtype and array.flags.c_contiguous and array.dtype.isnative):
        array = np.ascontiguousarray(array, dtype=dtype)
    return array


# Layout: where the channels lie. The kernels see a C-contiguous buffer as (outer, C, inner):
# channel j owns the values [i, j, k] for every outer index i and inner index k. Channels
# first, (N, C, *spatial) is (N, C, S); channels last, (N, *spatial, C) is the (N·S, C, 1)
# matrix of the 2-D kernels; any channel axis is some (outer, C, inner), without a copy.
def channel_axis(axis, ndim, batch_axis_allowed=True):
    """``axis`` as an index in [0, ndim) (negative values count from the end).

    With ``batch_axis_allowed=False`` (group and instance norm, whose axis 0 holds the
    samples) the channel axis must not be axis 0.
    """
    if type(axis) is int and 0 <= axis < ndim and (axis or batch_axis_allowed):
        return axis   # the usual call: nothing to convert or report
    if isinstance(axis, bool):
        raise TypeError("axis must be an integer, got bool")
    try:
        index = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None
    if not -ndim <= index < ndim:
        raise ValueError(f"axis {index} is out of bounds for an input of {ndim} dimensions")
    index %= ndim
    if index == 0 and not batch_axis_allowed:
        raise ValueError(f"axis {axis} is the batch axis (0) of the input; the channel axis "
                         f"must be another one (1 for (N, C, *), -1 for (N, *, C))")
    return index


def channel_layout(shape, axis):
    """(outer, channels, inner) of a C-contiguous array of ``shape`` whose channels lie
    along ``axis`` (an index from ``channel_axis``)."""
    if axis == 1:   # (N, C, *spatial): one product, not two
        return shape[0], shape[1], math.prod(shape[2:])
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])


def check_channel_shape(array, name, c, updated=False):
    """ValueError unless ``array`` has shape (c,), saying what is wrong: the number of
    elements (PyTorch's message), or only the shape, with the fix."""
    if array.shape == (c,):
        return
    if array.size != c:
        raise ValueError(f"{name} should contain {c} elements not {array.size}"
                         + ("" if array.ndim == 1 else f" (it has shape {array.shape})"))
    fix = (f"pass {name}.reshape(-1)" if not updated else
           f"pass {name}.reshape(-1), a view of it when it is contiguous, so that the update "
           f"reaches it")
    raise ValueError(f"{name} has shape {array.shape} but must have shape ({c},), one element "
                     f"per channel: {fix}")


def per_channel(value, name, c, dtype):
    """Optional per-channel parameter (weight, bias): None or a contiguous 1-D copy."""
    if value is None:
        return None
    if _plain(value, dtype) and value.shape == (c,):
        return value
    array = as_array(value, name)
    compute_dtype(array.dtype, name)
    check_channel_shape(array, name, c)
    return np.ascontiguousarray(array, dtype=dtype)


def running_stat(value, name, c, dtype, updated=True, data_dtype=None):
    """A running statistic: strict checks, and never converted when it is ``updated`` in
    place; in evaluation it is only read, so any layout will do, and it may also have the
    data's dtype ``data_dtype`` (half-precision data with half-precision statistics)."""
    if value is None:
        return None
    if type(value) is np.ndarray and value.shape == (c,) and value.dtype == dtype:
        flags = value.flags   # (one flags object: each access builds one)
        if flags.c_contiguous and (flags.writeable or not updated):
            return value
    if not isinstance(value, np.ndarray) or isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), "
                        f"got {type(value).__name__}")
    check_channel_shape(value, name, c, updated)
    if value.dtype.newbyteorder("=") != dtype and not (
            not updated and data_dtype is not None and value.dtype == data_dtype):
        raise TypeError(f"{name} has dtype {value.dtype} but the input is computed as {dtype}; "
                        f"running statistics must have the compute dtype")
    if not updated:
        return np.ascontiguousarray(value, dtype=dtype)
    if not value.dtype.isnative:
        raise TypeError(f"{name} has dtype {value.dtype}, byte-swapped, but is updated in place")
    if not value.flags.writeable:
        raise ValueError(f"{name} is read-only but is updated in place")
    if not value.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous: it is updated in place")
    return value


def running_pair(running_mean, running_var, c, dtype, required, updated=True, data_dtype=None):
    rm = running_stat(running_mean, "running_mean", c, dtype, updated, data_dtype)
    rv = running_stat(running_var, "running_var", c, dtype, updated, data_dtype)
    if (rm is None) != (rv is None) or (required and rm is None):
        what = "must be given when training=False" if required else "must be given together"
        raise ValueError(f"running_mean and running_var {what}")
    if rm is not None and c > 0 and np.may_share_memory(running_mean, running_var):
        raise ValueError("running_mean and running_var must not share memory")
    return rm, rv


def stats_array(value, name, c):
    """Per-channel statistics of the split-phase functions: float64, 1-D, c values."""
    array = as_array(value, name)
    compute_dtype(array.dtype, name)
    check_channel_shape(array, name, c)
    return np.ascontiguousarray(array, dtype=np.float64)


INT64_MAX = 2**63 - 1


def _shown(number):
    """A number as a message shows it: huge integers by their size, not their 400 digits."""
    text = str(number)
    return text if len(text) <= 24 else f"{text[:6]}... (an integer of {len(text)} digits)"


def _real(value, name):
    """A real number as a float; TypeError naming ``name`` if not one, ValueError if it is
    too large for a float (an int of more than 308 digits)."""
    if type(value) is float:   # the usual case, without the abstract-class check
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def check_eps(eps):
    value = _real(eps, "eps")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {_shown(eps)}")
    return value


def check_momentum(momentum):
    value = _real(momentum, "momentum")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {_shown(momentum)}")
    return value


def check_flag(value, name):
    """A bool (Python's or NumPy's), as PyTorch requires of its flags: a string or a
    number is a TypeError, not silently true."""
    if value is True or value is False:
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_count(count, name="count"):
    if isinstance(count, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {type(count).__name__}")
    try:
        count = operator.index(count)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(count).__name__}") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    if count > INT64_MAX:
        raise ValueError(f"{name} must be below 2**63, got {_shown(count)}")
    return count


def check_counts(counts, p, name="count"):
    """P per-process counts (an integer or a 1-D integer array-like of P entries) as a
    contiguous int64 array; ValueError when one is negative or their total is 2**63 or more."""
    array = np.atleast_1d(as_array(counts, name))
    if array.ndim != 1 or array.shape[0] != p or array.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold {p} integers, got {counts!r}")
    values = [int(k) for k in array]
    if any(k < 0 for k in values):
        raise ValueError(f"{name} must be >= 0")
    if sum(values) > INT64_MAX:
        raise ValueError(f"the total {name} must be below 2**63, got {_shown(sum(values))}")
    return np.array(values, dtype=np.int64)


def total_count(count, name="count"):
    """The total of an integer count or of per-process counts (a 1-D integer array-like,
    as PyTorch's batch_norm_backward_elemt takes them), checked as ``check_count``."""
    if isinstance(count, (list, tuple)) or (isinstance(count, np.ndarray) and count.ndim > 0):
        array = as_array(count, name)
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise TypeError(f"{name} must be an integer or a 1-D array of integers, "
                            f"got {type(count).__name__} of dtype {array.dtype} and "
                            f"shape {array.shape}")
        return check_count(sum(check_count(int(k), name) for k in array), f"the total {name}")
    return check_count(count, name)


def check_out_apart(out, **updated):
    """ValueError when ``out`` shares memory with an array the call updates in place
    (running statistics): one of the two writes would be lost."""
    if out is None:
        return
    for name, array in updated.items():
        if array is not None and np.may_share_memory(out, array):
            raise ValueError(f"out shares memory with {name}, which is updated in place: "
                             f"pass an out array apart from it (or a copy of {name})")


def same_shape(array, name, shape):
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape} but input has shape {shape}")


def grad_output(value, x, min_ndim=2):
    """A backward's grad_output: of the checked input ``x``'s shape, converted to its dtype."""
    dy = as_input(value, "grad_output", min_ndim, dtype=x.dtype)
    same_shape(dy, "grad_output", x.shape)
    return dy


class Output:
    """Where a kernel writes a result of ``shape`` and ``dtype``, honouring ``out``.

    ``target`` is the C-contiguous array the kernel writes; ``finish()`` copies it into
    ``out`` when a temporary was needed and returns the caller's result.
    """
    __slots__ = ("target", "out")

    def __init__(self, out, shape, dtype, inputs, name="out"):
        self.out = out
        if out is None:
            self.target = np.empty(shape, dtype=dtype)
            return
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name} must be a numpy.ndarray (return arrays must be of "
                            f"ArrayType), got {type(out).__name__}")
        if out.shape != tuple(shape):
            raise ValueError(f"{name} has shape {out.shape}, expected {tuple(shape)}")
        if not out.flags.writeable:
            raise ValueError(f"{name} is read-only")
        if not np.can_cast(dtype, out.dtype, casting="same_kind"):
            raise TypeError(f"cannot cast the result from {dtype} to {name}'s dtype "
                            f"{out.dtype} with casting rule 'same_kind'")
        direct = (out.dtype == dtype and out.flags.c_contiguous and out.dtype.isnative
                  and not any(_overlaps_partially(out, a) for a in inputs if a is not None))
        self.target = out if direct else np.empty(shape, dtype=dtype)

    def finish(self):
        if self.out is None:
            return self.target
        if self.target is not self.out:
            np.copyto(self.out, self.target, casting="same_kind")
        return self.out


def _overlaps_partially(out, array):
    """True when out and array share memory other than element for element."""
    if not np.may_share_memory(out, array):
        return False
    same = (out.__array_interface__["data"][0] == array.__array_interface__["data"][0]
            and out.strides == array.strides and out.shape == array.shape
            and out.itemsize == array.itemsize)
    return not same


def shaped_param(value, name, shape, dtype, shape_name="normalized_shape"):
    """Optional parameter of a given shape (layer norm's weight, bias): None or a
    contiguous copy in ``dtype``."""
    if value is None:
        return None
    array = as_array(value, name)
    compute_dtype(array.dtype, name)
    if array.shape != tuple(shape):
        raise ValueError(f"Expected {name} to be of same shape as {shape_name}, but got {name} "
                         f"of shape {list(array.shape)} and {shape_name} = {list(shape)}")
    return np.ascontiguousarray(array, dtype=dtype)


def saved_stats(value, name, shape, dtype, trailing_ones=0):
    """Statistics a forward saved (mean, rstd): of ``shape``, or of ``shape`` followed by
    ``trailing_ones`` 1s (the shape PyTorch keeps); a contiguous copy in ``dtype``."""
    shape = tuple(shape)
    array = as_array(value, name)
    compute_dtype(array.dtype, name)
    if array.shape != shape and array.shape != shape + (1,) * trailing_ones:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
    return np.ascontiguousarray(array, dtype=dtype).reshape(shape)
