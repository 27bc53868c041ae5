"""Calls that bncpu does not compute run Keras's own layer code; each one is counted here
and logged at DEBUG level on the ``bncpu.keras`` logger, so a slow path is never silent.

=====================================  ===============================================
case                                   what runs
=====================================  ===============================================
``renorm=True``                        Keras's BatchNormalization.call
``synchronized=True``                  Keras's BatchNormalization.call
a ``mask``                             Keras's BatchNormalization.call
input neither float32 nor float64      Keras's call of the layer (``mixed_float16``,
                                       ``mixed_bfloat16``, integers)
LayerNormalization's deprecated        Keras's LayerNormalization.call
``rms_scaling=True``
normalized axes that are not the       Keras's call of the layer (Layer and RMS
trailing ones                          normalization, e.g. ``axis=1`` of 3-D input)
=====================================  ===============================================

Counted once per call of the layer's ``call``: under ``jit`` (the jax backend) or a
``tf.function`` that is once per trace, not per step.
"""
import collections
import logging

_log = logging.getLogger("bncpu.keras")
_counts = collections.Counter()


def fallback_counts():
    """How many calls ran Keras's own code, by (layer class, reason), since import or the
    last ``reset_fallback_counts()``."""
    return dict(_counts)


def reset_fallback_counts():
    """Set every fallback count back to zero."""
    _counts.clear()


def record(layer, reason):
    _counts[(type(layer).__name__, reason)] += 1
    _log.debug("%s %r: Keras's own code runs (%s)", type(layer).__name__, layer.name, reason)
