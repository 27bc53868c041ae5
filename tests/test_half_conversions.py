"""bncpu/_kernels/_half.h: float32 <-> bfloat16 / float16 conversions, every ISA path.

A small C harness around the header is compiled once per ISA path (the manifest's
levels, plus the flags a level would need for F16C and AVX512BF16) and loaded with
ctypes; a path the CPU lacks is skipped with the reason. Each path's scalar and vector
forms must give the bits of NumPy's float16 and ml_dtypes.bfloat16 conversions (both
round to nearest even), except for NaNs, which follow the header's rule (quiet, sign and
high payload bits kept) where the references differ: NumPy keeps a float16 signaling
NaN signaling, ml_dtypes gives one canonical bfloat16 NaN. Equal to the references on
every path, the paths are equal to one another, so results do not depend on the build.
"""
import ctypes
import functools
import os
import platform
import shlex
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from bncpu._kernels.manifest import ISA_LEVELS

KERNELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "bncpu", "_kernels")
FORMATS = ("bf16", "f16")
ON_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
# setup.py's flags for the kernels, less OpenMP.
BASE_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]

HARNESS_SOURCE = r"""
#include <stdint.h>
#include "_half.h"
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define HARNESS_X86 1
#endif

int vector_width(void) { return BNCPU_HALF_VW; }
const char* bf16_path(void) { return BNCPU_HALF_BF16_PATH; }
const char* f16_path(void) { return BNCPU_HALF_F16_PATH; }

/* bit 0: the manifest's avx2 level, 1: F16C, 2: its avx512 level, 3: AVX512BF16 */
unsigned cpu_features(void)
{
    unsigned features = 0;
#if HARNESS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        features |= 1u;
    if (__builtin_cpu_supports("f16c"))
        features |= 2u;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("fma"))
        features |= 4u;
    if (__builtin_cpu_supports("avx512bf16"))
        features |= 8u;
#endif
    return features;
}

/* noinline: the _under wrappers must not let the conversions move across the MXCSR
 * writes. */
#define FORMS(F)                                                                          \
__attribute__((noinline)) void F##_widen_scalar(const bncpu_##F* src, float* dst,         \
                                                int64_t n)                                \
{                                                                                         \
    for (int64_t i = 0; i < n; i++)                                                       \
        dst[i] = bncpu_##F##_to_f32(src[i]);                                              \
}                                                                                         \
__attribute__((noinline)) void F##_narrow_scalar(const float* src, bncpu_##F* dst,        \
                                                 int64_t n)                               \
{                                                                                         \
    for (int64_t i = 0; i < n; i++)                                                       \
        dst[i] = bncpu_f32_to_##F(src[i]);                                                \
}                                                                                         \
__attribute__((noinline)) void F##_widen_vector(const bncpu_##F* src, float* dst,         \
                                                int64_t n)                                \
{                                                                                         \
    bncpu_##F##_widen(src, dst, n);                                                       \
}                                                                                         \
__attribute__((noinline)) void F##_narrow_vector(const float* src, bncpu_##F* dst,        \
                                                 int64_t n)                               \
{                                                                                         \
    bncpu_##F##_narrow(src, dst, n);                                                      \
}                                                                                         \
/* one vector per store (bncpu_F_narrow stores two at a time) */                          \
__attribute__((noinline)) void F##_narrow_each(const float* src, bncpu_##F* dst,          \
                                               int64_t n)                                 \
{                                                                                         \
    int64_t i = 0;                                                                        \
    for (; i + BNCPU_HALF_VW <= n; i += BNCPU_HALF_VW)                                    \
        bncpu_##F##_store(dst + i, bncpu_half_load_f32(src + i));                         \
    if (i < n)                                                                            \
        bncpu_##F##_store_n(dst + i, bncpu_half_load_f32_n(src + i, (int)(n - i)),        \
                            (int)(n - i));                                                \
}                                                                                         \
/* widened and narrowed in registers, as a kernel reading and writing F does */           \
__attribute__((noinline)) void F##_roundtrip(const bncpu_##F* src, bncpu_##F* dst,        \
                                             int64_t n)                                   \
{                                                                                         \
    int64_t i = 0;                                                                        \
    for (; i + BNCPU_HALF_VW <= n; i += BNCPU_HALF_VW)                                    \
        bncpu_##F##_store(dst + i, bncpu_##F##_load(src + i));                            \
    if (i < n)                                                                            \
        bncpu_##F##_store_n(dst + i, bncpu_##F##_load_n(src + i, (int)(n - i)),           \
                            (int)(n - i));                                                \
}                                                                                         \
UNDER_MXCSR(F, widen_vector, const bncpu_##F*, float*)                                    \
UNDER_MXCSR(F, narrow_vector, const float*, bncpu_##F*)

#if HARNESS_X86
#define UNDER_MXCSR(F, FORM, SRC, DST)                                                    \
void F##_##FORM##_under(SRC src, DST dst, int64_t n, unsigned csr)                        \
{                                                                                         \
    unsigned saved = _mm_getcsr();                                                        \
    _mm_setcsr(csr);                                                                      \
    F##_##FORM(src, dst, n);                                                              \
    _mm_setcsr(saved);                                                                    \
}
#else
#define UNDER_MXCSR(F, FORM, SRC, DST)
#endif

FORMS(bf16)
FORMS(f16)
"""

