"""convert(model): a clone of a Keras model whose Keras normalization layers are bncpu's."""
import keras

from bncpu.keras import _layers

_REPLACEMENTS = {
    keras.layers.BatchNormalization: _layers.BatchNormalization,
    keras.layers.LayerNormalization: _layers.LayerNormalization,
    keras.layers.GroupNormalization: _layers.GroupNormalization,
    keras.layers.RMSNormalization: _layers.RMSNormalization,
}


def _clone(layer):
    """bncpu's layer for a Keras normalization layer of exactly that class (a subclass
    may change its behaviour, so it is kept), a fresh copy of any other layer."""
    cls = _REPLACEMENTS.get(type(layer), type(layer))
    return cls.from_config(layer.get_config())


def convert(model):
    """A clone of ``model`` (Sequential or functional) with bncpu's normalization layers.

    Built by ``keras.models.clone_model`` with a clone function: every
    ``keras.layers.BatchNormalization``, ``LayerNormalization``, ``GroupNormalization``
    and ``RMSNormalization`` becomes bncpu's class of that name with the same config; the
    weights (the moving statistics included) are then copied, so the clone computes what
    ``model`` computes. ``model`` itself is left unchanged.

    Parameters
    ----------
    model : keras.Model
        A built Sequential or functional model (a subclassed model cannot be cloned).

    Returns
    -------
    keras.Model
        The clone, not compiled.

    Raises
    ------
    TypeError
        ``model`` is not a keras.Model.
    ValueError
        ``model`` is not built, or Keras cannot clone it (a subclassed model).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"convert expects a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError("convert needs a built model (call it once, or give it an Input)")
    clone = keras.models.clone_model(model, clone_function=_clone)
    clone.set_weights(model.get_weights())
    return clone
