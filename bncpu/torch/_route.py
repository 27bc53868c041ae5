"""Which path a call takes: the one rule for when bncpu's eager fast path may run, and
the transforms that get torch's own function instead (docs/torch.md, "When the eager
fast path runs").

The fast path runs the kernels on NumPy views of the tensors, outside torch's
dispatcher, so only a caller that needs nothing from the dispatcher may take it. Every
mechanism that intercepts torch calls outside the dispatcher is excluded by
``eager_fast_path``: those calls take the ``torch.ops.bncpu`` operators, which jit
tracing records, dispatch and function modes see, ``torch.compile`` traces and the
profiler names. Two transforms need a formula the operators lack, so their calls run
torch's function, counted (``transform_reason``): forward-mode AD (no forward formula
is registered) and ``torch.func`` (whose wrapped tensors have no memory to view).
"""
import torch
import torch.autograd.forward_ad as _forward_ad
from torch.nn import Parameter

# nn.Parameter only disables __torch_function__: its calls are plain tensors' calls.
_PLAIN = (torch.Tensor, Parameter)


def transform_reason(tensors):
    """Why torch's own function must compute a call on ``tensors`` (None entries are
    absent arguments) under a transform, or None. (torch.compile traces the
    operators, with their own rules for transforms: never a reason there.)"""
    if torch.compiler.is_compiling():
        return None
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "torch.func transform"
    if _forward_ad._current_level >= 0 and any(
            tensor is not None and _forward_ad.unpack_dual(tensor).tangent is not None
            for tensor in tensors):
        return "forward-mode AD"
    return None


def eager_fast_path(args):
    """Whether a call on ``args`` may skip torch's dispatcher: no tensor subclass among
    them, and nothing that records, traces or intercepts calls (jit tracing,
    torch.compile, the profiler, dispatch or function modes, torch.func or forward-mode
    AD)."""
    if not (torch._C._get_tracing_state() is None
            and not torch.compiler.is_compiling()
            and not torch.autograd._profiler_enabled()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None
            and _forward_ad._current_level < 0):
        return False
    for arg in args:
        if type(arg) not in _PLAIN and isinstance(arg, torch.Tensor):
            return False
    return True
