"""Keras's normalization layers, computed by bncpu's kernels on every backend.

Each class subclasses the ``keras.layers`` class of its name and replaces only ``call``:
the constructor, ``build`` (weights and their names), ``get_config`` and the semantics
stay Keras's, so saved models and weights load either way. Cases the kernels do not
cover run Keras's own ``call`` and are counted (bncpu/keras/_fallback.py).
"""
import keras
from keras import ops

from bncpu.keras import _backend
from bncpu.keras._fallback import record

_KERNEL_DTYPES = ("float32", "float64")


def _dtype_reason(inputs):
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    return None if dtype in _KERNEL_DTYPES else f"dtype {dtype}"


def _cast(variable, dtype):
    return None if variable is None else ops.cast(variable, dtype)


def _trailing_shape(axes, shape):
    """The normalized shape when ``axes`` (sorted) are the input's trailing axes, else None."""
    ndim = len(shape)
    positions = [axis % ndim for axis in axes]
    if positions != list(range(ndim - len(positions), ndim)):
        return None
    return tuple(shape[axis] for axis in positions)


class _NoJitOnTensorflow:
    """tf.numpy_function cannot be compiled by XLA: on the tensorflow backend the layer says
    so, and ``jit_compile="auto"`` then runs the model as a graph."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_jit = keras.backend.backend() != "tensorflow"


@keras.saving.register_keras_serializable(package="bncpu")
class BatchNormalization(_NoJitOnTensorflow, keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` computed by bncpu: channels along ``axis``
    (-1, channels-last, by default, read in place by the kernels' column mode), momentum
    weighting the old moving value, the moving variance updated with the biased batch
    variance, and a layer with ``trainable=False`` running in inference mode."""

    def call(self, inputs, training=None, mask=None):
        reason = ("renorm" if self.renorm else "synchronized" if self.synchronized
                  else "mask" if mask is not None else _dtype_reason(inputs))
        if reason is not None:
            record(self, reason)
            return super().call(inputs, training=training, mask=mask)
        training = bool(training and self.trainable)
        dtype = inputs.dtype
        outputs, new_mean, new_variance = _backend.ops().batch_norm(
            inputs, _cast(self.moving_mean, dtype), _cast(self.moving_variance, dtype),
            _cast(self.gamma, dtype) if self.scale else None,
            _cast(self.beta, dtype) if self.center else None,
            training, 1.0 - self.momentum, self.epsilon, axis=self.axis,
            unbiased_running_var=False)
        if training:
            self.moving_mean.assign(ops.cast(new_mean, self.moving_mean.dtype))
            self.moving_variance.assign(ops.cast(new_variance, self.moving_variance.dtype))
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="bncpu")
class LayerNormalization(_NoJitOnTensorflow, keras.layers.LayerNormalization):
    """``keras.layers.LayerNormalization`` computed by bncpu when its axes are the input's
    trailing ones (the default ``axis=-1``)."""

    def call(self, inputs):
        shape = _trailing_shape(self.axis, inputs.shape)
        reason = ("rms_scaling" if self.rms_scaling else _dtype_reason(inputs) or
                  (None if shape is not None else "axes not trailing"))
        if reason is not None:
            record(self, reason)
            return super().call(inputs)
        dtype = inputs.dtype
        outputs = _backend.ops().layer_norm(inputs, shape, _cast(self.gamma, dtype),
                                            _cast(self.beta, dtype), self.epsilon)
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="bncpu")
class GroupNormalization(_NoJitOnTensorflow, keras.layers.GroupNormalization):
    """``keras.layers.GroupNormalization`` computed by bncpu: groups of adjacent channels
    along ``axis`` (channels-last by default, through the kernels' channels-last entries)."""

    def call(self, inputs):
        reason = _dtype_reason(inputs)
        if reason is not None:
            record(self, reason)
            return super().call(inputs)
        dtype = inputs.dtype
        outputs = _backend.ops().group_norm(inputs, self.groups, _cast(self.gamma, dtype),
                                            _cast(self.beta, dtype), self.epsilon,
                                            axis=self.axis)
        return ops.cast(outputs, self.compute_dtype)


@keras.saving.register_keras_serializable(package="bncpu")
class RMSNormalization(_NoJitOnTensorflow, keras.layers.RMSNormalization):
    """``keras.layers.RMSNormalization`` computed by bncpu when its axes are the input's
    trailing ones (the default ``axis=-1``)."""

    def call(self, x):
        shape = _trailing_shape(self.axis, x.shape)
        reason = _dtype_reason(x) or (None if shape is not None else "axes not trailing")
        if reason is not None:
            record(self, reason)
            return super().call(x)
        # Keras's default for no epsilon is its backend epsilon, not the dtype's.
        eps = keras.backend.epsilon() if self.epsilon is None else self.epsilon
        outputs = _backend.ops().rms_norm(x, shape, _cast(self.scale, x.dtype), eps)
        return ops.cast(outputs, self.compute_dtype)
