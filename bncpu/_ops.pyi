# Type stub of the compiled module bncpu/_ops.pyx (Cython would treat annotations in the
# .pyx as C types, so they live here). Every wrapper takes validated C-contiguous
# ndarrays (None for an absent optional one) and returns the kernel's bncpu_status
# (0 = BNCPU_OK; bncpu._validate.raise_for_status turns the others into exceptions).
from types import SimpleNamespace

import numpy as np
from numpy.typing import NDArray

_Real = NDArray[np.float32] | NDArray[np.float64]
_Stats = NDArray[np.float64]

def bn_forward_train(x: _Real, y: _Real, n: int, c: int, s: int, weight: _Real | None,
                     bias: _Real | None, running_mean: _Real | None,
                     running_var: _Real | None, momentum: float, eps: float,
                     save_mean: _Real | None, save_invstd: _Real | None,
                     unbiased: bool = True) -> int: ...
def bn_forward_eval(x: _Real, y: _Real, n: int, c: int, s: int, weight: _Real | None,
                    bias: _Real | None, running_mean: _Real, running_var: _Real,
                    eps: float) -> int: ...
def bn_backward(dy: _Real, x: _Real | None, dx: _Real | None, n: int, c: int, s: int,
                weight: _Real | None, running_mean: _Real | None, running_var: _Real | None,
                save_mean: _Real | None, save_invstd: _Real | None, training: bool,
                eps: float, dweight: _Real | None, dbias: _Real | None) -> int: ...
def bn_stats(x: _Real, n: int, c: int, s: int, mean: _Stats, m2: _Stats) -> int: ...
def bn_gather_stats(p: int, c: int, mean: _Stats, m2: _Stats, counts: NDArray[np.int64],
                    running_mean: _Real | None, running_var: _Real | None, momentum: float,
                    eps: float, mean_out: _Stats, invstd_out: _Stats, is_f32: bool,
                    unbiased: bool = True) -> int: ...
def bn_elemt(x: _Real, y: _Real, n: int, c: int, s: int, mean: _Stats, invstd: _Stats,
             weight: _Real | None, bias: _Real | None) -> int: ...
def bn_backward_reduce(dy: _Real, x: _Real, n: int, c: int, s: int, mean: _Stats,
                       sum_dy: _Stats, sum_dy_xmu: _Stats) -> int: ...
def bn_backward_elemt(dy: _Real, x: _Real, dx: _Real, n: int, c: int, s: int, mean: _Stats,
                      invstd: _Stats, weight: _Real | None, sum_dy: _Stats,
                      sum_dy_xmu: _Stats, count: int) -> int: ...
def bn_relu_forward_train(x: _Real, residual: _Real | None, y: _Real, n: int, c: int, s: int,
                          weight: _Real | None, bias: _Real | None,
                          running_mean: _Real | None, running_var: _Real | None,
                          momentum: float, eps: float, save_mean: _Real | None,
                          save_invstd: _Real | None, unbiased: bool = True) -> int: ...
def bn_relu_forward_eval(x: _Real, residual: _Real | None, y: _Real, n: int, c: int, s: int,
                         weight: _Real | None, bias: _Real | None, running_mean: _Real,
                         running_var: _Real, eps: float) -> int: ...
def bn_relu_backward(dy: _Real, y: _Real, x: _Real | None, dx: _Real | None, n: int, c: int,
                     s: int, weight: _Real | None, running_mean: _Real | None,
                     running_var: _Real | None, save_mean: _Real | None,
                     save_invstd: _Real | None, training: bool, eps: float,
                     dweight: _Real | None, dbias: _Real | None,
                     dresidual: _Real | None) -> int: ...
def rows_forward(x: _Real, y: _Real, n: int, c: int, s: int, groups: int,
                 weight: _Real | None, bias: _Real | None, eps: float, centered: bool,
                 save_mean: _Real | None, save_rstd: _Real | None,
                 channels_last: bool = False) -> int: ...
def rows_backward(dy: _Real, x: _Real, dx: _Real | None, n: int, c: int, s: int, groups: int,
                  mean: _Real | None, rstd: _Real, weight: _Real | None, centered: bool,
                  dweight: _Real | None, dbias: _Real | None,
                  channels_last: bool = False) -> int: ...

# forward_train, forward_eval, backward, stats, gather_stats, elemt, backward_reduce,
# backward_elemt, relu_forward_train, relu_forward_eval, relu_backward: the bn_* functions
# above.
batch_norm: SimpleNamespace
# forward, backward: rows_forward, rows_backward (channels_last: (n, s, c) data, group
# norm's channels-last kernel).
row_norm: SimpleNamespace
