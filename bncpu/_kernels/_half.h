/* Half precision for the kernels: bfloat16 and float16 data, float32 arithmetic.
 *
 * The kernels keep computing in float32; a half-precision array is widened to float32
 * as it is loaded into registers and narrowed as a float32 result is stored, never
 * copied to a float32 array. This header gives those loads and stores, one value at a
 * time (the scalar forms: the definition) and one vector at a time (the vector forms,
 * for the vector width of the build: BNCPU_HALF_VW floats, as in _float32_sums.h and
 * _elementwise.h, so their vectors are the same types).
 *
 * The bits (a value is a uint16_t holding the format's bits):
 *   bfloat16: sign 1, exponent 8 (bias 127), fraction 7 bits: the high half of a float32.
 *   float16:  sign 1, exponent 5 (bias 15), fraction 10 bits (IEEE 754 binary16).
 *
 * The rules, the same in every form:
 *   widening is exact (every bfloat16 and float16 value is a float32 value), except that
 *     a float16 signaling NaN becomes quiet (sign and payload kept), as F16C does; a
 *     bfloat16 widens by a shift, so its NaNs keep every bit;
 *   narrowing rounds to nearest, ties to even; it gives ±inf from the overflow threshold
 *     up (the largest finite value plus half an ulp: 65520 for float16, 2^128·(1 - 2^-9)
 *     for bfloat16); results in either format's subnormal range are rounded like any
 *     other (no flush to zero); a NaN stays a NaN of the same sign, made quiet, with the high bits
 *     of its payload (the bits vcvtps2ph and vcvtneps2bf16 give).
 * Nothing here reads the floating-point environment: the results do not depend on the
 * rounding mode or on flush-to-zero / denormals-are-zero.
 *
 * Every vector form gives the bits of the scalar form, lane by lane, whichever path the
 * build compiles, so half-precision results do not depend on the ISA build:
 *   bfloat16, portable (SSE2, off x86, AVX2): integer arithmetic on the float32 bits;
 *   bfloat16, with AVX512BF16 (-mavx512bf16): vcvtneps2bf16 / vcvtne2ps2bf16 to narrow.
 *     That instruction flushes float32 subnormal inputs to zero, so a vector holding one
 *     takes the integer path instead (rare: a float32 subnormal is below 1.2e-38);
 *   float16, portable (SSE2, off x86, and AVX2 without -mf16c): integer arithmetic;
 *   float16, with F16C (-mf16c) or AVX-512F: vcvtph2ps / vcvtps2ph, rounding to nearest
 *     even by their immediate (not the MXCSR). AVX512-FP16's vcvtps2phx gives the same
 *     bits and is not needed: AVX-512F already converts 16 values at a time.
 * BNCPU_HALF_BF16_PATH and BNCPU_HALF_F16_PATH name the path compiled.
 */
#ifndef BNCPU_HALF_H
#define BNCPU_HALF_H

#include <stdint.h>
#include <string.h>

/* include/bncpu.h may define the same types under the same guard. */
#ifndef BNCPU_HALF_TYPES_DEFINED
#define BNCPU_HALF_TYPES_DEFINED
typedef uint16_t bncpu_bf16;
typedef uint16_t bncpu_f16;
#endif

#if defined(__AVX512F__)
#define BNCPU_HALF_VW 16
#elif defined(__AVX__)
#define BNCPU_HALF_VW 8
#else
#define BNCPU_HALF_VW 4
#endif

#if defined(__x86_64__) || defined(__i386__)
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define BNCPU_HALF_BF16_AVX512 1
#endif
#if defined(__AVX512F__)
#define BNCPU_HALF_F16_AVX512 1
#elif defined(__F16C__) && BNCPU_HALF_VW == 8
#define BNCPU_HALF_F16_F16C 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define BNCPU_HALF_MASKED_AVX512 1
#endif
#endif

#if defined(BNCPU_HALF_BF16_AVX512) || defined(BNCPU_HALF_F16_AVX512) \
    || defined(BNCPU_HALF_F16_F16C) || defined(BNCPU_HALF_MASKED_AVX512)
#include <immintrin.h>
#endif

#if defined(BNCPU_HALF_BF16_AVX512)
#define BNCPU_HALF_BF16_PATH "avx512bf16"
#else
#define BNCPU_HALF_BF16_PATH "portable"
#endif
#if defined(BNCPU_HALF_F16_AVX512)
#define BNCPU_HALF_F16_PATH "avx512f"
#elif defined(BNCPU_HALF_F16_F16C)
#define BNCPU_HALF_F16_PATH "f16c"
#else
#define BNCPU_HALF_F16_PATH "portable"
#endif

