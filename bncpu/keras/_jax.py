"""The jax backend: bncpu.jax's functions as they are (an XLA custom call, jittable)."""
from bncpu.jax import batch_norm, group_norm, layer_norm, rms_norm  # noqa: F401