AVX2, F16C, AVX512, AVX512BF16 = 1, 2, 4, 8


def _flags(level, *extra):
    flags = list(ISA_LEVELS[level][1])
    return flags + [flag for flag in extra if flag not in flags]


class IsaPath:
    """One way to compile the header: flags, the CPU features it needs, and the paths
    (bf16, f16) the header must pick with those flags."""

    def __init__(self, name, flags, needs):
        self.name, self.flags, self.needs = name, flags, needs

    def expected_paths(self):
        bf16 = "avx512bf16" if "-mavx512bf16" in self.flags else "portable"
        if "-mavx512f" in self.flags:
            f16 = "avx512f"
        elif "-mf16c" in self.flags:
            f16 = "f16c"
        else:
            f16 = "portable"
        return bf16, f16


ISA_PATHS = [IsaPath("baseline", _flags("baseline"), 0)]
if ON_X86:
    ISA_PATHS += [
        IsaPath("avx2", _flags("avx2"), AVX2),
        IsaPath("avx2+f16c", _flags("avx2", "-mf16c"), AVX2 | F16C),
        IsaPath("avx512", _flags("avx512"), AVX512),
        IsaPath("avx512+bf16", _flags("avx512", "-mavx512bf16"), AVX512 | AVX512BF16),
    ]


def find_compiler():
    command = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]
    return command if command[0] and shutil.which(command[0]) else None


def compile_harness(compiler, flags, directory, name, extra=("-shared", "-fPIC")):
    """Compile HARNESS_SOURCE in directory; returns the output's path."""
    source = os.path.join(directory, "half_harness.c")
    with open(source, "w") as f:
        f.write(HARNESS_SOURCE)
    output = os.path.join(directory, name)
    command = compiler + BASE_FLAGS + list(flags) + list(extra) + ["-I", KERNELS_DIR, source,
                                                                   "-o", output]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, (f"{shlex.join(command)} failed:\n"
                                    f"{result.stdout}{result.stderr}")
    return output


def _pointer(array):
    return ctypes.c_void_p(array.ctypes.data)