typedef float bncpu_half_vf __attribute__((vector_size(BNCPU_HALF_VW * 4)));
typedef uint32_t bncpu_half_vu32 __attribute__((vector_size(BNCPU_HALF_VW * 4)));
typedef int32_t bncpu_half_vi32 __attribute__((vector_size(BNCPU_HALF_VW * 4)));
typedef uint16_t bncpu_half_vu16 __attribute__((vector_size(BNCPU_HALF_VW * 2)));

/* ---- the scalar forms: the definition of every conversion ---- */

static inline uint32_t bncpu_half_f32_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float bncpu_half_f32_from_bits(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float bncpu_bf16_to_f32(bncpu_bf16 h)
{
    return bncpu_half_f32_from_bits((uint32_t)h << 16);
}

/* Adding 0x7fff plus the lowest kept bit rounds the dropped 16 bits to nearest even,
 * with a carry into the exponent where the fraction overflows (up to inf). */
static inline bncpu_bf16 bncpu_f32_to_bf16(float value)
{
    uint32_t bits = bncpu_half_f32_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (bncpu_bf16)((bits >> 16) | 0x0040u);
    return (bncpu_bf16)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float bncpu_f16_to_f32(bncpu_f16 h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t magnitude = h & 0x7fffu;
    if (magnitude >= 0x7c00u)
        return bncpu_half_f32_from_bits(sign | 0x7f800000u | (magnitude << 13)
                                        | (magnitude > 0x7c00u ? 0x00400000u : 0u));
    if (magnitude >= 0x0400u)   /* normal: the exponent's bias goes from 15 to 127 */
        return bncpu_half_f32_from_bits(sign | ((magnitude << 13) + ((127u - 15u) << 23)));
    /* zero or subnormal: magnitude·2^-24, a float32 product that is exact */
    return bncpu_half_f32_from_bits(sign | bncpu_half_f32_bits((float)magnitude * 0x1p-24f));
}

/* The float16 bits of |value| (bits & 0x7fffffff = a) below 2^-14: a subnormal or zero,
 * round(m·2^(e - 126)) in units of 2^-24 for the float32 exponent e and significand m;
 * a shift of 25 or more leaves less than half a unit, so zero. */
static inline uint32_t bncpu_half_f16_small(uint32_t a)
{
    uint32_t exponent = a >> 23;
    uint32_t significand = (a & 0x007fffffu) | (exponent != 0 ? 0x00800000u : 0u);
    uint32_t shift = 126u - exponent;
    if (shift > 24u)
        return 0u;
    return (significand + (1u << (shift - 1u)) - 1u + ((significand >> shift) & 1u)) >> shift;
}

static inline bncpu_f16 bncpu_f32_to_f16(float value)
{
    uint32_t bits = bncpu_half_f32_bits(value);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t a = bits & 0x7fffffffu;
    uint32_t h;
    if (a > 0x7f800000u)
        h = 0x7e00u | ((a >> 13) & 0x03ffu);
    else if (a >= 0x477ff000u)   /* from 65520 = 65504 + half an ulp (inf included) */
        h = 0x7c00u;
    else if (a >= 0x38800000u)   /* 2^-14 and up: a normal float16 */
        h = (a - ((127u - 15u) << 23) + 0x0fffu + ((a >> 13) & 1u)) >> 13;
    else
        h = bncpu_half_f16_small(a);
    return (bncpu_f16)(sign | h);
}

/* ---- the portable vector forms: the scalar forms, lane by lane, without branches ---- */

/* mask ? a : b, for a lane mask of all ones or zeros (a comparison's result). */
static inline bncpu_half_vu32 bncpu_half_select(bncpu_half_vi32 mask, bncpu_half_vu32 a,
                                                bncpu_half_vu32 b)
{
    return ((bncpu_half_vu32)mask & a) | (~(bncpu_half_vu32)mask & b);
}

static inline bncpu_half_vu32 bncpu_half_splat(uint32_t value)
{
    return (bncpu_half_vu32){0} + value;
}

/* Comparisons are made on magnitudes (below 2^31) as signed lanes: SSE2 and AVX2 have
 * signed 32-bit compares only. */
static inline bncpu_half_vu16 bncpu_half_bf16_bits_portable(bncpu_half_vf v)
{
    bncpu_half_vu32 bits = (bncpu_half_vu32)v;
    bncpu_half_vi32 magnitude = (bncpu_half_vi32)(bits & 0x7fffffffu);
    bncpu_half_vu32 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    bncpu_half_vu32 nan = (bits >> 16) | 0x0040u;
    return __builtin_convertvector(bncpu_half_select(magnitude > 0x7f800000, nan, rounded),
                                   bncpu_half_vu16);
}

/* Whether any lane of a comparison's mask is set. */
static inline int bncpu_half_any(bncpu_half_vi32 mask)
{
    int32_t lanes[BNCPU_HALF_VW], any = 0;
    int k;
    memcpy(lanes, &mask, sizeof lanes);
    for (k = 0; k < BNCPU_HALF_VW; k++)
        any |= lanes[k];
    return any != 0;
}

/* The float16 bits of lanes below 2^-14, as bncpu_half_f16_small, with the shift
 * clamped to 14..25 so that every lane shifts by a defined amount (the other lanes'
 * results are discarded; 25 still leaves zero). */
static inline bncpu_half_vu32 bncpu_half_f16_small_lanes(bncpu_half_vu32 a)
{
    bncpu_half_vi32 exponent = (bncpu_half_vi32)a >> 23;
    bncpu_half_vi32 signed_shift = 126 - exponent;
    bncpu_half_vu32 significand = (a & 0x007fffffu)
                                  | ((bncpu_half_vu32)(exponent != 0) & 0x00800000u);
    bncpu_half_vu32 shift;
    signed_shift = (bncpu_half_vi32)bncpu_half_select(signed_shift > 25, bncpu_half_splat(25),
                                                      (bncpu_half_vu32)signed_shift);
    shift = bncpu_half_select(signed_shift < 14, bncpu_half_splat(14),
                              (bncpu_half_vu32)signed_shift);
    return (significand + (1u << (shift - 1u)) - 1u + ((significand >> shift) & 1u)) >> shift;
}

/* Values below 2^-14 are rare in a normalization's output (about 1 in 10^4 of a unit
 * normal), and their variable shifts cost more than the rest (SSE2 has none), so a
 * vector computes them only when it holds one. */
static inline bncpu_half_vu16 bncpu_half_f16_bits_portable(bncpu_half_vf v)
{
    bncpu_half_vu32 bits = (bncpu_half_vu32)v;
    bncpu_half_vu32 a = bits & 0x7fffffffu;
    bncpu_half_vi32 magnitude = (bncpu_half_vi32)a;
    bncpu_half_vi32 small = magnitude < 0x38800000;
    bncpu_half_vu32 h = (a - ((127u - 15u) << 23) + 0x0fffu + ((a >> 13) & 1u)) >> 13;
    if (bncpu_half_any(small))
        h = bncpu_half_select(small, bncpu_half_f16_small_lanes(a), h);
    h = bncpu_half_select(magnitude >= 0x477ff000, bncpu_half_splat(0x7c00u), h);
    h = bncpu_half_select(magnitude > 0x7f800000, 0x7e00u | ((a >> 13) & 0x03ffu), h);
    return __builtin_convertvector(((bits >> 16) & 0x8000u) | h, bncpu_half_vu16);
}

static inline bncpu_half_vf bncpu_half_from_bf16_bits_portable(bncpu_half_vu16 h)
{
    return (bncpu_half_vf)(__builtin_convertvector(h, bncpu_half_vu32) << 16);
}

static inline bncpu_half_vf bncpu_half_from_f16_bits_portable(bncpu_half_vu16 h)
{
    bncpu_half_vu32 wide = __builtin_convertvector(h, bncpu_half_vu32);
    bncpu_half_vu32 sign = (wide & 0x8000u) << 16;
    bncpu_half_vu32 magnitude = wide & 0x7fffu;
    bncpu_half_vi32 m = (bncpu_half_vi32)magnitude;
    bncpu_half_vu32 special = 0x7f800000u | (magnitude << 13)
                              | ((bncpu_half_vu32)(m > 0x7c00) & 0x00400000u);
    bncpu_half_vu32 normal = (magnitude << 13) + ((127u - 15u) << 23);
    bncpu_half_vu32 small = (bncpu_half_vu32)(__builtin_convertvector(m, bncpu_half_vf)
                                              * 0x1p-24f);
    bncpu_half_vu32 bits = bncpu_half_select(m < 0x0400, small, normal);
    return (bncpu_half_vf)(sign | bncpu_half_select(m >= 0x7c00, special, bits));
}

/* ---- one vector of lanes, by the build's path ---- */

static inline bncpu_half_vf bncpu_half_from_bf16_bits(bncpu_half_vu16 h)
{
    return bncpu_half_from_bf16_bits_portable(h);
}

#if defined(BNCPU_HALF_BF16_AVX512)
/* Lanes holding a float32 subnormal (zero exponent, nonzero fraction), which the
 * instruction would flush. */
static inline __mmask16 bncpu_half_f32_subnormals(bncpu_half_vf v)
{
    __m512i bits = _mm512_castps_si512((__m512)v);
    __mmask16 zero_exponent = _mm512_testn_epi32_mask(bits, _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_test_epi32_mask(zero_exponent, bits, _mm512_set1_epi32(0x007fffff));
}
#endif

static inline bncpu_half_vu16 bncpu_half_bf16_bits(bncpu_half_vf v)
{
#if defined(BNCPU_HALF_BF16_AVX512)
    if (__builtin_expect(bncpu_half_f32_subnormals(v) == 0, 1))
        return (bncpu_half_vu16)_mm512_cvtneps_pbh((__m512)v);
#endif
    return bncpu_half_bf16_bits_portable(v);
}

static inline bncpu_half_vf bncpu_half_from_f16_bits(bncpu_half_vu16 h)
{
#if defined(BNCPU_HALF_F16_AVX512)
    return (bncpu_half_vf)_mm512_cvtph_ps((__m256i)h);
#elif defined(BNCPU_HALF_F16_F16C)
    return (bncpu_half_vf)_mm256_cvtph_ps((__m128i)h);
#else
    return bncpu_half_from_f16_bits_portable(h);
#endif
}

static inline bncpu_half_vu16 bncpu_half_f16_bits(bncpu_half_vf v)
{
#if defined(BNCPU_HALF_F16_AVX512)
    return (bncpu_half_vu16)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT
                                                         | _MM_FROUND_NO_EXC);
#elif defined(BNCPU_HALF_F16_F16C)
    return (bncpu_half_vu16)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT
                                                         | _MM_FROUND_NO_EXC);
#else
    return bncpu_half_f16_bits_portable(v);
#endif
}

/* The first n (0..BNCPU_HALF_VW) 16-bit lanes at p; the others are zero. */
static inline bncpu_half_vu16 bncpu_half_load_lanes_n(const uint16_t* p, int n)
{
#if defined(BNCPU_HALF_MASKED_AVX512)
    return (bncpu_half_vu16)_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p);
#else
    bncpu_half_vu16 lanes = {0};
    memcpy(&lanes, p, (size_t)n * sizeof *p);
    return lanes;
#endif
}

