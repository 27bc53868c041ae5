"""bncpu inside Keras 3: drop-in normalization layers for every Keras backend.

* ``BatchNormalization``, ``LayerNormalization``, ``GroupNormalization``,
  ``RMSNormalization``: subclasses of the ``keras.layers`` classes of those names, with
  their constructors, configs, weights and semantics, registered serializable; computed
  by bncpu's kernels on the jax backend (bncpu.jax, an XLA custom call), the torch
  backend (bncpu.torch) and the tensorflow backend (the NumPy API in
  ``tf.numpy_function``, graph mode).
* ``convert(model)``: a clone of a model with bncpu's layers and the same weights.
* ``fallback_counts()``: calls that ran Keras's own code (renorm, synchronized, a mask,
  a dtype other than float32/float64, ...), by layer and reason.

Importing this module imports keras (and the backend's bncpu module when a layer first
runs); ``import bncpu`` never does.
"""
import keras  # noqa: F401  (the point of this module; fails early without Keras)

from bncpu.keras._convert import convert
from bncpu.keras._fallback import fallback_counts, reset_fallback_counts
from bncpu.keras._layers import (
    BatchNormalization, GroupNormalization, LayerNormalization, RMSNormalization,
)

__all__ = ["BatchNormalization", "LayerNormalization", "GroupNormalization",
           "RMSNormalization", "convert", "fallback_counts", "reset_fallback_counts"]
