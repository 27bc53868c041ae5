"""The bits of every kernel's results, recorded once and checked ever after.

A refactoring of the kernels (moving code between files, changing how the wrappers
reach them) must not change one bit of any result. This file computes every public
function on a fixed set of inputs chosen to reach every work mode (batch norm: column,
channel and split mode, long rows cut into pieces, streaming stores; row norms: row and
piece mode, rows longer than a piece, channels longer than a piece), in float32 and
float64, with and without weight and bias, and compares the SHA-256 of each output with
tests/data/digest.json. It does so at 1, 2 and 3 threads, and in a subprocess for every
instruction-set build the CPU runs.

The data file is recorded with ``python tests/test_digest.py --record``: do it only when
a change of results is intended, and say why in the commit.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bncpu
from bncpu._registry import FUNCTIONS
from conftest import CHILD_CWD

TESTS = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(TESTS, "data", "digest.json")

# (name, shape, options): inputs of each kind and the work mode they reach; the options go
# to the registry's generators (bncpu._registry.Options).
BATCH_SHAPES = [
    ("column S=1", (300, 17), {}),
    ("column S=9", (64, 32, 3, 3), {}),
    ("column pass S=64", (16, 24, 8, 8), {}),
    ("channel", (4, 8, 40, 40), {}),
    ("split", (3, 1, 80, 80), {}),
    ("long rows", (2, 2, 300, 300), {}),
    ("streaming", (4, 3, 512, 520), {}),
    ("one row", (1, 5, 7), {}),
]
ROW_SHAPES = [
    ("short rows", (33, 100), {"normalized_dims": 1}),
    ("one piece", (6, 7, 1000), {"normalized_dims": 1}),
    ("long rows", (3, 40003), {"normalized_dims": 1}),
    ("many rows", (4100, 64), {"normalized_dims": 1}),
]
GROUP_SHAPES = [
    ("small", (8, 32, 14, 14), {"groups": 4}),
    ("channel > piece", (2, 4, 150, 150), {"groups": 2}),
    ("one group", (3, 6, 9), {"groups": 1}),
    ("cached, many rows", (16, 64, 10, 10), {"groups": 32}),
]

# A case runs the registry functions of some families, in registry order, on one set of
# inputs (arrays drawn by name from the case's key): (case name, families, key prefix,
# shapes). Every registry family is in one group (test_every_function_is_digested).
GROUPS = [
    ("batch_norm", ("batch_norm",), (), BATCH_SHAPES),
    ("layer/rms_norm", ("layer_norm", "rms_norm"), ("rows",), ROW_SHAPES),
    ("group/instance_norm", ("group_norm", "instance_norm"), ("groups",), GROUP_SHAPES),
    ("fused batch_norm", ("fused",), ("fused",), BATCH_SHAPES),
]


def _rng(*key):
    """A generator seeded by the key's text (hash() of a str changes between runs)."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8],
                                                "little"))


class _KeyedDraws:
    """The registry generators' draws, each array from a generator of its own, seeded by
    its name and the case's key: the same inputs whichever functions a case runs. Each is
    drawn once per case and handed out as a copy (calls write running statistics)."""

    def __init__(self, *key):
        self.key = key
        self._drawn = {}

    def _draw(self, name, method, shape, dtype, *params):
        drawn_key = (name, method, shape, dtype, params)
        if drawn_key not in self._drawn:
            values = getattr(_rng(name, *self.key), method)(*params, size=shape)
            self._drawn[drawn_key] = values.astype(dtype)
        return self._drawn[drawn_key].copy()

    def normal(self, name, shape, dtype, loc=0.0, scale=1.0):
        return self._draw(name, "normal", shape, dtype, loc, scale)

    def uniform(self, name, shape, dtype, low, high):
        return self._draw(name, "uniform", shape, dtype, low, high)


def _variants(spec):
    """The options each function runs with: both modes and both residual settings where
    it has them."""
    trainings = (True, False) if "training" in spec.params else (True,)
    residuals = (True, False) if "residual_grad" in spec.params or "residual" in spec.params \
        else (True,)
    return [dict(training=t, residual=r) for t in trainings for r in residuals]




def _channels_last(shape):
    return (shape[0],) + shape[2:] + (shape[1],)