static inline void bncpu_half_store_lanes_n(uint16_t* p, bncpu_half_vu16 lanes, int n)
{
#if defined(BNCPU_HALF_MASKED_AVX512)
    _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1u), (__m256i)lanes);
#else
    memcpy(p, &lanes, (size_t)n * sizeof *p);
#endif
}

static inline bncpu_half_vf bncpu_half_load_f32(const float* p)
{
    bncpu_half_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline bncpu_half_vf bncpu_half_load_f32_n(const float* p, int n)
{
    bncpu_half_vf v = {0};
    memcpy(&v, p, (size_t)n * sizeof *p);
    return v;
}

static inline void bncpu_half_store_f32(float* p, bncpu_half_vf v)
{
    memcpy(p, &v, sizeof v);
}

static inline void bncpu_half_store_f32_n(float* p, bncpu_half_vf v, int n)
{
    memcpy(p, &v, (size_t)n * sizeof *p);
}

/* Two vectors narrowed at once: vcvtne2ps2bf16 narrows 32 values in one instruction. */
static inline void bncpu_half_bf16_bits2(bncpu_half_vf lo, bncpu_half_vf hi,
                                         bncpu_half_vu16* out)
{
#if defined(BNCPU_HALF_BF16_AVX512)
    if (__builtin_expect((bncpu_half_f32_subnormals(lo) | bncpu_half_f32_subnormals(hi)) == 0,
                         1)) {
        __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);
        memcpy(out, &both, sizeof both);
        return;
    }
#endif
    out[0] = bncpu_half_bf16_bits(lo);
    out[1] = bncpu_half_bf16_bits(hi);
}

