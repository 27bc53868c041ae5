"""What the test modules share: array generators, per-dtype tolerances, exact-equality
checks, thread-count control and the optional PyTorch oracle.

Hypothesis runs under the profile "ci" (fixed seed, bounded examples) unless pytest is
given another one, e.g. a long fuzzing run:
    pytest tests --hypothesis-profile=long
"""
import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import bncpu

# Child Pythons that tests start with `python -c` must import the bncpu under test: from the
# repository root, `-c` would put the working directory, and with it the unbuilt source tree,
# first on sys.path. Tests start them in CHILD_CWD, and PYTHONPATH leads to the package this
# process imported (the installed one, or an in-place build).
CHILD_CWD = tempfile.mkdtemp(prefix="bncpu-tests-")
atexit.register(shutil.rmtree, CHILD_CWD, ignore_errors=True)
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(bncpu.__file__))),
                  os.environ.get("PYTHONPATH")]))

try:
    from hypothesis import HealthCheck, settings
except ImportError:   # only the property tests need it; they import it themselves
    pass
else:
    settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", max_examples=20_000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci")

DTYPES = (np.float32, np.float64)

# How far a result may be from the float64 reference, relative to the scale of the values
# it is made of: a few units in the last place of the dtype, times the number of rounding
# steps in the longest formula.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

# Which of weight and bias are given.
AFFINE = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True),
          "none": (False, False)}


# ----------------------------------------------------------------------------------
# Array generators
# ----------------------------------------------------------------------------------
def random_input(shape, dtype=np.float64, seed=0, loc=0.5, scale=2.0):
    """Normal values away from 0 (where one-pass variances would lose digits)."""
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(dtype)


def channel_params(c, dtype=np.float64, affine="weight+bias", seed=1):
    """(weight, bias) for c channels, each None unless AFFINE[affine] asks for it."""
    rng = np.random.default_rng(seed)
    has_weight, has_bias = AFFINE[affine]
    weight = rng.uniform(0.5, 1.5, size=c).astype(dtype) if has_weight else None
    bias = rng.normal(size=c).astype(dtype) if has_bias else None
    return weight, bias


def running_stats(c, dtype=np.float64, seed=2):
    """(running_mean, running_var) for c channels, the variances positive."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2.0, size=c).astype(dtype)


def _strided(x):
    """Same values in every other element of a larger buffer along the last axis."""
    buffer = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    buffer[..., ::2] = x
    return buffer[..., ::2]


def _read_only(x):
    x = x.copy()
    x.flags.writeable = False
    return x


# Equal values in another memory layout: each must give exactly the result of the
# C-contiguous native array.
LAYOUTS = {
    "C": np.ascontiguousarray,
    "fortran": np.asfortranarray,
    "negative-strides": lambda x: np.flip(np.flip(x).copy()),
    "strided": _strided,
    "byte-swapped": lambda x: x.astype(x.dtype.newbyteorder()),
    "read-only": _read_only,
}


# ----------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------
def central_differences(loss, array, step=1e-6):
    """d loss / d array by (loss(a + h) - loss(a - h)) / 2h, element by element."""
    grad = np.empty_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        upper = loss()
        array[index] = saved - step
        lower = loss()
        array[index] = saved
        grad[index] = (upper - lower) / (2 * step)
    return grad


def assert_close(actual, expected, dtype, scale=None):
    """actual within RTOL[dtype] of the float64 ``expected``, errors measured against
    ``scale`` (default: the largest |expected|, at least 1): a result that cancels to
    near 0 still carries the rounding errors of the terms it came from."""
    actual = np.asarray(actual)
    with np.errstate(over="ignore"):
        # Rounded to the dtype first: a value beyond its range is inf there.
        expected = np.asarray(expected).astype(dtype).astype(np.float64)
    assert actual.shape == expected.shape
    if scale is None:
        finite = np.abs(expected[np.isfinite(expected)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
    rtol = RTOL[np.dtype(dtype)]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_bitwise_equal(actual, expected):
    """Same dtype, shape and bytes: NaNs must match bit for bit too."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes()


def assert_all_bitwise_equal(actual, expected):
    """Element-wise assert_bitwise_equal over two equally long sequences (None == None)."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"result {index}"
        else:
            assert_bitwise_equal(a, e)


# ----------------------------------------------------------------------------------
# Threads and the PyTorch oracle
# ----------------------------------------------------------------------------------
@contextlib.contextmanager
def num_threads(n):
    """bncpu.set_num_threads(n) for the block, the default (0) afterwards."""
    bncpu.set_num_threads(n)
    try:
        yield
    finally:
        bncpu.set_num_threads(0)


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip(
        "torch", reason="PyTorch is not installed: the differential tests against it are skipped")


def to_torch(torch, array):
    """A tensor holding a copy of ``array`` (None stays None)."""
    return None if array is None else torch.tensor(np.array(array))


def runs_under_every_isa(script, tmp_path):
    """Run ``script`` (which saves its results to the .npz path in sys.argv[1], with an
    "isa" entry) in a child Python per instruction-set build this CPU runs; returns
    {isa: loaded results}. Skips when the CPU runs only one build."""
    isas = bncpu._capi.cpu_isas()
    if len(isas) < 2:
        pytest.skip(f"this CPU runs only the {isas[0]} build")
    # The bncpu this process runs, installed or built in place.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bncpu.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    runs = {}
    for isa in isas:
        path = tmp_path / f"{isa}.npz"
        result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=tmp_path,
                                env={**env, "BNCPU_ISA": isa}, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        runs[isa] = np.load(path)
        assert str(runs[isa]["isa"]) == isa
    return runs