def _outputs(spec, args):
    """What a call gives: its results (absent and empty ones left out) and the arguments
    it updated in place."""
    results = [r for r in spec.call(args) if r is not None and np.size(r)]
    return results + [args[name] for name in spec.updated(args)]


def _cases():
    """Yield (case name, thunk returning a list of arrays) for every case."""
    for dtype in (np.float32, np.float64):
        dt = np.dtype(dtype).name
        for group, families, prefix, shapes in GROUPS:
            specs = [spec for spec in FUNCTIONS.values() if spec.family in families]
            # Channels-last data for the functions that take it (4-D and 3-D shapes: on
            # 2-D input axis -1 is axis 1).
            axes = (1, -1) if any("axis" in spec.params for spec in specs) else (1,)
            for name, shape, options in shapes:
                for axis in axes:
                    if axis == -1 and len(shape) < 3:
                        continue
                    for affine in (True, False):
                        layout = "" if axis == 1 else f" axis={axis}"
                        key = prefix + (name, dt, affine) + (("axis", axis) if layout else ())
                        data_shape = shape if axis == 1 else _channels_last(shape)

                        def thunk(specs=specs, key=key, shape=data_shape, dtype=dtype,
                                  options=dict(options, affine=affine, axis=axis)):
                            out, draws = [], _KeyedDraws(*key)
                            for spec in specs:
                                if options["axis"] != 1 and "axis" not in spec.params:
                                    continue
                                for variant in _variants(spec):
                                    args = spec.inputs(shape, dtype, draws=draws,
                                                       **options, **variant)
                                    out += _outputs(spec, args)
                            return out

                        yield f"{group} {name} {dt} affine={affine}{layout}", thunk


def _digest(arrays):
    """SHA-256 of each array: dtype, shape and bytes."""
    result = []
    for array in arrays:
        array = np.ascontiguousarray(array)
        h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())
        result.append(h.hexdigest()[:32])
    return result


def compute(threads=(1, 2, 3)):
    """{case: [digest per output]}; every thread count must give the same digests."""
    digests = {}
    for name, thunk in _cases():
        seen = None
        for n in threads:
            bncpu.set_num_threads(n)
            try:
                current = _digest(thunk())
            finally:
                bncpu.set_num_threads(0)
            if seen is not None and current != seen:
                raise AssertionError(f"{name}: {n} threads give other bits than {threads[0]}")
            seen = current
        digests[name] = seen
    return digests


def _recorded():
    with open(DATA) as f:
        return json.load(f)


def _compare(actual, expected):
    assert sorted(actual) == sorted(expected), "the set of cases changed"
    changed = [name for name in expected if actual[name] != expected[name]]
    assert not changed, f"results changed in {len(changed)} cases, e.g. {changed[:5]}"


def test_every_function_is_digested():
    """Every registry family is in exactly one group, so every function (and through
    the channels-last cases, every C entry) has its bits recorded."""
    grouped = [family for _, families, _, _ in GROUPS for family in families]
    assert sorted(grouped) == sorted({spec.family for spec in FUNCTIONS.values()})
    names = {name.split(" axis=")[0] for name, _ in _cases()}
    assert any(name.startswith("fused batch_norm streaming") for name in names)
    assert any(name.endswith("axis=-1") for name, _ in _cases())


def test_digest_unchanged_at_1_2_3_threads():
    _compare(compute(), _recorded())


def _isas():
    from bncpu import _capi
    return _capi.cpu_isas()


@pytest.mark.parametrize("isa", _isas())
def test_digest_unchanged_in_every_isa_build(isa):
    if isa == bncpu.isa():
        pytest.skip("the build in use is checked by test_digest_unchanged_at_1_2_3_threads")
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_digest; "
              "print(json.dumps(test_digest.compute(threads=(2,))))")
    result = subprocess.run([sys.executable, "-c", script, TESTS],
                            env={**os.environ, "BNCPU_ISA": isa}, capture_output=True, text=True,
                            timeout=600, cwd=CHILD_CWD)
    assert result.returncode == 0, result.stderr[-2000:]
    _compare(json.loads(result.stdout), _recorded())


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_digest.py --record   (rewrites tests/data/digest.json)")
    os.makedirs(os.path.dirname(DATA), exist_ok=True)
    with open(DATA, "w") as f:
        json.dump(compute(), f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"recorded {DATA}")