static inline void bncpu_half_f16_bits2(bncpu_half_vf lo, bncpu_half_vf hi,
                                        bncpu_half_vu16* out)
{
    out[0] = bncpu_half_f16_bits(lo);
    out[1] = bncpu_half_f16_bits(hi);
}

/* ---- the vector forms for the kernels, for each format F (bf16, f16) ----
 *   bncpu_F_load(p)           BNCPU_HALF_VW values at p, widened
 *   bncpu_F_load_n(p, n)      the first n (0..BNCPU_HALF_VW) values, widened; other lanes 0
 *   bncpu_F_store(p, v)       v narrowed to BNCPU_HALF_VW values at p
 *   bncpu_F_store_n(p, v, n)  the first n lanes of v narrowed to p
 *   bncpu_F_store2(p, lo, hi) 2·BNCPU_HALF_VW values: lo then hi
 *   bncpu_F_widen(src, dst, n), bncpu_F_narrow(src, dst, n): whole spans
 * p needs no alignment beyond the element's. */
#define BNCPU_HALF_DEFINE_FORMS(F)                                                          \
static inline bncpu_half_vf bncpu_##F##_load(const bncpu_##F* p)                           \
{                                                                                           \
    bncpu_half_vu16 lanes;                                                                  \
    memcpy(&lanes, p, sizeof lanes);                                                        \
    return bncpu_half_from_##F##_bits(lanes);                                               \
}                                                                                           \
                                                                                            \
