"""The channels-last group-norm kernel (row_norm.pyx's _gn_last.pxi, the C API's
group_norm_channels_last_* entries) and group_norm(..., axis=-1), which runs it.

Against the channels-first kernel on the same values (to rounding: the sums run in
another order; bit for bit where the two layouts are one buffer, s <= 1), against torch
on the permuted data, odd shapes, in place, gradients only, errors, thread bit-identity
(sample mode and piece mode), and the entry called from C."""
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bncpu
from bncpu._ops import row_norm as rows
from conftest import (DTYPES, assert_all_bitwise_equal, assert_close, channel_params,
                      num_threads, random_input, to_torch)
from test_c_api import compile_c, example_env, toolchain  # noqa: F401 (a fixture)

EPS = 1e-5

# (N, *spatial, C), groups: C = G, G = 1, S = 1, N = 1, primes, float32 runs of 8 rows
# cut anywhere (S = 9, 23, 37), pieces of several rows (C = 2, 3), wide rows (C = 1500).
CASES = [((4, 5, 6, 6), 3), ((3, 7, 12), 12), ((2, 11, 12), 1), ((5, 1, 8), 4),
         ((1, 6, 5, 10), 5), ((3, 13, 17, 15), 5), ((2, 9, 14), 7), ((2, 23, 6), 2),
         ((6, 37, 3), 3), ((3, 4001, 2), 1), ((2, 3, 3, 1500), 30), ((7, 2, 2, 4), 2)]
# Empty: no samples, no positions, no channels (groups must still divide C).
EMPTY = [((0, 4, 6), 3), ((3, 0, 6), 2), ((2, 0, 0, 4), 4), ((3, 5, 0), 1)]


def first(array):
    """The channels-first (N, C, *spatial) copy of channels-last data."""
    return np.ascontiguousarray(np.moveaxis(array, -1, 1))


def last(array):
    return np.moveaxis(array, 1, -1)


def dims(x, channels_last):
    """(n, c, s) of a channels-last (N, *spatial, C) or channels-first (N, C, *spatial) x."""
    c = x.shape[-1] if channels_last else x.shape[1]
    spatial = x.shape[1:-1] if channels_last else x.shape[2:]
    return x.shape[0], c, int(np.prod(spatial))


def kernel_forward(x, groups, weight, bias, channels_last=True, y=None):
    """The row kernels called directly: (y, mean, rstd); the status must be OK."""
    n, c, s = dims(x, channels_last)
    y = np.empty_like(x) if y is None else y
    mean = np.empty((n, groups), x.dtype)
    rstd = np.empty((n, groups), x.dtype)
    status = rows.forward(x, y, n, c, s, groups, weight, bias, EPS, True, mean, rstd,
                          channels_last)
    assert status == 0, status
    return y, mean, rstd


def kernel_backward(dy, x, groups, mean, rstd, weight, channels_last=True, dx=None,
                    want_dx=True):
    """(dx, dweight, dbias) from the row kernels; dx None unless want_dx."""
    n, c, s = dims(x, channels_last)
    if want_dx and dx is None:
        dx = np.empty_like(x)
    dweight = np.empty(c, x.dtype) if weight is not None else None
    dbias = np.empty(c, x.dtype) if weight is not None else None
    status = rows.backward(dy, x, dx if want_dx else None, n, c, s, groups, mean, rstd, weight,
                           True, dweight, dbias, channels_last)
    assert status == 0, status
    return dx, dweight, dbias


def both_layouts(shape, groups, dtype, affine="weight+bias"):
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=7)
    weight, bias = channel_params(shape[-1], dtype, affine)
    return x, dy, weight, bias


