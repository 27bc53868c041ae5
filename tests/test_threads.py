"""Thread control and thread safety: results are bitwise identical for any number of
OpenMP threads (bncpu.set_num_threads or threadpoolctl), Python threads calling at once
get the results of serial calls, and changing the thread count while others compute is
safe. Results are also bitwise identical for every instruction-set build."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import bncpu
from bncpu._threads import SMALL_INPUT
from conftest import (DTYPES, assert_all_bitwise_equal, channel_params, num_threads, random_input,
                      running_stats)

EPS = 1e-5
MOMENTUM = 0.1

needs_openmp = pytest.mark.skipif(not bncpu.openmp_enabled(),
                                  reason="bncpu was built without OpenMP: threadpoolctl has no say")

# Large enough to run multi-threaded, in each of the kernels' three ways of cutting the work.
LARGE_SHAPES = {
    "channel": (8, 16, 32, 32),
    "channel-long-rows": (2, 8, 300, 300),    # rows of more than one piece
    "channel-runs": (4, 16, 64, 64),          # adjacent channels per task, 4 or fewer by threads
    "split": (4, 1, 512, 512),
    "split-uneven-pieces": (2, 3, 300, 300),
    "column": (70000, 3),
    "column-partial-block": (2048, 130),
    "column-tiles": (301, 1031),              # tiles of 512 channels and 64 rows, and leftovers
    "column-short-rows": (67, 130, 3, 5),     # tiles of 34 channels of 15 columns
    "column-aliased-rows": (301, 16, 8, 8),   # rows 4 KiB apart, read two at a time
}


def every_function(x, dy):
    """The results of every batch-norm function on (x, dy), as one flat list."""
    c = x.shape[1]
    weight, bias = channel_params(c, x.dtype)
    running_mean, running_var = running_stats(c, x.dtype)
    output, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS)
    results = [output, save_mean, save_invstd, running_mean, running_var]
    results.append(bncpu.batch_norm(x, running_mean, running_var, weight, bias, False,
                                    MOMENTUM, EPS))
    for w in (weight, None):
        results += bncpu.batch_norm_backward(dy, x, w, None, None, save_mean, save_invstd, True,
                                             EPS)
    results += bncpu.batch_norm_backward(dy, x, weight, running_mean, running_var, None, None,
                                         False, EPS)
    mean, m2, count = bncpu.batch_norm_stats(x)
    global_mean, global_invstd = bncpu.batch_norm_gather_stats(mean, m2, count, eps=EPS)
    results += [mean, m2, global_mean, global_invstd]
    results.append(bncpu.batch_norm_elemt(x, weight, bias, global_mean, global_invstd))
    sum_dy, sum_dy_xmu = bncpu.batch_norm_backward_reduce(dy, x, global_mean, global_invstd,
                                                          weight)[:2]
    results += [sum_dy, sum_dy_xmu]
    results.append(bncpu.batch_norm_backward_elemt(dy, x, global_mean, global_invstd, weight,
                                                   sum_dy, sum_dy_xmu, count))
    return results


def large_inputs(shape, dtype):
    assert np.prod(shape) > SMALL_INPUT
    return (random_input(shape, dtype, seed=1),
            random_input(shape, dtype, seed=2, loc=0.0, scale=1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LARGE_SHAPES.values(), ids=LARGE_SHAPES.keys())
def test_results_do_not_depend_on_set_num_threads(shape, dtype):
    x, dy = large_inputs(shape, dtype)
    with num_threads(1):
        assert bncpu.get_num_threads() == 1
        expected = every_function(x, dy)
    for n in (2, 3):
        with num_threads(n):
            assert bncpu.get_num_threads() == n
            assert_all_bitwise_equal(every_function(x, dy), expected)


@needs_openmp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LARGE_SHAPES.values(), ids=LARGE_SHAPES.keys())
def test_results_do_not_depend_on_threadpoolctl_limits(shape, dtype):
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed")
    x, dy = large_inputs(shape, dtype)
    with threadpoolctl.threadpool_limits(1, "openmp"):
        assert bncpu.get_num_threads() == 1
        expected = every_function(x, dy)
    with threadpoolctl.threadpool_limits(2, "openmp"):
        assert bncpu.get_num_threads() == 2
        assert_all_bitwise_equal(every_function(x, dy), expected)


@needs_openmp
def test_set_num_threads_overrides_the_openmp_default():
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed")
    default = bncpu.get_num_threads()
    with num_threads(3):
        assert bncpu.get_num_threads() == 3
        with threadpoolctl.threadpool_limits(1, "openmp"):
            assert bncpu.get_num_threads() == 3
    assert bncpu.get_num_threads() == default


def test_set_num_threads_rejects_bad_counts():
    with pytest.raises(ValueError, match="must be >= 0"):
        bncpu.set_num_threads(-1)
    for bad in (1.5, True, "2", None):
        with pytest.raises(TypeError, match="must be an int"):
            bncpu.set_num_threads(bad)


# ----------------------------------------------------------------------------------
# Python threads
# ----------------------------------------------------------------------------------
def run_in_threads(n_threads, work):
    """Run work(index) on n_threads threads started together; re-raise the first error."""
    barrier = threading.Barrier(n_threads)
    errors = []

    def target(index):
        try:
            barrier.wait()
            work(index)
        except BaseException as error:   # reported to the test below
            errors.append(error)

    threads = [threading.Thread(target=target, args=(index,)) for index in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def concurrent_calls():
    """Calls of every function, small (single-threaded) and large (with an OpenMP team
    when no other call holds one), each returning a list of arrays."""
    small = random_input((16, 8, 5, 5), np.float32), random_input((16, 8, 5, 5), np.float32, seed=7)
    large = large_inputs((2, 3, 200, 200), np.float64)
    column = large_inputs((40000, 3), np.float32)
    calls = []
    for x, dy in (small, large, column):
        weight, bias = channel_params(x.shape[1], x.dtype)
        _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True,
                                                             MOMENTUM, EPS)
        mean, m2, count = bncpu.batch_norm_stats(x)
        calls += [
            lambda x=x, w=weight, b=bias: list(
                bncpu.batch_norm_forward(x, w, b, None, None, True, MOMENTUM, EPS)),
            lambda x=x, w=weight, b=bias: [
                bncpu.batch_norm(x, *running_stats(x.shape[1], x.dtype), w, b)],
            lambda x=x, dy=dy, w=weight, m=save_mean, i=save_invstd: list(
                bncpu.batch_norm_backward(dy, x, w, None, None, m, i, True, EPS)),
            lambda x=x: list(bncpu.batch_norm_stats(x)[:2]),
            lambda x=x, w=weight, b=bias, m=mean, i=save_invstd: [
                bncpu.batch_norm_elemt(x, w, b, m, i)],
            lambda x=x, dy=dy, m=mean: list(bncpu.batch_norm_backward_reduce(dy, x, m, m)[:2]),
            lambda x=x, dy=dy, w=weight, m=mean, i=save_invstd, n=count: [
                bncpu.batch_norm_backward_elemt(dy, x, m, i, w, m, m, n)],
        ]
    return calls


def test_python_threads_calling_at_once_get_serial_results():
    calls = concurrent_calls()
    expected = [call() for call in calls]
    calls_per_thread = 200

    def work(index):
        for step in range(calls_per_thread):
            which = (index * 7 + step) % len(calls)
            assert_all_bitwise_equal(calls[which](), expected[which])

    run_in_threads(4, work)


def test_set_num_threads_while_another_thread_computes():
    x, dy = large_inputs((2, 3, 300, 300), np.float32)
    expected = every_function(x, dy)
    computing = threading.Event()
    computing.set()

    def work(index):
        if index == 0:
            try:
                for _ in range(15):
                    assert_all_bitwise_equal(every_function(x, dy), expected)
            finally:
                computing.clear()
        else:
            counts = (1, 2, 3, 0)
            step = 0
            while computing.is_set():
                bncpu.set_num_threads(counts[step % len(counts)])
                step += 1
                time.sleep(1e-4)

    try:
        run_in_threads(2, work)
    finally:
        bncpu.set_num_threads(0)


# ----------------------------------------------------------------------------------
# Instruction sets: the portable, AVX2 and AVX-512 builds give the same bits
# ----------------------------------------------------------------------------------
ISA_SCRIPT = r"""
import sys
import numpy as np
import bncpu

