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
from conftest import CHILD_CWD

TESTS = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(TESTS, "data", "digest.json")

# (name, shape): batch-norm inputs, (N, C, *spatial), and the work mode they reach.
BATCH_SHAPES = [
    ("column S=1", (300, 17)),
    ("column S=9", (64, 32, 3, 3)),
    ("column pass S=64", (16, 24, 8, 8)),
    ("channel", (4, 8, 40, 40)),
    ("split", (3, 1, 80, 80)),
    ("long rows", (2, 2, 300, 300)),
    ("streaming", (4, 3, 512, 520)),
    ("one row", (1, 5, 7)),
]
# (name, shape, normalized dims): layer/RMS norm rows.
ROW_SHAPES = [
    ("short rows", (33, 100), 1),
    ("one piece", (6, 7, 1000), 1),
    ("long rows", (3, 40003), 1),
    ("many rows", (4100, 64), 1),
]
# (name, shape, groups): group norm.
GROUP_SHAPES = [
    ("small", (8, 32, 14, 14), 4),
    ("channel > piece", (2, 4, 150, 150), 2),
    ("one group", (3, 6, 9), 1),
    ("cached, many rows", (16, 64, 10, 10), 32),
]


def _rng(*key):
    """A generator seeded by the key's text (hash() of a str changes between runs)."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8],
                                                "little"))


def _normal(shape, dtype, *key, loc=0.5, scale=2.0):
    return _rng(*key).normal(loc, scale, size=shape).astype(dtype)


def _cases():
    """Yield (case name, thunk returning a list of arrays) for every case."""
    for dtype in (np.float32, np.float64):
        dt = np.dtype(dtype).name
        for name, shape in BATCH_SHAPES:
            c = shape[1]
            for affine in (True, False):
                key = (name, dt, affine)

                def batch(shape=shape, c=c, affine=affine, key=key, dtype=dtype):
                    x = _normal(shape, dtype, "x", *key)
                    dy = _normal(shape, dtype, "dy", *key, loc=0.0, scale=1.0)
                    w = _normal(c, dtype, "w", *key, loc=1.0, scale=0.3) if affine else None
                    b = _normal(c, dtype, "b", *key, loc=0.0, scale=1.0) if affine else None
                    rm = _normal(c, dtype, "rm", *key, loc=0.0, scale=1.0)
                    rv = _rng("rv", *key).uniform(0.5, 2.0, c).astype(dtype)
                    out = []
                    rm_t, rv_t = rm.copy(), rv.copy()
                    y, sm, si = bncpu.batch_norm_forward(x, w, b, rm_t, rv_t, True, 0.1, 1e-5)
                    out += [y, sm, si, rm_t, rv_t]
                    ye, _, _ = bncpu.batch_norm_forward(x, w, b, rm, rv, False, 0.1, 1e-5)
                    out.append(ye)
                    out += [g for g in bncpu.batch_norm_backward(dy, x, w, rm, rv, sm, si, True,
                                                                 1e-5) if g is not None]
                    out += [g for g in bncpu.batch_norm_backward(dy, x, w, rm, rv, sm, si, False,
                                                                 1e-5) if g is not None]
                    mean, m2, count = bncpu.batch_norm_stats(x)
                    out += [mean, m2, np.asarray(count, np.int64)]
                    rm_g, rv_g = rm.copy(), rv.copy()
                    halves = [bncpu.batch_norm_stats(part) for part in
                              np.array_split(x, 2, axis=0)]
                    gm, gi = bncpu.batch_norm_gather_stats(
                        np.stack([h[0] for h in halves]), np.stack([h[1] for h in halves]),
                        np.array([h[2] for h in halves]), rm_g, rv_g, 0.1, 1e-5)
                    out += [gm, gi, rm_g, rv_g]
                    out.append(bncpu.batch_norm_elemt(x, w, b, gm, gi))
                    sums = bncpu.batch_norm_backward_reduce(dy, x, gm, gi, w)
                    out += [s for s in sums if s is not None]
                    out.append(bncpu.batch_norm_backward_elemt(dy, x, gm, gi, w, sums[0], sums[1],
                                                               np.int64(x.size // c)))
                    return out

                yield f"batch_norm {name} {dt} affine={affine}", batch
        for name, shape, dims in ROW_SHAPES:
            for affine in (True, False):
                key = ("rows", name, dt, affine)

                def rows(shape=shape, dims=dims, affine=affine, key=key, dtype=dtype):
                    normalized = shape[-dims:]
                    x = _normal(shape, dtype, "x", *key)
                    dy = _normal(shape, dtype, "dy", *key, loc=0.0, scale=1.0)
                    w = _normal(normalized, dtype, "w", *key, loc=1.0, scale=0.3) if affine else None
                    b = _normal(normalized, dtype, "b", *key, loc=0.0, scale=1.0) if affine else None
                    y, mean, rstd = bncpu.layer_norm_forward(x, normalized, w, b, 1e-5)
                    out = [y, mean, rstd]
                    out += [g for g in bncpu.layer_norm_backward(dy, x, normalized, mean, rstd, w)
                            if g is not None]
                    y, rstd = bncpu.rms_norm_forward(x, normalized, w, 1e-6)
                    out += [y, rstd]
                    out += [g for g in bncpu.rms_norm_backward(dy, x, normalized, rstd, w)
                            if g is not None]
                    return out

                yield f"layer/rms_norm {name} {dt} affine={affine}", rows
        for name, shape, groups in GROUP_SHAPES:
            for affine in (True, False):
                key = ("groups", name, dt, affine)

                def grouped(shape=shape, groups=groups, affine=affine, key=key, dtype=dtype):
                    c = shape[1]
                    x = _normal(shape, dtype, "x", *key)
                    dy = _normal(shape, dtype, "dy", *key, loc=0.0, scale=1.0)
                    w = _normal(c, dtype, "w", *key, loc=1.0, scale=0.3) if affine else None
                    b = _normal(c, dtype, "b", *key, loc=0.0, scale=1.0) if affine else None
                    y, mean, rstd = bncpu.group_norm_forward(x, groups, w, b, 1e-5)
                    out = [y, mean, rstd]
                    out += [g for g in bncpu.group_norm_backward(dy, x, groups, mean, rstd, w)
                            if g is not None]
                    rm = np.zeros(c, dtype)
                    rv = np.ones(c, dtype)
                    y, mean, rstd = bncpu.instance_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5)
                    out += [y, mean, rstd, rm, rv]
                    out += [g for g in bncpu.instance_norm_backward(dy, x, mean, rstd, w)
                            if g is not None]
                    return out

                yield f"group/instance_norm {name} {dt} affine={affine}", grouped


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
