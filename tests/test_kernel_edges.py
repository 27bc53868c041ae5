"""Kernel behaviour at the edges.

Degenerate sizes return at once with a status; statistics that are infinite or beyond
float32's range give IEEE's answer, not NaN; float32 sums that overflow in float32
(forward squares, backward products) are taken in float64; instance norm's running
variance is the variance; a failed allocation in a row-norm backward leaves out=
untouched; Python maps the C statuses by name.
"""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bncpu
from conftest import CHILD_CWD, assert_all_bitwise_equal, num_threads
from bncpu import _capi, _status, reference
from bncpu._registry import BATCH_SHAPES, FUNCTIONS

HEADER = Path(bncpu.get_include()) / "bncpu.h"


def status_code(name):
    """A bncpu_status value, read from include/bncpu.h."""
    return int(re.search(rf"\b{name}\s*=\s*(\d+)", HEADER.read_text()).group(1))


def run_python(script, timeout=120):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                            text=True, timeout=timeout, cwd=CHILD_CWD)
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


# ----------------------------------------------------------------------------------
# Degenerate sizes (through the table, as C callers reach it; a subprocess, since
# the failure was a segfault or a loop over 2^40 empty rows)
# ----------------------------------------------------------------------------------
def test_degenerate_sizes_return_at_once():
    out = run_python("""
        import numpy as np
        from bncpu import _ops
        empty = np.empty(0, np.float32)
        # gather_stats: no channels, two processes, counts NULL
        print(_ops.bn_gather_stats(2, 0, None, None, None, None, None, 0.1, 1e-5, None, None,
                                   True))
        # group norm: no channels, 2^40 groups; layer and RMS norm: 2^40 rows of no values
        print(_ops.rows_forward(empty, empty, 1, 0, 1, 2**40, None, None, 1e-5, True, None, None))
        print(_ops.rows_forward(empty, empty, 1, 0, 9, 2**40, None, None, 1e-5, True, None, None,
                                True))   # channels last
        print(_ops.rows_forward(empty, empty, 2**40, 0, 1, 1, None, None, 1e-5, True, None, None))
        print(_ops.rows_forward(empty, empty, 2**40, 0, 1, 1, None, None, 1e-5, False, None,
                                None))
    """, timeout=60)
    assert out.split() == [str(status_code("BNCPU_ERR_NULL_POINTER")), "0", "0", "0", "0"]


# ----------------------------------------------------------------------------------
# The mean split into hi + lo falls back to the plain formula when not finite
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_eval_with_an_infinite_running_mean_gives_minus_inf(shape, dtype):
    c = shape[1]
    x = np.random.default_rng(0).normal(size=shape).astype(dtype)
    weight = np.linspace(0.5, 1.5, c).astype(dtype)
    running_mean = np.full(c, np.inf, dtype)
    y = bncpu.batch_norm(x, running_mean, np.ones(c, dtype), weight, None, training=False)
    assert np.all(y == -np.inf)   # (x - inf)·invstd·w, w > 0


