"""Differential fuzzing against bncpu.reference with hypothesis.

Random shapes (empty and size-1 dimensions included), dtypes, memory layouts (C order,
Fortran order, reversed axes, strided views), weights present or absent, momentum and eps.
CI runs a fixed, bounded set of examples (derandomized); a long run:

    BNCPU_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
"""
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import bncpu  # noqa: E402
from bncpu import reference  # noqa: E402

EXAMPLES = int(os.environ.get("BNCPU_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 1000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOLERANCE = {np.float32: dict(rtol=2e-4, atol=2e-4), np.float64: dict(rtol=1e-9, atol=1e-9)}

shapes = st.lists(st.integers(0, 6), min_size=2, max_size=5).map(tuple)
dtypes = st.sampled_from([np.float32, np.float64])
layouts = st.sampled_from(["C", "F", "reversed", "strided"])


def lay_out(array, layout):
    """The same values as `array`, in another memory layout."""
    if layout == "F":
        return np.asfortranarray(array)
    if layout == "reversed":
        flipped = np.ascontiguousarray(array[(slice(None, None, -1),) * array.ndim])
        return flipped[(slice(None, None, -1),) * array.ndim]
    if layout == "strided":
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    return array


def values(draw, shape, dtype):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    center = draw(st.sampled_from([0.0, 1.0, 100.0]))
    return (rng.standard_normal(shape) * draw(st.sampled_from([1e-2, 1.0, 30.0])) + center).astype(dtype)


@st.composite
def batch_norm_case(draw):
    shape = draw(shapes)
    dtype = draw(dtypes)
    x = values(draw, shape, dtype)
    c = shape[1]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = rng.standard_normal(c).astype(dtype) if draw(st.booleans()) else None
    bias = rng.standard_normal(c).astype(dtype) if draw(st.booleans()) else None
    momentum = draw(st.sampled_from([0.0, 0.1, 0.9, 1.0]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5]))
    return x, draw(layouts), weight, bias, momentum, eps


def close(actual, expected, dtype):
    np.testing.assert_allclose(actual, expected, **TOLERANCE[dtype])


@FUZZ
@given(batch_norm_case())
def test_batch_norm_training_matches_reference(case):
    x, layout, weight, bias, momentum, eps = case
    dtype = x.dtype.type
    c = x.shape[1]
    m = x.shape[0] * int(np.prod(x.shape[2:]))   # values per channel, as PyTorch counts them
    rm, rv = np.linspace(-1, 1, c).astype(dtype), np.linspace(1, 2, c).astype(dtype)
    ref_rm, ref_rv = rm.astype(np.float64), rv.astype(np.float64)
    if m == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bncpu.batch_norm(lay_out(x, layout), rm, rv, weight, bias, True, momentum, eps)
        return
    y = bncpu.batch_norm(lay_out(x, layout), rm, rv, weight, bias, True, momentum, eps)
    expected = reference.batch_norm(x.astype(np.float64), ref_rm, ref_rv, weight, bias, True,
                                    momentum, eps)
    assert y.dtype == dtype and y.shape == x.shape
    close(y, expected, dtype)
    close(rm, ref_rm, dtype)
    close(rv, ref_rv, dtype)


@FUZZ
@given(batch_norm_case())
def test_batch_norm_eval_and_backward_match_reference(case):
    x, layout, weight, bias, momentum, eps = case
    dtype = x.dtype.type
    c = x.shape[1]
    rm, rv = np.linspace(-1, 1, c).astype(dtype), np.linspace(1, 2, c).astype(dtype)
    y = bncpu.batch_norm(lay_out(x, layout), rm, rv, weight, bias, False, momentum, eps)
    close(y, reference.batch_norm(x.astype(np.float64), rm, rv, weight, bias, False, momentum, eps), dtype)

    if x.size == 0 or x.shape[0] * int(np.prod(x.shape[2:])) < 2:
        return
    dy = np.cos(np.arange(x.size, dtype=np.float64)).reshape(x.shape).astype(dtype)
    _, save_mean, save_invstd = bncpu.batch_norm_forward(x, weight, bias, None, None, True, momentum, eps)
    for training in (True, False):
        got = bncpu.batch_norm_backward(lay_out(dy, layout), lay_out(x, layout), weight, rm, rv,
                                        save_mean, save_invstd, training, eps)
        want = reference.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), weight,
                                             rm, rv, save_mean, save_invstd, training, eps)
        scale = max(1.0, float(np.abs(want[0]).max()))
        np.testing.assert_allclose(got[0] / scale, want[0] / scale, **TOLERANCE[dtype])
        for g, w in zip(got[1:], want[1:]):
            if w is None:
                assert g is None
            else:
                np.testing.assert_allclose(g, w, rtol=TOLERANCE[dtype]["rtol"] * 10,
                                           atol=TOLERANCE[dtype]["atol"] * max(1, x.size))


@FUZZ
@given(st.data())
def test_row_norms_match_reference(data):
    shape = data.draw(st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple))
    dtype = data.draw(dtypes)
    x = values(data.draw, shape, dtype)
    layout = data.draw(layouts)
    k = data.draw(st.integers(1, len(shape) - 1))
    normalized_shape = shape[-k:]
    weight = np.linspace(0.5, 1.5, int(np.prod(normalized_shape))).reshape(normalized_shape).astype(dtype)
    x64 = x.astype(np.float64)
    close(bncpu.layer_norm(lay_out(x, layout), normalized_shape, weight, weight),
          reference.layer_norm(x64, normalized_shape, weight, weight), dtype)
    close(bncpu.rms_norm(lay_out(x, layout), normalized_shape, weight, 1e-6),
          reference.rms_norm(x64, normalized_shape, weight, 1e-6), dtype)
    c = shape[1]
    groups = data.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
    channel_weight = np.linspace(0.5, 1.5, c).astype(dtype)
    close(bncpu.group_norm(lay_out(x, layout), groups, channel_weight, channel_weight),
          reference.group_norm(x64, groups, channel_weight, channel_weight), dtype)