class Harness:
    """The compiled harness of one ISA path, called on NumPy arrays."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        for name in ("bf16_path", "f16_path"):
            getattr(self.lib, name).restype = ctypes.c_char_p
        self.lib.cpu_features.restype = ctypes.c_uint
        self.vector_width = self.lib.vector_width()

    def paths(self):
        return self.lib.bf16_path().decode(), self.lib.f16_path().decode()

    def call(self, name, src, dst, *extra):
        """name(src, dst, len(src), *extra) on contiguous arrays; returns dst."""
        assert src.flags.c_contiguous and dst.flags.c_contiguous and dst.size >= src.size
        getattr(self.lib, name)(_pointer(src), _pointer(dst), ctypes.c_int64(src.size), *extra)
        return dst

    def widen(self, fmt, form, halves):
        return self.call(f"{fmt}_widen_{form}", halves, np.empty(halves.size, np.float32))

    def narrow(self, fmt, form, values):
        return self.call(f"{fmt}_narrow_{form}", values, np.empty(values.size, np.uint16))


@functools.lru_cache(maxsize=None)
def cpu_features(compiler):
    """The AVX2 | F16C | AVX512 | AVX512BF16 bits this CPU has (the harness asks it)."""
    with tempfile.TemporaryDirectory(prefix="bncpu_half_") as directory:
        return Harness(compile_harness(list(compiler), [], directory,
                                       "half_cpu.so")).lib.cpu_features()


def build(path, directory):
    """The Harness of an IsaPath, or a reason it cannot run here."""
    compiler = find_compiler()
    if compiler is None:
        return "no C compiler found (cc, gcc or $CC)"
    missing = path.needs & ~cpu_features(tuple(compiler))
    if missing:
        names = [name for bit, name in ((AVX2, "AVX2+FMA"), (F16C, "F16C"),
                                        (AVX512, "AVX-512 F/BW/VL/DQ"),
                                        (AVX512BF16, "AVX512BF16")) if missing & bit]
        return f"this CPU lacks {', '.join(names)} for the {path.name} path"
    return Harness(compile_harness(compiler, path.flags, directory,
                                   f"half_{path.name.replace('+', '_')}.so"))


@pytest.fixture(scope="module", params=ISA_PATHS, ids=lambda path: path.name)
def harness(request, tmp_path_factory):
    built = build(request.param, str(tmp_path_factory.mktemp(request.param.name)))
    if isinstance(built, str):
        pytest.skip(built)
    built.isa_path = request.param
    return built


# ----------------------------------------------------------------------------------
# The references
# ----------------------------------------------------------------------------------
def bfloat16():
    return pytest.importorskip("ml_dtypes").bfloat16


def expected_widen(fmt, halves):
    """float32 bits of each 16-bit pattern: the reference's, a float16 NaN made quiet."""
    if fmt == "bf16":
        return halves.view(bfloat16()).astype(np.float32).view(np.uint32)
    bits = halves.view(np.float16).astype(np.float32).view(np.uint32)
    return np.where((halves & 0x7fff) > 0x7c00, bits | np.uint32(0x00400000), bits)


def nan_bits(fmt, bits):
    """The header's NaN rule: sign, quiet bit, the payload's high bits."""
    if fmt == "bf16":
        return ((bits >> 16) | 0x0040).astype(np.uint16)
    return (((bits >> 16) & 0x8000) | 0x7e00 | ((bits >> 13) & 0x03ff)).astype(np.uint16)


def expected_narrow(fmt, values):
    bits = values.view(np.uint32)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = values.astype(bfloat16() if fmt == "bf16" else np.float16).view(np.uint16)
    return np.where((bits & 0x7fffffff) > 0x7f800000, nan_bits(fmt, bits), rounded)


EVERY_PATTERN = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def with_negatives(values):
    return np.concatenate([values, -values])


@functools.lru_cache(maxsize=None)
def special_values(fmt):
    """Zeros, subnormals, infinities, NaNs with payloads, the largest finite values, the
    overflow thresholds, and every halfway case of the format with its two float32
    neighbours."""
    named = f32([0, 1, 0x00012345, 0x007fffff, 0x00800000, 0x3f800000, 0x7f7fffff,
                 0x7f800000, 0x7f800001, 0x7f802000, 0x7fa00000, 0x7fbfffff, 0x7fc00000,
                 0x7fc00001, 0x7fffffff,
                 # bfloat16: the largest finite, its overflow threshold and neighbours
                 0x7f7f0000, 0x7f7f7fff, 0x7f7f8000, 0x7f7f8001,
                 # float16: 65504, 65520 (the threshold) and neighbours, 2^-14, 2^-24
                 0x477fe000, 0x477fefff, 0x477ff000, 0x477ff001, 0x47800000,
                 0x38800000, 0x387fffff, 0x33800000, 0x33000000, 0x33000001, 0x32ffffff,
                 0x33c00000])
    if fmt == "bf16":
        # every bfloat16 (high half) with the low halves around a tie
        high = EVERY_PATTERN.astype(np.uint32) << 16
        grid = np.concatenate([high | low for low in (0x0000, 0x7fff, 0x8000, 0x8001,
                                                      0xffff)]).view(np.float32)
    else:
        # every finite float16 k and the midpoint between k and k + 1 (exact in float32)
        finite = np.arange(0x7c00, dtype=np.uint16)
        low = finite.view(np.float16).astype(np.float64)
        high = np.append(low[1:], 65536.0)   # past 65504 the next step would be 65536
        middle = ((low + high) / 2).astype(np.float32)
        grid = np.concatenate([low.astype(np.float32), middle,
                               np.nextafter(middle, np.float32(0)),
                               np.nextafter(middle, np.float32(np.inf))])
    return with_negatives(np.concatenate([named, grid]))