@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_elemt_with_a_mean_beyond_float32(shape):
    """mean 1e39 (not a float32), invstd 1e-39: (x - mean)·invstd is about -1."""
    c = shape[1]
    x = np.random.default_rng(1).uniform(0, 1, size=shape).astype(np.float32)
    y = bncpu.batch_norm_elemt(x, None, None, np.full(c, 1e39), np.full(c, 1e-39))
    expected = (x.astype(np.float64) - 1e39) * 1e-39
    np.testing.assert_allclose(y, expected, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", BATCH_SHAPES)
def test_an_infinite_input_gives_an_infinite_mean(shape, dtype):
    """One +inf value in channel 0: its saved mean is inf (PyTorch's), the other channels'
    statistics are untouched by it."""
    c = shape[1]
    x = np.random.default_rng(2).normal(size=shape).astype(dtype)
    finite = bncpu.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[1]
    x[(shape[0] // 2, 0) + (0,) * (len(shape) - 2)] = np.inf
    mean = bncpu.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[1]
    assert mean[0] == np.inf
    np.testing.assert_array_equal(mean[1:], finite[1:])


# ----------------------------------------------------------------------------------
# float32 data whose spread is beyond 1e19 (squares past float32's range)
# ----------------------------------------------------------------------------------
def assert_finite_and_close_to_twin(results, expected, label):
    """Each result finite and within 1e-4 (relative, and of its largest value) of the
    float64 twin's."""
    for got, want in zip(results, expected):
        if want is None:
            continue
        assert np.all(np.isfinite(got)), label
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale, err_msg=label)


FORWARDS = ["batch_norm_forward", "layer_norm_forward", "group_norm_forward",
            "instance_norm_forward", "rms_norm_forward"]


@pytest.mark.parametrize("name", FORWARDS)
def test_float32_spread_beyond_1e19_normalizes_like_float64(name):
    """x ~ N(0, 1e20) in float32: the float32 squares overflow; the results must be the
    twin's on the same values in float64 (O(1) outputs, not zeros)."""
    spec = FUNCTIONS[name]
    for shape in spec.shapes:
        args = spec.inputs(shape, np.float32, seed=4)
        if args["input"].size == 0:
            continue
        args["input"] = args["input"] * np.float32(1e20)
        wide = {k: v.astype(np.float64) if isinstance(v, np.ndarray) else v
                for k, v in args.items()}
        results = spec.call(spec.copy_args(args))
        expected = spec.call_twin(wide)
        assert_finite_and_close_to_twin(results, expected, f"{name} {shape}")


@pytest.mark.parametrize("shape", [(4, 9, 9, 8), (2, 64, 64, 16), (3, 700, 4)])
def test_float32_spread_beyond_1e19_channels_last_group_norm(shape):
    """The same for group norm with the channels last (its own column-wise kernel)."""
    rng = np.random.default_rng(5)
    c = shape[-1]
    x = (rng.normal(size=shape) * 1e20).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.normal(size=c).astype(np.float32)
    results = bncpu.group_norm_forward(x, 2, w, b, 1e-5, axis=-1)
    expected = reference.group_norm_forward(x.astype(np.float64), 2, w.astype(np.float64),
                                            b.astype(np.float64), 1e-5, axis=-1)
    for got, want in zip(results, expected):
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


# ----------------------------------------------------------------------------------
# float32 backward sums Σdy·(x - mean) whose float32 products overflow: x and dy both
# spread beyond 1e19 (dx, dweight and dbias are then of ordinary size)
# ----------------------------------------------------------------------------------
BACKWARDS = ["batch_norm_backward", "batch_norm_relu_backward", "batch_norm_backward_reduce",
             "layer_norm_backward", "group_norm_backward", "instance_norm_backward",
             "rms_norm_backward"]
SCALED_UP = {"input", "grad_output", "save_mean", "mean"}
SCALED_DOWN = {"save_invstd", "rstd", "invstd"}


@pytest.mark.parametrize("name", BACKWARDS)
def test_float32_backward_beyond_1e19_is_the_float64_result(name):
    """x and dy ~ N(0, 1e20) in float32, the saved statistics scaled to match: the
    products dy·(x - mean) (~1e40) overflow float32; the results must be the twin's on
    the same values in float64."""
    spec = FUNCTIONS[name]
    for shape in spec.shapes:
        args = spec.inputs(shape, np.float32, seed=6)
        if args["input"].size == 0:
            continue
        for key in SCALED_UP & set(args):
            args[key] = args[key] * np.asarray(1e20, args[key].dtype)
        for key in SCALED_DOWN & set(args):
            args[key] = args[key] * np.asarray(1e-20, args[key].dtype)
        wide = {k: v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == np.float32
                else v for k, v in args.items()}
        results = spec.call(spec.copy_args(args))
        with num_threads(1):   # the float64 sums, too, are cut by the shape alone
            assert_all_bitwise_equal(spec.call(spec.copy_args(args)), results)
        expected = spec.call_twin(wide)
        assert_finite_and_close_to_twin(results, expected, f"{name} {shape}")


@pytest.mark.parametrize("shape", [(4, 9, 9, 8), (2, 64, 64, 16), (3, 700, 4)])
def test_float32_backward_beyond_1e19_channels_last(shape):
    """The same with the channels last: batch norm (column mode) and group norm (its own
    column-wise kernel)."""
    rng = np.random.default_rng(7)
    c = shape[-1]
    x = (rng.normal(size=shape) * 1e20).astype(np.float32)
    dy = (rng.normal(size=shape) * 1e20).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    wide = [a.astype(np.float64) for a in (dy, x, w)]
    _, mean, rstd = bncpu.group_norm_forward(x, 2, w, None, 1e-5, axis=-1)
    results = bncpu.group_norm_backward(dy, x, 2, mean, rstd, w, axis=-1)
    expected = reference.group_norm_backward(*wide[:2], 2, mean.astype(np.float64),
                                             rstd.astype(np.float64), wide[2], axis=-1)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(x, w, None, None, None, True, 0.1,
                                                          1e-5, axis=-1)
    results += bncpu.batch_norm_backward(dy, x, w, None, None, save_mean, save_invstd, True,
                                         1e-5, axis=-1)
    expected += reference.batch_norm_backward(*wide, None, None, save_mean.astype(np.float64),
                                              save_invstd.astype(np.float64), True, 1e-5,
                                              axis=-1)
    for got, want in zip(results, expected):
        assert np.all(np.isfinite(got)), shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))