rng = np.random.default_rng(11)
results = {"isa": np.array(bncpu.isa())}
for dtype in (np.float32, np.float64):
    # channel, split, column (S == 1, short rows, rows 4 KiB apart) modes; row norms
    for shape in [(8, 16, 32, 32), (4, 1, 300, 300), (301, 131), (67, 130, 3, 5),
                  (43, 16, 8, 8)]:
        x = (rng.standard_normal(shape) * 2 + 50).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w = rng.standard_normal(shape[1]).astype(dtype)
        b = rng.standard_normal(shape[1]).astype(dtype)
        key = f"{np.dtype(dtype).name}{shape}"
        y, mean, invstd = bncpu.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
        grads = bncpu.batch_norm_backward(dy, x, w, None, None, mean, invstd, True, 1e-5)
        ln = bncpu.layer_norm_forward(x, shape[1:], None, None, 1e-5)
        ln_grads = bncpu.layer_norm_backward(dy, x, shape[1:], ln[1], ln[2],
                                             np.ones(shape[1:], dtype))
        for name, arrays in (("bn", (y, mean, invstd) + tuple(grads)),
                             ("ln", tuple(ln) + tuple(ln_grads))):
            results[key + name] = np.concatenate([np.ravel(a) for a in arrays])
np.savez(sys.argv[1], **results)
"""


def test_every_instruction_set_build_gives_the_same_bits(tmp_path):
    isas = bncpu._capi.cpu_isas()
    if len(isas) < 2:
        pytest.skip(f"this CPU runs only the {isas[0]} build")
    runs = {}
    for isa in isas:
        path = tmp_path / f"{isa}.npz"
        result = subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(path)], cwd=tmp_path,
                                env={**os.environ, "BNCPU_ISA": isa}, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        runs[isa] = np.load(path)
        assert str(runs[isa]["isa"]) == isa
    first = runs[isas[0]]
    for isa in isas[1:]:
        for key in first.files:
            if key != "isa":
                np.testing.assert_array_equal(runs[isa][key].view(np.uint8),
                                              first[key].view(np.uint8),
                                              err_msg=f"{key}: {isa} vs {isas[0]}")