static inline bncpu_half_vf bncpu_##F##_load_n(const bncpu_##F* p, int n)                  \
{                                                                                           \
    return bncpu_half_from_##F##_bits(bncpu_half_load_lanes_n(p, n));                       \
}                                                                                           \
                                                                                            \
static inline void bncpu_##F##_store(bncpu_##F* p, bncpu_half_vf v)                        \
{                                                                                           \
    bncpu_half_vu16 lanes = bncpu_half_##F##_bits(v);                                       \
    memcpy(p, &lanes, sizeof lanes);                                                        \
}                                                                                           \
                                                                                            \
static inline void bncpu_##F##_store_n(bncpu_##F* p, bncpu_half_vf v, int n)               \
{                                                                                           \
    bncpu_half_store_lanes_n(p, bncpu_half_##F##_bits(v), n);                               \
}                                                                                           \
                                                                                            \
static inline void bncpu_##F##_store2(bncpu_##F* p, bncpu_half_vf lo, bncpu_half_vf hi)    \
{                                                                                           \
    bncpu_half_vu16 lanes[2];                                                               \
    bncpu_half_##F##_bits2(lo, hi, lanes);                                                  \
    memcpy(p, lanes, sizeof lanes);                                                         \
}                                                                                           \
                                                                                            \
static inline void bncpu_##F##_widen(const bncpu_##F* src, float* dst, int64_t n)          \
{                                                                                           \
    int64_t i = 0;                                                                          \
    for (; i + BNCPU_HALF_VW <= n; i += BNCPU_HALF_VW)                                      \
        bncpu_half_store_f32(dst + i, bncpu_##F##_load(src + i));                           \
    if (i < n)                                                                              \
        bncpu_half_store_f32_n(dst + i, bncpu_##F##_load_n(src + i, (int)(n - i)),          \
                               (int)(n - i));                                               \
}                                                                                           \
                                                                                            \
static inline void bncpu_##F##_narrow(const float* src, bncpu_##F* dst, int64_t n)         \
{                                                                                           \
    int64_t i = 0;                                                                          \
    for (; i + 2 * BNCPU_HALF_VW <= n; i += 2 * BNCPU_HALF_VW)                              \
        bncpu_##F##_store2(dst + i, bncpu_half_load_f32(src + i),                           \
                           bncpu_half_load_f32(src + i + BNCPU_HALF_VW));                   \
    for (; i + BNCPU_HALF_VW <= n; i += BNCPU_HALF_VW)                                      \
        bncpu_##F##_store(dst + i, bncpu_half_load_f32(src + i));                           \
    if (i < n)                                                                              \
        bncpu_##F##_store_n(dst + i, bncpu_half_load_f32_n(src + i, (int)(n - i)),          \
                            (int)(n - i));                                                  \
}

BNCPU_HALF_DEFINE_FORMS(bf16)
BNCPU_HALF_DEFINE_FORMS(f16)

#undef BNCPU_HALF_DEFINE_FORMS

#endif /* BNCPU_HALF_H */