# ----------------------------------------------------------------------------------
# Against the channels-first kernel
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
@pytest.mark.parametrize("shape,groups", CASES)
def test_kernel_against_channels_first(shape, groups, dtype, affine):
    x, dy, weight, bias = both_layouts(shape, groups, dtype, affine)
    y, mean, rstd = kernel_forward(x, groups, weight, bias)
    y_first, mean_first, rstd_first = kernel_forward(first(x), groups, weight, bias, False)
    assert_close(last(y_first), y, dtype)
    assert_close(mean, mean_first, dtype)
    assert_close(rstd, rstd_first, dtype)
    # The same saved statistics for both: the gradients differ by the sums' order only.
    result = kernel_backward(dy, x, groups, mean, rstd, weight)
    expected = kernel_backward(first(dy), first(x), groups, mean, rstd, weight, False)
    assert_close(result[0], last(expected[0]), dtype)
    for actual, wanted in zip(result[1:], expected[1:]):
        if wanted is None:
            assert actual is None
        else:
            assert_close(actual, wanted, dtype, scale=max(1.0, float(np.abs(wanted).max())))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", [((4, 1, 6), 2), ((3, 12), 4), ((2, 1, 1, 9), 3),
                                          ((5, 1, 7), 7)])
def test_one_position_is_the_channels_first_buffer_bit_for_bit(shape, groups, dtype):
    """s = 1: (n, 1, c) and (n, c, 1) are one buffer, and the channels-first kernel runs."""
    x, dy, weight, bias = both_layouts(shape, groups, dtype)
    result = kernel_forward(x, groups, weight, bias)
    expected = kernel_forward(first(x), groups, weight, bias, channels_last=False)
    assert_all_bitwise_equal([last(expected[0])] + list(expected[1:]), result)
    grads = kernel_backward(dy, x, groups, result[1], result[2], weight)
    expected = kernel_backward(first(dy), first(x), groups, result[1], result[2], weight,
                               channels_last=False)
    assert_all_bitwise_equal([last(expected[0])] + list(expected[1:]), grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", EMPTY)
def test_empty(shape, groups, dtype):
    """No values: the channels-first kernel's results (empty groups: mean 0, rstd NaN;
    parameter gradients 0)."""
    x, dy, weight, bias = both_layouts(shape, groups, dtype)
    result = kernel_forward(x, groups, weight, bias)
    expected = kernel_forward(first(x), groups, weight, bias, channels_last=False)
    assert_all_bitwise_equal(result[1:], expected[1:])
    assert result[0].shape == shape
    grads = kernel_backward(dy, x, groups, result[1], result[2], weight)
    assert_all_bitwise_equal(grads[1:], [np.zeros(shape[-1], dtype)] * 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_mean_small_spread(dtype):
    """Values 1e4 ± 1e-2 (the one-pass try fails for float32 pieces whose first rows are
    not typical: sorted data): accurate to rounding all the same. y = (x - mean)·rstd
    carries the rounding of a mean of 1e4 times rstd ~ 100: its scale."""
    shape, groups = (3, 50, 16), 4
    x = (1e4 + 1e-2 * random_input(shape, np.float64)).astype(dtype)
    x[1] = np.sort(x[1], axis=0)
    y, mean, rstd = kernel_forward(x, groups, None, None)
    expected = kernel_forward(first(x), groups, None, None, False)
    assert_close(y, last(expected[0]), dtype, scale=float(np.abs(x).max() * rstd.max()))
    np.testing.assert_allclose(mean, expected[1], rtol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_allclose(rstd, expected[2], rtol=1e-4 if dtype == np.float32 else 1e-10)


# ----------------------------------------------------------------------------------
# The Python API (group_norm*, axis=-1) against torch on the permuted data
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", [((4, 5, 6, 6), 3), ((2, 11, 12), 1),
                                          ((3, 13, 17, 15), 5), ((2, 3, 3, 1500), 30)])
def test_against_torch(torch, shape, groups, dtype):
    x, dy, weight, bias = both_layouts(shape, groups, dtype)
    output, mean, rstd = bncpu.group_norm_forward(x, groups, weight, bias, EPS, axis=-1)
    x_t = to_torch(torch, x).movedim(-1, 1).requires_grad_(True)
    w_t = to_torch(torch, weight).requires_grad_(True)
    b_t = to_torch(torch, bias).requires_grad_(True)
    y_t = torch.nn.functional.group_norm(x_t, groups, w_t, b_t, EPS)
    assert_close(output, y_t.movedim(1, -1).detach().numpy(), dtype)
    y_t.backward(to_torch(torch, dy).movedim(-1, 1))
    grads = bncpu.group_norm_backward(dy, x, groups, mean, rstd, weight, axis=-1)
    assert_close(grads[0], x_t.grad.movedim(1, -1).numpy(), dtype)
    for actual, wanted in zip(grads[1:], (w_t.grad, b_t.grad)):
        wanted = wanted.numpy()
        assert_close(actual, wanted, dtype, scale=max(1.0, float(np.abs(wanted).max())))


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_api_runs_the_kernel_without_copy(dtype):
    """group_norm(axis=-1) gives the kernel's bits, and writes in place (out=input)."""
    x, dy, weight, bias = both_layouts((3, 7, 5, 12), 4, dtype)
    expected = kernel_forward(x, 4, weight, bias)
    assert_all_bitwise_equal(bncpu.group_norm_forward(x, 4, weight, bias, EPS, axis=-1),
                             expected)
    in_place = x.copy()
    assert bncpu.group_norm(in_place, 4, weight, bias, EPS, out=in_place, axis=-1) is in_place
    assert_all_bitwise_equal([in_place], [expected[0]])
    grads = kernel_backward(dy, x, 4, expected[1], expected[2], weight)
    assert_all_bitwise_equal(bncpu.group_norm_backward(dy, x, 4, expected[1], expected[2],
                                                       weight, axis=-1), grads)
    dx = dy.copy()
    bncpu.group_norm_backward(dx, x, 4, expected[1], expected[2], weight, out=dx, axis=-1)
    assert_all_bitwise_equal([dx], [grads[0]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_in_place_and_gradients_only(dtype):
    x, dy, weight, bias = both_layouts((4, 9, 10), 5, dtype)
    y, mean, rstd = kernel_forward(x, 5, weight, bias)
    y_in_place = x.copy()
    kernel_forward(y_in_place, 5, weight, bias, y=y_in_place)
    assert_all_bitwise_equal([y_in_place], [y])
    dx, dweight, dbias = kernel_backward(dy, x, 5, mean, rstd, weight)
    for alias in ("dy", "x"):
        buffer = (dy if alias == "dy" else x).copy()
        args = (buffer, x) if alias == "dy" else (dy, buffer)
        kernel_backward(*args, 5, mean, rstd, weight, dx=buffer)
        assert_all_bitwise_equal([buffer], [dx])
    _, dweight_only, dbias_only = kernel_backward(dy, x, 5, mean, rstd, weight, want_dx=False)
    assert_all_bitwise_equal([dweight_only, dbias_only], [dweight, dbias])


def test_bad_groups_and_eps_write_nothing():
    x = random_input((2, 4, 6), np.float32)
    y = np.full_like(x, 7.0)
    mean = np.full((2, 4), 7.0, np.float32)
    rstd = mean.copy()
    assert rows.forward(x, y, 2, 6, 4, 4, None, None, EPS, True, mean, rstd, True) == 7
    assert rows.forward(x, y, 2, 6, 4, 3, None, None, -1.0, True, mean[:, :3].copy(),
                        rstd[:, :3].copy(), True) == 4
    dx = np.full_like(x, 7.0)
    assert rows.backward(x, x, dx, 2, 6, 4, 4, mean, rstd, None, True, None, None, True) == 7
    assert (y == 7).all() and (mean == 7).all() and (rstd == 7).all() and (dx == 7).all()
    with pytest.raises(ValueError, match="channels last is group norm's"):
        rows.forward(x, y, 2, 6, 4, 1, None, None, EPS, False, None, rstd, True)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        bncpu.group_norm(x, 4, axis=-1)


# ----------------------------------------------------------------------------------
# Threads: the same bits for 1, 2 and 3 threads, in piece mode (small inputs) and
# sample mode (inputs beyond CACHED_BYTES, at least twice as many samples as threads)
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", [((2, 40, 40, 48), 6), ((7, 31, 17, 96), 32),
                                          ((8, 48, 48, 130), 13), ((1, 300, 257), 1)])
def test_threads_give_the_same_bits(shape, groups, dtype):
    x, dy, weight, bias = both_layouts(shape, groups, dtype)
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            forward = kernel_forward(x, groups, weight, bias)
            results.append(forward + kernel_backward(dy, x, groups, forward[1], forward[2],
                                                     weight))
    for other in results[1:]:
        assert_all_bitwise_equal(other, results[0])
    expected = kernel_forward(first(x), groups, weight, bias, False)
    assert_close(results[0][0], last(expected[0]), dtype)


ISA_SCRIPT = r"""
import hashlib
import numpy as np
import bncpu
digest = hashlib.sha256()
for dtype in (np.float32, np.float64):
    for shape, groups in [((3, 13, 17, 16), 4), ((2, 40, 40, 48), 6), ((2, 23, 6), 2)]:
        rng = np.random.default_rng(5)
        x = (rng.standard_normal(shape) * 2 + 50).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        w = rng.standard_normal(shape[-1]).astype(dtype)
        b = rng.standard_normal(shape[-1]).astype(dtype)
        y, mean, rstd = bncpu.group_norm_forward(x, groups, w, b, 1e-5, axis=-1)
        for a in (y, mean, rstd) + bncpu.group_norm_backward(dy, x, groups, mean, rstd, w,
                                                             axis=-1):
            digest.update(np.ascontiguousarray(a).tobytes())
print(bncpu.isa(), digest.hexdigest())
"""


def test_every_instruction_set_build_gives_the_same_bits(tmp_path):
    isas = bncpu._capi.cpu_isas()
    if len(isas) < 2:
        pytest.skip(f"this CPU runs only the {isas[0]} build")
    package_parent = str(Path(bncpu.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    digests = set()
    for isa in isas:
        result = subprocess.run([sys.executable, "-c", ISA_SCRIPT], cwd=tmp_path,
                                env=dict(env, BNCPU_ISA=isa), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        name, digest = result.stdout.split()
        assert name == isa
        digests.add(digest)
    assert len(digests) == 1, digests


# ----------------------------------------------------------------------------------
# From C: the C API's entries against the Python result, bit for bit
# ----------------------------------------------------------------------------------
C_PROGRAM = textwrap.dedent(r"""
    /* gn_last IN OUT: IN holds int64 n, s, c, groups, then x, dy (n*s*c doubles), weight,
     * bias (c doubles). For float then double: group norm channels last forward and
     * backward; OUT receives y, mean, rstd, dx, dweight, dbias in that precision. Prints
     * the status of a call with groups that do not divide c. */
    #include "bncpu.h"

    #define RUN(T, SUFFIX)                                                                 \
    static int run_##SUFFIX(const int64_t* dims, const double* in, FILE* out)             \
    {                                                                                      \
        int64_t n = dims[0], s = dims[1], c = dims[2], groups = dims[3];                  \
        int64_t size = n * s * c, k;                                                       \
        T* x = malloc(sizeof(T) * (2 * size + 2 * c));                                     \
        T* dy = x + size;                                                                  \
        T* weight = dy + size;                                                             \
        T* bias = weight + c;                                                              \
        T* y = malloc(sizeof(T) * (2 * size + 2 * n * groups + 2 * c));                   \
        T* dx = y + size;                                                                  \
        T* mean = dx + size;                                                               \
        T* rstd = mean + n * groups;                                                       \
        T* dweight = rstd + n * groups;                                                    \
        T* dbias = dweight + c;                                                            \
        int status;                                                                        \
        for (k = 0; k < 2 * size + 2 * c; k++)                                             \
            x[k] = (T)in[k];                                                               \
        status = bncpu_group_norm_channels_last_forward_##SUFFIX(                          \
            x, y, n, c, s, groups, weight, bias, 1e-5, mean, rstd);                        \
        if (status == BNCPU_OK)                                                            \
            status = bncpu_group_norm_channels_last_backward_##SUFFIX(                     \
                dy, x, dx, n, c, s, groups, mean, rstd, weight, dweight, dbias);           \
        if (status == BNCPU_OK) {                                                          \
            fwrite(y, sizeof(T), size, out);                                               \
            fwrite(mean, sizeof(T), 2 * n * groups, out);                                  \
            fwrite(dx, sizeof(T), size, out);                                              \
            fwrite(dweight, sizeof(T), 2 * c, out);                                        \
            printf("bad groups: %d\n", bncpu_group_norm_channels_last_forward_##SUFFIX(   \
                x, y, n, c, s, groups + 1, weight, bias, 1e-5, mean, rstd));               \
        }                                                                                  \
        free(x);                                                                           \
        free(y);                                                                           \
        return status;                                                                     \
    }
    RUN(float, f32)
    RUN(double, f64)

    int main(int argc, char** argv)
    {
        int64_t dims[4];
        double* in;
        size_t count;
        int status;
        FILE* f;
        if (argc != 3 || bncpu_import() != BNCPU_OK) {
            fprintf(stderr, "usage: gn_last IN OUT (%s)\n", bncpu_import_error());
            return 1;
        }
        f = fopen(argv[1], "rb");
        if (f == NULL || fread(dims, sizeof(int64_t), 4, f) != 4)
            return 1;
        count = (size_t)(2 * dims[0] * dims[1] * dims[2] + 2 * dims[2]);
        in = malloc(sizeof(double) * count);
        if (fread(in, sizeof(double), count, f) != count)
            return 1;
        fclose(f);
        f = fopen(argv[2], "wb");
        status = run_f32(dims, in, f);
        if (status == BNCPU_OK)
            status = run_f64(dims, in, f);
        fclose(f);
        free(in);
        if (status != BNCPU_OK) {
            fprintf(stderr, "%s\n", bncpu_strerror(status));
            return 1;
        }
        return 0;
    }
""")


def test_c_entries_match_python(toolchain, tmp_path):  # noqa: F811 (the fixture)
    compiler, include_flags, link_flags = toolchain
    source = tmp_path / "gn_last.c"
    source.write_text(C_PROGRAM)
    binary = tmp_path / "gn_last"
    compile_c(compiler + ["-O2", "-Wall", "-Wextra", "-Werror", "-pthread", str(source), "-o",
                          str(binary)] + include_flags + link_flags)
    n, height, width, c, groups = 3, 9, 7, 12, 4
    shape = (n, height, width, c)
    x = random_input(shape)
    dy = random_input(shape, seed=7)
    weight, bias = channel_params(c)
    (tmp_path / "in.bin").write_bytes(
        struct.pack("4q", n, height * width, c, groups)
        + np.concatenate([x.ravel(), dy.ravel(), weight, bias]).tobytes())
    result = subprocess.run([str(binary), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                            capture_output=True, text=True, env=example_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "bad groups: 7\n" * 2
    data = (tmp_path / "out.bin").read_bytes()
    offset = 0
    for dtype in DTYPES:
        def take(count, dtype=dtype):
            nonlocal offset
            values = np.frombuffer(data, dtype, count, offset)
            offset += count * np.dtype(dtype).itemsize
            return values
        cast = [a.astype(dtype) for a in (x, dy, weight, bias)]
        output, mean, rstd = bncpu.group_norm_forward(cast[0], groups, cast[2], cast[3], EPS,
                                                      axis=-1)
        grads = bncpu.group_norm_backward(cast[1], cast[0], groups, mean, rstd, cast[2],
                                          axis=-1)
        got = [take(x.size).reshape(shape), take(n * groups).reshape(n, groups),
               take(n * groups).reshape(n, groups), take(x.size).reshape(shape), take(c),
               take(c)]
        assert_all_bitwise_equal(got, [output, mean, rstd, *grads])
    assert offset == len(data)
