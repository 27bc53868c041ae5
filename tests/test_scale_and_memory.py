"""Scale (more than 2**31 elements, int64 indexing) and memory (no leaks).

The huge-tensor tests need about 9 GB and a minute: they are marked ``slow`` and run with
``pytest -m slow`` (CI runs them when the machine has the memory).
"""
import os

import numpy as np
import pytest

import bncpu

CALLS = 100_000


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _leak_cases():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.ones(3, np.float32)
    b = np.zeros(3, np.float32)
    rm = np.zeros(3, np.float32)
    rv = np.ones(3, np.float32)
    out = np.empty_like(x)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
    mean, m2, count = bncpu.batch_norm_stats(x)
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    cases = {
        "batch_norm": lambda: bncpu.batch_norm(x, rm, rv, w, b, True, out=out),
        "batch_norm_forward": lambda: bncpu.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5),
        "batch_norm_backward": lambda: bncpu.batch_norm_backward(
            dy, x, w, rm, rv, save_mean, save_invstd, True, 1e-5),
        "batch_norm_stats": lambda: bncpu.batch_norm_stats(x),
        "batch_norm_gather_stats": lambda: bncpu.batch_norm_gather_stats(
            np.stack([mean, mean]), np.stack([m2, m2]), [count, count]),
        "batch_norm_elemt": lambda: bncpu.batch_norm_elemt(x, w, b, mean, invstd),
        "batch_norm_backward_reduce": lambda: bncpu.batch_norm_backward_reduce(dy, x, mean, invstd, w),
        "batch_norm_backward_elemt": lambda: bncpu.batch_norm_backward_elemt(
            dy, x, mean, invstd, w, mean, m2, count),
        "bad_input_error": lambda: _expect_error(lambda: bncpu.batch_norm(x, rm[:2], rv, training=True)),
        "layer_norm": lambda: bncpu.layer_norm(x, (3, 5), None, None),
        "group_norm": lambda: bncpu.group_norm(x, 3, w, b),
        "instance_norm": lambda: bncpu.instance_norm(x, rm, rv, w, b),
        "rms_norm": lambda: bncpu.rms_norm(x, (5,)),
    }
    return cases


def _expect_error(call):
    try:
        call()
    except ValueError:
        return
    raise AssertionError("expected a ValueError")


@pytest.mark.parametrize("name", list(_leak_cases()))
def test_no_leak_over_many_calls(name):
    call = _leak_cases()[name]
    for _ in range(2000):   # warm up: caches, allocator pools
        call()
    before = rss_bytes()
    for _ in range(CALLS):
        call()
    grown = rss_bytes() - before
    # A leak of even 16 bytes per call would grow RSS by 1.6 MB.
    assert grown < 1 << 20, f"{name}: RSS grew by {grown} bytes over {CALLS} calls"


def _tiled_moments(pattern, total):
    """Float64 sum and centered sum of squares of `pattern` tiled to `total` values."""
    full, rest = divmod(total, pattern.size)
    p64 = pattern.astype(np.float64)
    tail = p64[:rest]
    mean = (full * p64.sum() + tail.sum()) / total
    m2 = full * ((p64 - mean) ** 2).sum() + ((tail - mean) ** 2).sum()
    return mean, m2


def _huge_channel():
    total = 2**31 + 5
    try:
        x = np.empty((1, 1, total), dtype=np.float32)
    except MemoryError:
        pytest.skip("not enough memory for a 2**31 + 5 element float32 array (8.6 GB)")
    pattern = (np.random.default_rng(0).standard_normal(2**20 + 7) * 2 + 3).astype(np.float32)
    flat = x.reshape(-1)
    for start in range(0, total, pattern.size):
        stop = min(start + pattern.size, total)
        flat[start:stop] = pattern[: stop - start]
    return x, pattern, total


@pytest.mark.slow
def test_more_than_2_31_values_in_one_channel():
    x, pattern, total = _huge_channel()
    mean, m2 = _tiled_moments(pattern, total)
    for threads in (1, 2):
        bncpu.set_num_threads(threads)
        try:
            got_mean, got_m2, count = bncpu.batch_norm_stats(x)
        finally:
            bncpu.set_num_threads(0)
        assert count == total
        # float32 data is summed in float32 runs of 8 per lane before widening (see
        # bncpu/_kernels/_float32_sums.h): relative errors near 1e-8, not 1e-16.
        np.testing.assert_allclose(got_mean[0], mean, rtol=1e-7)
        np.testing.assert_allclose(got_m2[0], m2, rtol=1e-7)

    # Training forward in place: the running variance uses M/(M-1) in float64.
    running_mean = np.zeros(1, np.float32)
    running_var = np.ones(1, np.float32)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, None, None, running_mean, running_var, True, 0.5, 1e-5, out=x)
    var = m2 / total
    np.testing.assert_allclose(save_mean[0], mean, rtol=1e-6)
    np.testing.assert_allclose(save_invstd[0], 1 / np.sqrt(var + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(running_var[0], 0.5 + 0.5 * var * total / (total - 1), rtol=1e-6)
    # The last values (past index 2**31) were normalized too.
    tail = pattern[np.arange(total - 5, total) % pattern.size].astype(np.float64)
    np.testing.assert_allclose(x[0, 0, -5:], (tail - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-5, atol=1e-5)
