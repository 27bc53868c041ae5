"""The functions of bncpu.jax: argument checks (bncpu._validate's, so the messages are the
NumPy API's), the FFI calls, and their ``jax.custom_vjp`` rules.

Each public function checks its arguments on the static shapes, turns them into a
hashable ``config`` of sizes and flags, and calls a ``custom_vjp`` function with that
config as a non-differentiable argument. An absent weight, bias or running statistic is
passed to the handler as an array of no elements (NULL for the kernel).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bncpu import _validate as v
from bncpu._row_norm import _normalized_shape, _num_groups

try:
    from bncpu.jax import _ffi
except ImportError as error:
    raise ImportError(
        f"bncpu.jax needs its XLA FFI handler (the extension module bncpu.jax._ffi), which "
        f"did not load: {error}. setup.py builds it only when jax is importable at build "
        f"time: install jax, then rebuild bncpu (`pip install \".[jax]\"`, or "
        f"`python setup.py build_ext --inplace` in a source tree).") from error

for _name, _capsule in _ffi.targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Group-norm layouts of the handler (bncpu/jax/_ffi.cc), the branches of bncpu/_row_norm.py.
_CHANNELS_FIRST, _CHANNELS_LAST, _INSTANCES = 0, 1, 2


def _input(x):
    x = jnp.asarray(x)
    if x.dtype not in _DTYPES:
        raise TypeError(f"bncpu.jax computes float32 and float64 input, got {x.dtype}")
    return x


def _param(value, name, shape, dtype):
    """An optional parameter of ``shape`` cast to ``dtype``, flattened; absent: no elements."""
    if value is None:
        return jnp.zeros((0,), dtype)
    value = jnp.asarray(value, dtype)
    if value.shape != tuple(shape):
        raise ValueError(f"{name} has shape {value.shape} but must have shape {tuple(shape)}")
    return value.reshape(-1)


def _call(target, results, *args, **attributes):
    """One FFI call; each result is (shape, dtype). Under vmap, one call per element."""
    out_types = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in results]
    return jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(*args, **attributes)


def _grad_of(present, grad, like):
    """The cotangent of an optional parameter: its gradient, or no elements when absent."""
    return grad.reshape(like.shape) if present else jnp.zeros_like(like)


# ----------------------------------------------------------------------------------
# Batch norm
# ----------------------------------------------------------------------------------
class _BatchNormConfig(NamedTuple):
    n: int
    c: int
    s: int
    training: bool
    momentum: float
    eps: float
    unbiased: bool


def _batch_norm_call(x, weight, bias, running_mean, running_var, config):
    c = config.c
    stats = (c,) if config.training else (0,)
    running = running_mean.shape
    return _call("bncpu_batch_norm_forward",
                 [(x.shape, x.dtype), (running, x.dtype), (running, x.dtype),
                  (stats, x.dtype), (stats, x.dtype)],
                 x, weight, bias, running_mean, running_var,
                 n=np.int64(config.n), c=np.int64(c), s=np.int64(config.s),
                 training=config.training, momentum=np.float64(config.momentum),
                 eps=np.float64(config.eps), unbiased=config.unbiased)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _batch_norm(x, weight, bias, running_mean, running_var, config):
    return tuple(_batch_norm_call(x, weight, bias, running_mean, running_var, config)[:3])


def _batch_norm_fwd(x, weight, bias, running_mean, running_var, config):
    y, new_mean, new_var, save_mean, save_invstd = _batch_norm_call(
        x, weight, bias, running_mean, running_var, config)
    return (y, new_mean, new_var), (x, weight, bias, running_mean, running_var, save_mean,
                                    save_invstd)


def _batch_norm_bwd(config, residuals, cotangents):
    x, weight, bias, running_mean, running_var, save_mean, save_invstd = residuals
    dx, dweight, dbias = _call(
        "bncpu_batch_norm_backward", [(x.shape, x.dtype), ((config.c,), x.dtype),
                                      ((config.c,), x.dtype)],
        x, cotangents[0], weight, running_mean, running_var, save_mean, save_invstd,
        n=np.int64(config.n), c=np.int64(config.c), s=np.int64(config.s),
        training=config.training, eps=np.float64(config.eps))
    # The running statistics are state, not parameters: no gradient flows into them.
    return (dx, _grad_of(weight.size > 0, dweight, weight), _grad_of(bias.size > 0, dbias, bias),
            jnp.zeros_like(running_mean), jnp.zeros_like(running_var))


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, unbiased_running_var=True):
    """Batch normalization, as ``bncpu.batch_norm``, returning the running statistics.

    Parameters
    ----------
    x : array_like
        float32 or float64 data of at least 2 dimensions, channels along ``axis``.
    running_mean, running_var : array_like of shape (C,) or None
        Required when ``training=False``; in training, None records nothing.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    training : bool
        Use the batch statistics (and blend them into the running ones).
    momentum : float
        In [0, 1]: ``new = (1 - momentum)·old + momentum·batch``.
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1 for (N, C, *spatial), -1 for channels-last data.
    unbiased_running_var : bool, default True
        Blend the unbiased batch variance into ``running_var`` (PyTorch); False blends the
        biased one (Keras).

    Returns
    -------
    y : jax.Array
        The normalized input, of its shape.
    new_running_mean, new_running_var : jax.Array or None
        In training the updated running statistics (None when none were given); in
        evaluation the given ones.

    Raises
    ------
    TypeError, ValueError
        As ``bncpu.batch_norm``.
    """
    x = _input(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm expects input of at least 2 dimensions, got shape {x.shape}")
    n, c, s = v.channel_layout(x.shape, v.channel_axis(axis, x.ndim))
    training = v.check_flag(training, "training")
    unbiased = v.check_flag(unbiased_running_var, "unbiased_running_var")
    config = _BatchNormConfig(n, c, s, training, v.check_momentum(momentum), v.check_eps(eps),
                              unbiased)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together, or both be None")
    if running_mean is None and not training:
        raise ValueError("running_mean and running_var must be given when training=False")
    if training and n * s == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {x.shape}")
    mean = _param(running_mean, "running_mean", (c,), x.dtype)
    var = _param(running_var, "running_var", (c,), x.dtype)
    y, new_mean, new_var = _batch_norm(
        x, _param(weight, "weight", (c,), x.dtype), _param(bias, "bias", (c,), x.dtype), mean,
        var, config)
    if running_mean is None:
        return y, None, None
    return y, new_mean, new_var


# ----------------------------------------------------------------------------------
# Group norm, and layer norm as group norm of one group of s = 1 (as bncpu/_row_norm.py)
# ----------------------------------------------------------------------------------
class _GroupNormConfig(NamedTuple):
    n: int
    c: int
    s: int
    groups: int
    layout: int
    outer: int
    inner: int
    eps: float

    @property
    def attributes(self):
        return dict(n=np.int64(self.n), c=np.int64(self.c), s=np.int64(self.s),
                    groups=np.int64(self.groups), layout=np.int64(self.layout),
                    outer=np.int64(self.outer), inner=np.int64(self.inner))

    @property
    def stats_shape(self):
        return (self.n, self.c if self.layout == _INSTANCES else self.groups)


def _group_norm_call(x, weight, bias, config):
    stats = config.stats_shape
    return _call("bncpu_group_norm_forward",
                 [(x.shape, x.dtype), (stats, x.dtype), (stats, x.dtype)],
                 x, weight, bias, eps=np.float64(config.eps), **config.attributes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _group_norm(x, weight, bias, config):
    return _group_norm_call(x, weight, bias, config)[0]


def _group_norm_fwd(x, weight, bias, config):
    y, mean, rstd = _group_norm_call(x, weight, bias, config)
    return y, (x, weight, bias, mean, rstd)


def _group_norm_bwd(config, residuals, dy):
    x, weight, bias, mean, rstd = residuals
    dx, dweight, dbias = _call(
        "bncpu_group_norm_backward",
        [(x.shape, x.dtype), ((config.c,), x.dtype), ((config.c,), x.dtype)],
        x, dy, mean, rstd, weight, **config.attributes)
    return dx, _grad_of(weight.size > 0, dweight, weight), _grad_of(bias.size > 0, dbias, bias)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def layer_norm(x, normalized_shape: int | Sequence[int], weight=None, bias=None, eps=1e-5):
    """Layer normalization, as ``bncpu.layer_norm``.

    Parameters
    ----------
    x : array_like
        float32 or float64 data whose trailing dimensions are ``normalized_shape``.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight, bias : array_like of shape normalized_shape, optional
        Elementwise scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.

    Returns
    -------
    jax.Array
        The normalized input, of its shape.
    """
    x = _input(x)
    shape = _normalized_shape(normalized_shape, x.shape)
    rows, d = math.prod(x.shape[:x.ndim - len(shape)]), math.prod(shape)
    config = _GroupNormConfig(rows, d, 1, 1, _CHANNELS_FIRST, 0, 0, v.check_eps(eps))
    return _group_norm(x, _param(weight, "weight", shape, x.dtype),
                       _param(bias, "bias", shape, x.dtype), config)


def group_norm(x, num_groups: int, weight=None, bias=None, eps=1e-5, *, axis=1):
    """Group normalization, as ``bncpu.group_norm``.

    Parameters
    ----------
    x : array_like
        float32 or float64 (N, C, *spatial) data, or channels along ``axis``.
    num_groups : int
        >= 1, dividing C.
    weight, bias : array_like of shape (C,), optional
        Per-channel scale and shift (1 and 0 when None).
    eps : float
        Finite and >= 0, added to the variance under the square root.
    axis : int, default 1
        The channel axis: 1, or -1 for channels-last (N, *spatial, C) data; not 0.

    Returns
    -------
    jax.Array
        The normalized input, of its shape.
    """
    x = _input(x)
    if x.ndim < 2:
        raise ValueError(f"group_norm expects input of at least 2 dimensions, got shape {x.shape}")
    axis = v.channel_axis(axis, x.ndim, batch_axis_allowed=False)
    groups = _num_groups(num_groups, x.shape, axis)
    eps = v.check_eps(eps)
    n, c = x.shape[0], x.shape[axis]
    s = math.prod(x.shape[1:axis]) * math.prod(x.shape[axis + 1:])
    weight = _param(weight, "weight", (c,), x.dtype)
    bias = _param(bias, "bias", (c,), x.dtype)
    if axis == 1 or axis == x.ndim - 1 and groups < c:
        layout = _CHANNELS_FIRST if axis == 1 else _CHANNELS_LAST
        return _group_norm(x, weight, bias, _GroupNormConfig(n, c, s, groups, layout, 0, 0, eps))
    if groups < c:
        # A channel axis in the middle: the kernels read channels first (NumPy copies too).
        first = jnp.moveaxis(x, axis, 1)
        config = _GroupNormConfig(n, c, s, groups, _CHANNELS_FIRST, 0, 0, eps)
        return jnp.moveaxis(_group_norm(first, weight, bias, config), 1, axis)
    outer, inner = math.prod(x.shape[1:axis]), math.prod(x.shape[axis + 1:])
    return _group_norm(x, weight, bias,
                       _GroupNormConfig(n, c, s, groups, _INSTANCES, outer, inner, eps))


# ----------------------------------------------------------------------------------
# RMS norm
# ----------------------------------------------------------------------------------
class _RmsNormConfig(NamedTuple):
    rows: int
    d: int
    eps: float


def _rms_norm_call(x, weight, config):
    return _call("bncpu_rms_norm_forward", [(x.shape, x.dtype), ((config.rows,), x.dtype)],
                 x, weight, rows=np.int64(config.rows), d=np.int64(config.d),
                 eps=np.float64(config.eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x, weight, config):
    return _rms_norm_call(x, weight, config)[0]


def _rms_norm_fwd(x, weight, config):
    y, rstd = _rms_norm_call(x, weight, config)
    return y, (x, weight, rstd)


def _rms_norm_bwd(config, residuals, dy):
    x, weight, rstd = residuals
    dx, dweight = _call("bncpu_rms_norm_backward", [(x.shape, x.dtype), ((config.d,), x.dtype)],
                        x, dy, rstd, weight, rows=np.int64(config.rows), d=np.int64(config.d))
    return dx, _grad_of(weight.size > 0, dweight, weight)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rms_norm(x, normalized_shape: int | Sequence[int], weight=None, eps=None):
    """RMS normalization, as ``bncpu.rms_norm``.

    Parameters
    ----------
    x : array_like
        float32 or float64 data whose trailing dimensions are ``normalized_shape``.
    normalized_shape : int or sequence of ints
        The trailing dimensions normalized together.
    weight : array_like of shape normalized_shape, optional
        Elementwise scale (1 when None).
    eps : float, optional
        Finite and >= 0; None is the machine epsilon of the input's dtype.

    Returns
    -------
    jax.Array
        The normalized input, of its shape.
    """
    x = _input(x)
    shape = _normalized_shape(normalized_shape, x.shape)
    eps = float(np.finfo(x.dtype).eps) if eps is None else v.check_eps(eps)
    rows, d = math.prod(x.shape[:x.ndim - len(shape)]), math.prod(shape)
    return _rms_norm(x, _param(weight, "weight", shape, x.dtype), _RmsNormConfig(rows, d, eps))