# ----------------------------------------------------------------------------------
# Instance norm's running variance is the variance
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_instance_norm_running_var_of_a_tiny_variance(dtype, axis):
    """var ≈ 1e-12 per channel (different per channel), eps = 1e-5: 1/rstd² - eps from a
    float32 rstd was 16% off and the same for every channel."""
    rng = np.random.default_rng(3)
    n, c, s = 4, 3, 64
    scales = np.array([1e-6, 2e-6, 4e-6])
    x = (1.0 + rng.normal(size=(n, c, s)) * scales[None, :, None]).astype(dtype)
    x = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if axis == -1 else x
    running_mean = np.zeros(c, dtype)
    running_var = np.zeros(c, dtype)
    bncpu.instance_norm(x, running_mean, running_var, use_input_stats=True, momentum=1.0,
                        eps=1e-5, axis=axis)
    values = np.moveaxis(x, axis, 1).astype(np.float64)
    expected = values.var(axis=2, ddof=1).mean(axis=0)
    np.testing.assert_allclose(running_var, expected, rtol=1e-3)
    np.testing.assert_allclose(running_mean, values.mean(axis=2).mean(axis=0), rtol=1e-6)


# ----------------------------------------------------------------------------------
# A failed allocation leaves out= untouched (row norms, rows over 16384 values)
# ----------------------------------------------------------------------------------
MALLOC_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
/* malloc(size) of exactly `failing_size` fails once `left` such calls have succeeded. */
static size_t failing_size = 0;
static long left = 0;
void *malloc(size_t size)
{
    static void *(*next)(size_t) = NULL;
    if (next == NULL)
        next = (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc");
    if (failing_size != 0 && size == failing_size) {
        if (left == 0)
            return NULL;
        left--;
    }
    return next(size);
}
void shim_arm(size_t size, long successes) { failing_size = size; left = successes; }
void shim_disarm(void) { failing_size = 0; }
"""


def test_row_norm_backward_allocates_before_writing(tmp_path):
    from test_c_api import find_compiler
    compiler = find_compiler()
    if compiler is None or sys.platform != "linux":
        pytest.skip("needs a C compiler and LD_PRELOAD (Linux)")
    source = tmp_path / "malloc_shim.c"
    source.write_text(MALLOC_SHIM)
    shim = tmp_path / "malloc_shim.so"
    subprocess.run(compiler + ["-shared", "-fPIC", "-O1", str(source), "-o", str(shim), "-ldl"],
                   check=True)
    # row_norm.pyx: rows of d > ROW_NORM_PIECE (16384) values are reduced in groups of
    # REREAD_BYTES (2 MiB) per array; each group's piece sums are 2 doubles per piece.
    script = f"""
        import ctypes
        import numpy as np
        import bncpu
        shim = ctypes.CDLL({str(shim)!r})
        bncpu.set_num_threads(1)
        rows, d = 30, 40000
        pieces = -(-d // 16384)
        for dtype in (np.float32, np.float64):
            rows_per_group = max(1, (2 << 20) // (d * np.dtype(dtype).itemsize))
            size = 2 * min(rows_per_group, rows) * pieces * 8
            rng = np.random.default_rng(0)
            x = rng.normal(size=(rows, d)).astype(dtype)
            dy = rng.normal(size=(rows, d)).astype(dtype)
            w = rng.uniform(0.5, 1.5, d).astype(dtype)
            _, mean, rstd = bncpu.layer_norm_forward(x, d, w, None, 1e-5)
            calls = {{
                "layer_norm_backward": lambda out: bncpu.layer_norm_backward(
                    dy, x, d, mean, rstd, w, out=out),
                "rms_norm_backward": lambda out: bncpu.rms_norm_backward(
                    dy, x, d, rstd, w, out=out),
            }}
            for name, call in calls.items():
                expected = call(np.empty_like(x))[0]
                failures = 0
                for successes in range(4):
                    out = np.full_like(x, 7.0)
                    shim.shim_arm(ctypes.c_size_t(size), ctypes.c_long(successes))
                    try:
                        call(out)
                    except MemoryError:
                        failures += 1
                        assert np.all(out == 7.0), (name, dtype, successes, "out written")
                    else:
                        assert np.array_equal(out, expected), (name, dtype, successes)
                    finally:
                        shim.shim_disarm()
                assert failures >= 1, (name, dtype, "no allocation of", size, "failed")
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                            text=True, timeout=300, env={**__import__("os").environ,
                                                         "LD_PRELOAD": str(shim)},
                            cwd=CHILD_CWD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.endswith("ok\n")


# ----------------------------------------------------------------------------------
# raise_for_status names the status, not a literal
# ----------------------------------------------------------------------------------
def test_raise_for_status_follows_the_header():
    assert _capi.ERR_NO_MEMORY == status_code("BNCPU_ERR_NO_MEMORY")
    with pytest.raises(MemoryError, match="out of memory"):
        _status.raise_for_status(_capi.ERR_NO_MEMORY)
    with pytest.raises(ValueError):
        _status.raise_for_status(status_code("BNCPU_ERR_BAD_SIZE"))
    assert _status.raise_for_status(0) is None


# ----------------------------------------------------------------------------------
# bncpu/_ops.pyi describes the compiled module
# ----------------------------------------------------------------------------------
def test_ops_stub_matches_the_module():
    import ast
    import inspect

    from bncpu import _ops
    stub = ast.parse((Path(_ops.__file__).parent / "_ops.pyi").read_text())
    functions = {node.name: [a.arg for a in node.args.args] for node in stub.body
                 if isinstance(node, ast.FunctionDef)}
    compiled = {name for name, value in vars(_ops).items()
                if callable(value) and not name.startswith("_") and inspect.isroutine(value)}
    assert set(functions) == compiled
    for name, params in functions.items():
        assert list(inspect.signature(getattr(_ops, name)).parameters) == params, name
    namespaces = {node.target.id for node in stub.body if isinstance(node, ast.AnnAssign)}
    assert {"batch_norm", "row_norm"} <= namespaces
    assert set(vars(_ops.batch_norm).values()) | set(vars(_ops.row_norm).values()) == {
        getattr(_ops, name) for name in functions}