@functools.lru_cache(maxsize=None)
def random_values():
    """Random float32 bit patterns, uniform, and 1M with exponents around the half
    formats' ranges (float16's is 2^-25 .. 2^16, a sixth of the uniform patterns)."""
    rng = np.random.default_rng(20251208)
    uniform = rng.integers(0, 1 << 32, 4_000_000, dtype=np.uint32)
    exponents = rng.integers(98, 146, 1_000_000, dtype=np.uint32)
    near = ((rng.integers(0, 2, exponents.size, dtype=np.uint32) << 31) | (exponents << 23)
            | rng.integers(0, 1 << 23, exponents.size, dtype=np.uint32))
    return np.concatenate([uniform, near]).view(np.float32)


@functools.lru_cache(maxsize=None)
def expected_narrow_cached(fmt, which):
    values = special_values(fmt) if which == "special" else random_values()
    return expected_narrow(fmt, values)


def assert_bits_equal(got, want, inputs, what):
    bad = np.flatnonzero(got != want)
    shown = [f"input 0x{int(inputs.view(np.uint32 if inputs.itemsize == 4 else np.uint16)[i]):x}"
             f": got 0x{int(got[i]):x}, want 0x{int(want[i]):x}" for i in bad[:5]]
    assert bad.size == 0, f"{what}: {bad.size} values differ, e.g. " + "; ".join(shown)


# ----------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------
def test_flags_select_the_expected_path(harness):
    """-mf16c brings F16C, -mavx512bf16 the bfloat16 instructions, AVX-512F the 512-bit
    float16 ones: otherwise the hardware paths below would go untested."""
    assert harness.paths() == harness.isa_path.expected_paths()
    assert harness.vector_width == (16 if "-mavx512f" in harness.isa_path.flags
                                    else 8 if "-mavx2" in harness.isa_path.flags else 4)


