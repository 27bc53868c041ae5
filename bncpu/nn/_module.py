"""The base of every bncpu.nn layer: torch.nn.Module's bookkeeping for NumPy arrays.

A layer holds its parameters (``weight``, ``bias``: ndarrays, or None), its buffers
(running statistics), ``training``, the gradients accumulated by ``backward``
(``grad_weight``, ``grad_bias``) and what its last forward saved for the backward. A
subclass names its state in ``_parameter_names`` and ``_buffer_names`` and writes
``_forward(x) -> (output, saved)`` and ``_backward(grad_output, saved) -> (grad_input,
{parameter name: gradient})``; everything else is here.
"""
import collections
import operator

import numpy as np

from bncpu import _validate as v

IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

# Buffers a state dict may leave out, as torch allows for state dicts without its version
# metadata: the layer keeps its own value.
_OPTIONAL_KEYS = ("num_batches_tracked",)


class StateDictError(ValueError, RuntimeError):
    """A state dict that does not fit the layer (torch raises RuntimeError for it; this is
    also a ValueError, bncpu's error for bad input). Nothing was loaded."""


def layer_dtype(dtype):
    """np.float32 or np.float64, the dtypes a layer computes in."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def layer_axis(axis):
    """The channel axis argument: an int (checked against each input's rank when used)."""
    if isinstance(axis, bool):
        raise TypeError("axis must be an integer, got bool")
    try:
        return operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer, got {type(axis).__name__}") from None


class Module:
    """train/eval, parameters, gradients, state dicts and the forward/backward protocol."""

    _parameter_names = ()
    _buffer_names = ()
    _min_ndim = 2          # the rank the layer's functions need at the least

    def __init__(self, dtype):
        self.dtype = layer_dtype(dtype)
        self.training = True
        self._saved = None

    # ------------------------------------------------------------------ forward, backward
    def __call__(self, input):
        return self.forward(input)

    def forward(self, input):
        """The layer's output for ``input`` (a new array); saves what ``backward`` needs."""
        self._saved = None
        output, saved = self._forward(self._as_input(input))
        self._saved = saved
        return output

    def backward(self, grad_output):
        """grad_input for the last forward's input; the parameter gradients are added to
        ``grad_weight`` / ``grad_bias`` (set, when None). The saved tensors are freed: a
        second backward needs a new forward, as in torch."""
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward: nothing saved; call the layer on "
                               f"an input first (each forward's saved tensors serve one backward)")
        grad_input, grads = self._backward(grad_output, self._saved)
        self._saved = None
        for name, grad in grads.items():
            if grad is None or getattr(self, name) is None:
                continue
            current = getattr(self, "grad_" + name)
            if current is None:
                setattr(self, "grad_" + name, grad)
            else:
                current += grad
        return grad_input

    def _as_input(self, input):
        """The input as a C-contiguous array of the layer's dtype. Floating inputs must
        already compute in that dtype (float16 counts as float32), as in torch; integer and
        bool inputs are converted."""
        array = v.as_array(input, "input")
        self._check_input_dim(array)
        computed = v.compute_dtype(array.dtype, "input")
        if array.dtype.kind in "fc" and computed != self.dtype:
            raise TypeError(f"{type(self).__name__} computes in {self.dtype} but the input has dtype "
                            f"{array.dtype}: convert the input, or build the layer with "
                            f"dtype=np.{array.dtype}")
        return v.as_input(array, min_ndim=self._min_ndim, dtype=self.dtype)

    def _check_input_dim(self, array):
        """Raise ValueError for an input of a rank the layer does not take (torch's message)."""

    # ------------------------------------------------------------------ modes, parameters
    def train(self, mode=True):
        """Training mode (``mode=True``) or evaluation; returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode; returns the layer."""
        return self.train(False)

    def named_parameters(self):
        """(name, array) of each parameter that is not None."""
        return [(name, getattr(self, name)) for name in self._parameter_names
                if getattr(self, name) is not None]

    def parameters(self):
        """The parameter arrays (updated in place by an optimizer step)."""
        return [array for _, array in self.named_parameters()]

    def zero_grad(self):
        """Forget the accumulated gradients (set them to None, as torch does by default)."""
        for name in self._parameter_names:
            setattr(self, "grad_" + name, None)

    # ------------------------------------------------------------------ state dicts
    def _state(self):
        """name -> live array, parameters then buffers, those that are not None."""
        return {name: getattr(self, name) for name in self._parameter_names + self._buffer_names
                if getattr(self, name) is not None}

    def state_dict(self):
        """Copies of the parameters and buffers under torch's keys (torch returns tensors
        sharing the module's memory; copies are safer for arrays)."""
        return {name: np.array(array, copy=True) for name, array in self._state().items()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy the values of ``state_dict`` (arrays, torch tensors or other array-likes)
        into the layer's arrays, converted to their dtypes.

        Missing keys (``num_batches_tracked`` may be left out: it keeps its value) and
        unexpected keys are errors when ``strict``; a value of the wrong shape or kind is
        always one. Errors are reported together, as torch does, and nothing is loaded.
        Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``.
        """
        if not (hasattr(state_dict, "keys") and hasattr(state_dict, "__getitem__")):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
        own = self._state()
        missing = [key for key in own if key not in state_dict and key not in _OPTIONAL_KEYS]
        unexpected = [key for key in state_dict if key not in own]
        errors, values = [], {}
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            detach = getattr(value, "detach", None)   # a torch tensor that requires grad
            try:
                array = np.asarray(detach() if callable(detach) else value)
            except (TypeError, ValueError, RuntimeError) as exc:
                errors.append(f'While copying the parameter named "{key}", expected an array-like '
                              f"value but received {type(value).__name__} ({exc})")
                continue
            if array.shape != target.shape:
                errors.append(f"size mismatch for {key}: copying a param with shape {array.shape} "
                              f"from checkpoint, the shape in current model is {target.shape}.")
            elif array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, target.dtype,
                                                                    "same_kind"):
                errors.append(f'While copying the parameter named "{key}": cannot convert dtype '
                              f"{array.dtype} to the layer's {target.dtype}")
            else:
                values[key] = array
        if strict and unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: "
                          + ", ".join(f'"{key}"' for key in unexpected) + ". ")
        if strict and missing:
            errors.insert(0, "Missing key(s) in state_dict: "
                          + ", ".join(f'"{key}"' for key in missing) + ". ")
        if errors:
            raise StateDictError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                                 + "\n\t".join(errors))
        for key, array in values.items():
            np.copyto(own[key], array, casting="same_kind")
        return IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------------ repr
    def extra_repr(self):
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"
