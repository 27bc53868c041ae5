# Type stub of the compiled module bncpu/_ops.pyx. Every wrapper takes validated
# C-contiguous ndarrays (None for an absent optional one) and returns the kernel's
# bncpu_status (0 = BNCPU_OK; bncpu._validate.raise_for_status turns the others into
# exceptions). The block between the markers follows bncpu/_kernels/manifest.py
# (`python bncpu/_kernels/manifest.py --write` rewrites it, `--check` compares).
from types import SimpleNamespace

import numpy as np
from numpy.typing import NDArray

# ---- generated from bncpu/_kernels/manifest.py: python manifest.py --write ----
import ml_dtypes
_Data = NDArray[np.float32] | NDArray[np.float64] | NDArray[ml_dtypes.bfloat16] | NDArray[np.float16]
_Param = NDArray[np.float32] | NDArray[np.float64]
_Stats = NDArray[np.float64]

def bn_forward_train(x: _Data, y: _Data, n: int, c: int, s: int, weight: _Param | None,
                     bias: _Param | None, running_mean: _Param | None,
                     running_var: _Param | None, momentum: float, eps: float,
                     save_mean: _Param | None, save_invstd: _Param | None,
                     unbiased: bool = True) -> int: ...
def bn_forward_eval(x: _Data, y: _Data, n: int, c: int, s: int, weight: _Param | None,
                    bias: _Param | None, running_mean: _Param, running_var: _Param,
                    eps: float) -> int: ...
def bn_backward(dy: _Data, x: _Data | None, dx: _Data | None, n: int, c: int, s: int,
                weight: _Param | None, running_mean: _Param | None, running_var: _Param | None,
                save_mean: _Param | None, save_invstd: _Param | None, training: bool,
                eps: float, dweight: _Param | None, dbias: _Param | None) -> int: ...
def bn_stats(x: _Data, n: int, c: int, s: int, mean: _Stats, m2: _Stats) -> int: ...
def bn_elemt(x: _Data, y: _Data, n: int, c: int, s: int, mean: _Stats, invstd: _Stats,
             weight: _Param | None, bias: _Param | None) -> int: ...
def bn_backward_reduce(dy: _Data, x: _Data, n: int, c: int, s: int, mean: _Stats,
                       sum_dy: _Stats, sum_dy_xmu: _Stats) -> int: ...
def bn_backward_elemt(dy: _Data, x: _Data, dx: _Data, n: int, c: int, s: int, mean: _Stats,
                      invstd: _Stats, weight: _Param | None, sum_dy: _Stats, sum_dy_xmu: _Stats,
                      count: int) -> int: ...
def bn_relu_forward_train(x: _Data, residual: _Data | None, y: _Data, n: int, c: int, s: int,
                          weight: _Param | None, bias: _Param | None,
                          running_mean: _Param | None, running_var: _Param | None,
                          momentum: float, eps: float, save_mean: _Param | None,
                          save_invstd: _Param | None, unbiased: bool = True) -> int: ...
def bn_relu_forward_eval(x: _Data, residual: _Data | None, y: _Data, n: int, c: int, s: int,
                         weight: _Param | None, bias: _Param | None, running_mean: _Param,
                         running_var: _Param, eps: float) -> int: ...
def bn_relu_backward(dy: _Data, y: _Data, x: _Data | None, dx: _Data | None, n: int, c: int,
                     s: int, weight: _Param | None, running_mean: _Param | None,
                     running_var: _Param | None, save_mean: _Param | None,
                     save_invstd: _Param | None, training: bool, eps: float,
                     dweight: _Param | None, dbias: _Param | None,
                     dresidual: _Data | None) -> int: ...
# ---- end of the generated stubs ----

# Written by hand in bncpu/_ops.pyx: the dtype is the running statistics' (is_f32),
# which may be absent.
def bn_gather_stats(p: int, c: int, mean: _Stats, m2: _Stats, counts: NDArray[np.int64],
                    running_mean: _Param | None, running_var: _Param | None, momentum: float,
                    eps: float, mean_out: _Stats, invstd_out: _Stats, is_f32: bool,
                    unbiased: bool = True) -> int: ...
# Group, layer, instance (centered=True: group norm's entries, channels_last: (n, s, c)
# data) and RMS norm (centered=False: (rows, d, 1, 1), no bias, no mean).
def rows_forward(x: _Data, y: _Data, n: int, c: int, s: int, groups: int,
                 weight: _Param | None, bias: _Param | None, eps: float, centered: bool,
                 save_mean: _Param | None, save_rstd: _Param | None,
                 channels_last: bool = False) -> int: ...
def rows_backward(dy: _Data, x: _Data, dx: _Data | None, n: int, c: int, s: int, groups: int,
                  mean: _Param | None, rstd: _Param, weight: _Param | None, centered: bool,
                  dweight: _Param | None, dbias: _Param | None,
                  channels_last: bool = False) -> int: ...

# forward_train, forward_eval, backward, stats, gather_stats, elemt, backward_reduce,
# backward_elemt, relu_forward_train, relu_forward_eval, relu_backward: the bn_* functions
# above.
batch_norm: SimpleNamespace
# forward, backward: rows_forward, rows_backward.
row_norm: SimpleNamespace
