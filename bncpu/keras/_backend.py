"""The kernels' entry points for the running Keras backend: one small module per backend
(bncpu/keras/_jax.py, _tensorflow.py, _torch.py), each with bncpu.jax's functions and
signatures (new arrays returned, nothing written in place)."""
import importlib

import keras

_MODULES = {"jax": "bncpu.keras._jax", "tensorflow": "bncpu.keras._tensorflow",
            "torch": "bncpu.keras._torch"}


def ops():
    """The module of the backend Keras runs; NotImplementedError for another backend."""
    name = keras.backend.backend()
    if name not in _MODULES:
        raise NotImplementedError(f"bncpu.keras supports the backends {sorted(_MODULES)}, "
                                  f"not {name!r}")
    return importlib.import_module(_MODULES[name])
