"""bncpu inside JAX: jittable, differentiable normalization functions whose kernels run
through XLA's FFI (a custom call in the compiled program, no host callback).

* ``batch_norm``, ``layer_norm``, ``group_norm``, ``rms_norm``: the NumPy API's arguments
  (``bncpu.batch_norm`` etc.), returning new arrays where NumPy writes in place; bit for
  bit the NumPy API's results.
* Gradients with respect to the input, weight and bias by ``jax.custom_vjp``, running the
  backward kernels (``bncpu.batch_norm_backward`` etc.); ``jit``, ``grad``, ``vmap``
  (one kernel call per mapped element) work.

Importing this module imports jax; ``import bncpu`` never does.
"""
import jax  # noqa: F401  (the point of this module; fails early without JAX)

from bncpu.jax._functions import batch_norm, group_norm, layer_norm, rms_norm

__all__ = ["batch_norm", "layer_norm", "group_norm", "rms_norm"]