@pytest.mark.parametrize("form", ["scalar", "vector"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_widen_every_pattern(harness, fmt, form):
    got = harness.widen(fmt, form, EVERY_PATTERN).view(np.uint32)
    assert_bits_equal(got, expected_widen(fmt, EVERY_PATTERN), EVERY_PATTERN,
                      f"{fmt} widening ({form})")


@pytest.mark.parametrize("which", ["special", "random"])
@pytest.mark.parametrize("form", ["scalar", "vector", "each"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_narrow(harness, fmt, form, which):
    values = special_values(fmt) if which == "special" else random_values()
    got = harness.narrow(fmt, form, values)
    assert_bits_equal(got, expected_narrow_cached(fmt, which), values,
                      f"{fmt} narrowing of {which} values ({form})")


@pytest.mark.parametrize("fmt", FORMATS)
def test_narrowed_nans_are_quiet_nans_of_the_same_sign(harness, fmt):
    bits = np.array([0x7f800001, 0x7fa00000, 0x7fbfffff, 0x7fc00000, 0x7fffffff],
                    dtype=np.uint32)
    values = with_negatives(bits.view(np.float32))
    got = harness.narrow(fmt, "vector", values)
    quiet = 0x0040 if fmt == "bf16" else 0x0200
    as_float = got.view(np.float16) if fmt == "f16" else got.view(bfloat16())
    assert np.isnan(as_float.astype(np.float32)).all()
    assert ((got & quiet) != 0).all()
    np.testing.assert_array_equal(got >> 15, values.view(np.uint32) >> 31)


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_in_registers_keeps_every_pattern(harness, fmt):
    """load then store: every pattern comes back, a NaN made quiet."""
    got = harness.call(f"{fmt}_roundtrip", EVERY_PATTERN, np.empty_like(EVERY_PATTERN))
    quiet, exponent = (0x0040, 0x7f80) if fmt == "bf16" else (0x0200, 0x7c00)
    is_nan = ((EVERY_PATTERN & exponent) == exponent) & ((EVERY_PATTERN & (exponent ^ 0x7fff)) != 0)
    assert_bits_equal(got, np.where(is_nan, EVERY_PATTERN | quiet, EVERY_PATTERN),
                      EVERY_PATTERN, f"{fmt} roundtrip")


CANARY_F32 = np.float32(-1234.5)
CANARY_HALF = np.uint16(0x5a5a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tails_and_unaligned_spans(harness, fmt):
    """Lengths 0..33 at offsets 0 and 1 element: the whole vectors, the pair of vectors
    and the partial last vector give the scalar bits, and nothing past the span is
    written."""
    rng = np.random.default_rng(7)
    pool_halves = EVERY_PATTERN[rng.permutation(EVERY_PATTERN.size)]
    pool_values = np.concatenate([special_values(fmt), random_values()[:10_000]])
    pool_values = pool_values[rng.permutation(pool_values.size)]
    guard = 40
    for n in range(34):
        for offset in (0, 1):
            halves = pool_halves[n * 64:n * 64 + n].copy()
            values = pool_values[n * 64:n * 64 + n].copy()
            cases = [("widen_vector", halves, CANARY_F32, expected_widen(fmt, halves),
                      np.uint32),
                     ("narrow_vector", values, CANARY_HALF, expected_narrow(fmt, values),
                      np.uint16),
                     ("narrow_each", values, CANARY_HALF, expected_narrow(fmt, values),
                      np.uint16)]
            is_nan = np.isnan(expected_widen(fmt, halves).view(np.float32))
            quiet = 0x0040 if fmt == "bf16" else 0x0200
            cases.append(("roundtrip", halves, CANARY_HALF,
                          np.where(is_nan, halves | quiet, halves), np.uint16))
            for form, src, canary, want, view in cases:
                out = np.full(offset + n + guard, canary)
                span = out[offset:offset + n]
                harness.call(f"{fmt}_{form}", src, span)
                what = f"{fmt}_{form}, n={n}, offset={offset}"
                assert_bits_equal(span.view(view), want, src, what)
                assert (out[:offset] == canary).all(), f"{what} wrote before the span"
                assert (out[offset + n:] == canary).all(), f"{what} wrote past the span"


MXCSR_DEFAULT, MXCSR_DAZ, MXCSR_FTZ = 0x1f80, 0x0040, 0x8000
MXCSR_ROUNDING = {"down": 0x2000, "up": 0x4000, "toward zero": 0x6000}


@pytest.mark.skipif(not ON_X86, reason="the MXCSR is x86's floating-point control")
@pytest.mark.parametrize("setting", ["flush", "down", "up", "toward zero"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_floating_point_environment_does_not_matter(harness, fmt, setting):
    """Flush-to-zero, denormals-are-zero (torch.set_flush_denormal sets both) and the
    rounding mode change nothing: F16C and vcvtneps2bf16 round by their own rule, and
    the portable forms' only float arithmetic is exact."""
    csr = MXCSR_DEFAULT | (MXCSR_DAZ | MXCSR_FTZ if setting == "flush"
                           else MXCSR_ROUNDING[setting])
    values = special_values(fmt)
    got = harness.call(f"{fmt}_narrow_vector_under", values, np.empty(values.size, np.uint16),
                       ctypes.c_uint(csr))
    assert_bits_equal(got, expected_narrow_cached(fmt, "special"), values,
                      f"{fmt} narrowing under MXCSR 0x{csr:x}")
    got = harness.call(f"{fmt}_widen_vector_under", EVERY_PATTERN,
                       np.empty(EVERY_PATTERN.size, np.float32), ctypes.c_uint(csr))
    assert_bits_equal(got.view(np.uint32), expected_widen(fmt, EVERY_PATTERN), EVERY_PATTERN,
                      f"{fmt} widening under MXCSR 0x{csr:x}")


def test_compiles_for_aarch64(tmp_path):
    """Every intrinsic sits behind an x86 guard: the header builds for Arm (where the
    portable forms run) with warnings as errors."""
    compiler = shutil.which("aarch64-linux-gnu-gcc")
    if compiler is None:
        pytest.skip("no aarch64-linux-gnu-gcc (Debian: apt-get install gcc-aarch64-linux-gnu)")
    compile_harness([compiler], [], str(tmp_path), "half_aarch64.o", extra=("-c",))
