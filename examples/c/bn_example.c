/*
 * bn_example.c: bncpu's kernels called from a standalone C program.
 *
 * Build, in examples/c/ with bncpu installed in the python3 on PATH (README.md there
 * explains each flag):
 *   cc -O2 -pthread bn_example.c -o bn_example \
 *      -I"$(python3 -c 'import bncpu; print(bncpu.get_include())')" \
 *      $(python3-config --includes) $(python3-config --embed --ldflags)
 * Run:
 *   BNCPU_PYTHON="$(python3 -c 'import sys; print(sys.executable)')" ./bn_example
 *
 * Usage: bn_example [--full] [--bench]
 * It fills its own buffers, runs every batch-norm kernel (training and inference
 * forward, backward in both modes, the split-phase steps) and the layer/group/RMS-norm
 * kernels in float and double, calls kernels with bad arguments, and runs several
 * threads at once. Output: one JSON object per line, read by tests/test_c_api.py.
 * Arrays are printed as their sum, or in full with --full. --bench adds the cost of
 * bncpu_import() and of one call on a tiny input. Exit status 0 when every check passed.
 */
#include "bncpu.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int full_output = 0;  /* --full: whole arrays rather than sums */
static int failures = 0;     /* checks that did not pass */

/* ---- data: a fixed pseudo-random sequence (xorshift64*), the same on every run ---- */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static double next_uniform(void)  /* in [-1, 1) */
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) * 0x1.0p-52 - 1.0;
}

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- JSON lines: begin_record, then fields, then end_record ---- */
static void begin_record(const char *name, const char *dtype)
{
    printf("{\"case\": \"%s\", \"dtype\": \"%s\"", name, dtype);
}

static void emit_int(const char *name, int64_t value)
{
    printf(", \"%s\": %lld", name, (long long)value);
}

static void emit_number(const char *name, double value)
{
    printf(", \"%s\": %.17g", name, value);
}

/* An array of count floats (elsize 4) or doubles (elsize 8): in full or as its sum.
 * %.17g prints every float and double exactly, so the tests can compare bit for bit. */
static void emit_array(const char *name, const void *values, int64_t count, size_t elsize)
{
    double sum = 0;
    int64_t i;
    printf(", \"%s\": %s", name, full_output ? "[" : "");
    for (i = 0; i < count; i++) {
        double v = elsize == sizeof(float) ? (double)((const float *)values)[i]
                                           : ((const double *)values)[i];
        if (full_output)
            printf(i ? ", %.17g" : "%.17g", v);
        sum += v;
    }
    if (full_output)
        printf("]");
    else
        printf("%.17g", sum);
}

static void end_record(void)
{
    printf("}\n");
    fflush(stdout);
}

static int check_ok(int status, const char *call)
{
    if (status != BNCPU_OK) {
        fprintf(stderr, "%s failed: %s\n", call, bncpu_strerror(status));
        failures++;
    }
    return status == BNCPU_OK;
}
#define CHECK_OK(call) check_ok((call), #call)

/* ---- every kernel, once per element type ----
 * The float and double kernels take different pointer types, so each case is written
 * once as a macro over the element type T and the suffix of the kernel names. */
#define FILL(array, count, offset, scale) \
    for (int64_t k_ = 0; k_ < (count); k_++) (array)[k_] = (offset) + (scale) * next_uniform()

/* Batch norm on (n, c, s): every entry of the table, inputs and outputs printed. */
#define DEFINE_BATCH_NORM_CASE(T, SFX, DTYPE)                                                  \
static void batch_norm_case_##SFX(int64_t n, int64_t c, int64_t s)                             \
{                                                                                              \
    const int64_t size = n * c * s, count = n * s;                                             \
    const double momentum = 0.1, eps = 1e-5;                                                   \
    T *x = malloc(size * sizeof(T)), *dy = malloc(size * sizeof(T));                           \
    T *y = malloc(size * sizeof(T)), *dx = malloc(size * sizeof(T));                           \
    T *weight = malloc(c * sizeof(T)), *bias = malloc(c * sizeof(T));                          \
    T *running_mean = malloc(c * sizeof(T)), *running_var = malloc(c * sizeof(T));             \
    T *save_mean = malloc(c * sizeof(T)), *save_invstd = malloc(c * sizeof(T));                \
    T *dweight = malloc(c * sizeof(T)), *dbias = malloc(c * sizeof(T));                        \
    double *mean = malloc(c * sizeof(double)), *m2 = malloc(c * sizeof(double));               \
    double *invstd = malloc(c * sizeof(double)), *sum_dy = malloc(c * sizeof(double));         \
    double *sum_dy_xmu = malloc(c * sizeof(double));                                           \
    double *global_mean = malloc(c * sizeof(double));                                          \
    FILL(x, size, 3.0, 2.0);                                                                   \
    FILL(dy, size, 0.0, 1.0);                                                                  \
    FILL(weight, c, 1.0, 0.5);                                                                 \
    FILL(bias, c, 0.0, 0.5);                                                                   \
    FILL(running_mean, c, 0.0, 0.5);                                                           \
    FILL(running_var, c, 1.5, 0.5);                                                            \
    begin_record("batch_norm", DTYPE);                                                         \
    emit_int("n", n);                                                                          \
    emit_int("c", c);                                                                          \
    emit_int("s", s);                                                                          \
    emit_number("momentum", momentum);                                                         \
    emit_number("eps", eps);                                                                   \
    emit_array("x", x, size, sizeof(T));                                                       \
    emit_array("dy", dy, size, sizeof(T));                                                     \
    emit_array("weight", weight, c, sizeof(T));                                                \
    emit_array("bias", bias, c, sizeof(T));                                                    \
    emit_array("running_mean_in", running_mean, c, sizeof(T));                                 \
    emit_array("running_var_in", running_var, c, sizeof(T));                                   \
    /* Training forward: batch statistics, running statistics updated in place. */            \
    CHECK_OK(bncpu_batch_norm_forward_train_##SFX(x, y, n, c, s, weight, bias, running_mean,  \
        running_var, momentum, eps, save_mean, save_invstd, 1));                               \
    emit_array("train_y", y, size, sizeof(T));                                                 \
    emit_array("train_running_mean", running_mean, c, sizeof(T));                              \
    emit_array("train_running_var", running_var, c, sizeof(T));                                \
    emit_array("train_save_mean", save_mean, c, sizeof(T));                                    \
    emit_array("train_save_invstd", save_invstd, c, sizeof(T));                                \
    /* Inference with the updated running statistics. */                                      \
    CHECK_OK(bncpu_batch_norm_forward_eval_##SFX(x, y, n, c, s, weight, bias, running_mean,   \
        running_var, eps));                                                                    \
    emit_array("eval_y", y, size, sizeof(T));                                                  \
    /* Backward, training mode (the saved batch statistics), then eval mode. */               \
    CHECK_OK(bncpu_batch_norm_backward_##SFX(dy, x, dx, n, c, s, weight, NULL, NULL,           \
        save_mean, save_invstd, 1, eps, dweight, dbias));                                      \
    emit_array("train_dx", dx, size, sizeof(T));                                               \
    emit_array("train_dweight", dweight, c, sizeof(T));                                        \
    emit_array("train_dbias", dbias, c, sizeof(T));                                            \
    CHECK_OK(bncpu_batch_norm_backward_##SFX(dy, x, dx, n, c, s, weight, running_mean,         \
        running_var, NULL, NULL, 0, eps, dweight, dbias));                                     \
    emit_array("eval_dx", dx, size, sizeof(T));                                                \
    emit_array("eval_dweight", dweight, c, sizeof(T));                                         \
    emit_array("eval_dbias", dbias, c, sizeof(T));                                             \
    /* Split phase, one process: statistics, merge (running statistics updated again),        \
     * normalize, backward reduce, backward elementwise. */                                   \
    CHECK_OK(bncpu_batch_norm_stats_##SFX(x, n, c, s, mean, m2));                              \
    emit_array("stats_mean", mean, c, sizeof(double));                                         \
    emit_array("stats_m2", m2, c, sizeof(double));                                             \
    CHECK_OK(bncpu_batch_norm_gather_stats_##SFX(1, c, mean, m2, &count, running_mean,         \
        running_var, momentum, eps, global_mean, invstd, 1));                                  \
    emit_array("gather_mean", global_mean, c, sizeof(double));                                 \
    emit_array("gather_invstd", invstd, c, sizeof(double));                                    \
    emit_array("gather_running_mean", running_mean, c, sizeof(T));                             \
    emit_array("gather_running_var", running_var, c, sizeof(T));                              \
    CHECK_OK(bncpu_batch_norm_elemt_##SFX(x, y, n, c, s, global_mean, invstd, weight, bias));  \
    emit_array("elemt_y", y, size, sizeof(T));                                                 \
    CHECK_OK(bncpu_batch_norm_backward_reduce_##SFX(dy, x, n, c, s, global_mean, sum_dy,       \
        sum_dy_xmu));                                                                          \
    emit_array("reduce_sum_dy", sum_dy, c, sizeof(double));                                    \
    emit_array("reduce_sum_dy_xmu", sum_dy_xmu, c, sizeof(double));                            \
    CHECK_OK(bncpu_batch_norm_backward_elemt_##SFX(dy, x, dx, n, c, s, global_mean, invstd,    \
        weight, sum_dy, sum_dy_xmu, count));                                                   \
    emit_array("elemt_dx", dx, size, sizeof(T));                                               \
    end_record();                                                                              \
    free(x); free(dy); free(y); free(dx); free(weight); free(bias);                            \
    free(running_mean); free(running_var); free(save_mean); free(save_invstd);                 \
    free(dweight); free(dbias); free(mean); free(m2); free(invstd); free(sum_dy);              \
    free(sum_dy_xmu); free(global_mean);                                                       \
}

/* Layer norm on rows of d values (row_norm = layer) or RMS norm (no bias, no mean), and
 * group norm on (n, c, s): forward then backward, or {"available": false} when the
 * loaded package does not provide the kernels yet. */
#define DEFINE_ROW_NORM_CASES(T, SFX, DTYPE)                                                   \
static void row_norm_cases_##SFX(void)                                                         \
{                                                                                              \
    enum { ROWS = 6, D = 7, N = 2, C = 6, S = 5, GROUPS = 3, SIZE = 60 };                      \
    const double eps = 1e-5;                                                                   \
    T x[SIZE], dy[SIZE], y[SIZE], dx[SIZE], weight[C > D ? C : D], bias[C > D ? C : D];        \
    T mean[ROWS > N * GROUPS ? ROWS : N * GROUPS], rstd[ROWS > N * GROUPS ? ROWS : N * GROUPS]; \
    T dweight[C > D ? C : D], dbias[C > D ? C : D];                                            \
    int status;                                                                                \
    FILL(x, SIZE, -1.0, 2.0);                                                                  \
    FILL(dy, SIZE, 0.0, 1.0);                                                                  \
    FILL(weight, (C > D ? C : D), 1.0, 0.5);                                                   \
    FILL(bias, (C > D ? C : D), 0.0, 0.5);                                                     \
    begin_record("layer_norm", DTYPE);                                                         \
    status = bncpu_layer_norm_forward_##SFX(x, y, ROWS, D, weight, bias, eps, mean, rstd);    \
    if (status == BNCPU_ERR_NOT_IMPORTED) {                                                    \
        printf(", \"available\": false");                                                      \
    } else if (check_ok(status, "layer_norm_forward") && CHECK_OK(                             \
            bncpu_layer_norm_backward_##SFX(dy, x, dx, ROWS, D, mean, rstd, weight, dweight,   \
                                            dbias))) {                                         \
        emit_int("rows", ROWS); emit_int("d", D); emit_number("eps", eps);                     \
        emit_array("x", x, ROWS * D, sizeof(T)); emit_array("dy", dy, ROWS * D, sizeof(T));    \
        emit_array("weight", weight, D, sizeof(T)); emit_array("bias", bias, D, sizeof(T));    \
        emit_array("y", y, ROWS * D, sizeof(T)); emit_array("mean", mean, ROWS, sizeof(T));    \
        emit_array("rstd", rstd, ROWS, sizeof(T)); emit_array("dx", dx, ROWS * D, sizeof(T)); \
        emit_array("dweight", dweight, D, sizeof(T)); emit_array("dbias", dbias, D, sizeof(T)); \
    }                                                                                          \
    end_record();                                                                              \
    begin_record("rms_norm", DTYPE);                                                           \
    status = bncpu_rms_norm_forward_##SFX(x, y, ROWS, D, weight, eps, rstd);                   \
    if (status == BNCPU_ERR_NOT_IMPORTED) {                                                    \
        printf(", \"available\": false");                                                      \
    } else if (check_ok(status, "rms_norm_forward") && CHECK_OK(                               \
            bncpu_rms_norm_backward_##SFX(dy, x, dx, ROWS, D, rstd, weight, dweight))) {       \
        emit_int("rows", ROWS); emit_int("d", D); emit_number("eps", eps);                     \
        emit_array("x", x, ROWS * D, sizeof(T)); emit_array("dy", dy, ROWS * D, sizeof(T));    \
        emit_array("weight", weight, D, sizeof(T)); emit_array("y", y, ROWS * D, sizeof(T));   \
        emit_array("rstd", rstd, ROWS, sizeof(T)); emit_array("dx", dx, ROWS * D, sizeof(T)); \
        emit_array("dweight", dweight, D, sizeof(T));                                          \
    }                                                                                          \
    end_record();                                                                              \
    begin_record("group_norm", DTYPE);                                                         \
    status = bncpu_group_norm_forward_##SFX(x, y, N, C, S, GROUPS, weight, bias, eps, mean, rstd); \
    if (status == BNCPU_ERR_NOT_IMPORTED) {                                                    \
        printf(", \"available\": false");                                                      \
    } else if (check_ok(status, "group_norm_forward") && CHECK_OK(                             \
            bncpu_group_norm_backward_##SFX(dy, x, dx, N, C, S, GROUPS, mean, rstd, weight,    \
                                            dweight, dbias))) {                                \
        emit_int("n", N); emit_int("c", C); emit_int("s", S); emit_int("groups", GROUPS);      \
        emit_number("eps", eps);                                                               \
        emit_array("x", x, SIZE, sizeof(T)); emit_array("dy", dy, SIZE, sizeof(T));            \
        emit_array("weight", weight, C, sizeof(T)); emit_array("bias", bias, C, sizeof(T));    \
        emit_array("y", y, SIZE, sizeof(T)); emit_array("mean", mean, N * GROUPS, sizeof(T));  \
        emit_array("rstd", rstd, N * GROUPS, sizeof(T)); emit_array("dx", dx, SIZE, sizeof(T)); \
        emit_array("dweight", dweight, C, sizeof(T)); emit_array("dbias", dbias, C, sizeof(T)); \
    }                                                                                          \
    end_record();                                                                              \
}

DEFINE_BATCH_NORM_CASE(float, f32, "float32")
DEFINE_BATCH_NORM_CASE(double, f64, "float64")
DEFINE_ROW_NORM_CASES(float, f32, "float32")
DEFINE_ROW_NORM_CASES(double, f64, "float64")

/* ---- bad arguments: each call must return its status and write nothing ---- */
static void expect_status(const char *call, int status, int expected, const float *output,
                          int64_t count)
{
    int64_t i;
    int unchanged = 1;
    for (i = 0; i < count; i++)
        unchanged &= output[i] == -7.0f;  /* the sentinel every output starts with */
    printf("{\"case\": \"status\", \"call\": \"%s\", \"status\": %d, \"expected\": %d, "
           "\"unchanged\": %s, \"message\": \"%s\"}\n",
           call, status, expected, unchanged ? "true" : "false", bncpu_strerror(status));
    if (status != expected || !unchanged)
        failures++;
}

static void bad_argument_cases(void)
{
    enum { N = 4, C = 3, S = 5, SIZE = N * C * S };
    float x[SIZE], y[SIZE], weight[C], stats_a[C], stats_b[C];
    double mean[C], m2[C], invstd[C], sum_dy[C], sum_dy_xmu[C], mean_out[C];
    int64_t counts[2] = {5, -1}, one_count = 1;
    int status;
    FILL(x, SIZE, 0.0, 1.0);
    FILL(weight, C, 1.0, 0.5);
    FILL(stats_a, C, 0.0, 0.5);
    FILL(stats_b, C, 1.5, 0.5);
    FILL(mean, C, 0.0, 1.0);
    FILL(m2, C, 2.0, 1.0);
    FILL(invstd, C, 1.0, 0.5);
    FILL(sum_dy, C, 0.0, 1.0);
    FILL(sum_dy_xmu, C, 0.0, 1.0);
#define EXPECT(expected, call)                                                 \
    do {                                                                       \
        for (int64_t k_ = 0; k_ < SIZE; k_++) y[k_] = -7.0f;                   \
        status = (call);                                                       \
        expect_status(#call, status, (expected), y, SIZE);                     \
    } while (0)
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_forward_train_f32(
        NULL, y, N, C, S, NULL, NULL, NULL, NULL, 0.1, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_forward_train_f32(
        x, y, N, C, S, NULL, NULL, stats_a, NULL, 0.1, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_BAD_SIZE, bncpu_batch_norm_forward_train_f32(
        x, y, -1, C, S, NULL, NULL, NULL, NULL, 0.1, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_BAD_SIZE, bncpu_batch_norm_forward_train_f32(
        x, y, INT64_MAX / 2, 3, 5, NULL, NULL, NULL, NULL, 0.1, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_BAD_EPS, bncpu_batch_norm_forward_train_f32(
        x, y, N, C, S, NULL, NULL, NULL, NULL, 0.1, -1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_BAD_EPS, bncpu_batch_norm_forward_eval_f32(
        x, y, N, C, S, NULL, NULL, stats_a, stats_b, NAN));
    EXPECT(BNCPU_ERR_BAD_EPS, bncpu_batch_norm_forward_eval_f32(
        x, y, N, C, S, NULL, NULL, stats_a, stats_b, INFINITY));
    EXPECT(BNCPU_ERR_BAD_MOMENTUM, bncpu_batch_norm_forward_train_f32(
        x, y, N, C, S, NULL, NULL, stats_a, stats_b, 1.5, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_BAD_MOMENTUM, bncpu_batch_norm_forward_train_f32(
        x, y, N, C, S, NULL, NULL, stats_a, stats_b, NAN, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_ONE_VALUE, bncpu_batch_norm_forward_train_f32(
        x, y, 1, C, 1, weight, NULL, NULL, NULL, 0.1, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_ALIASED_STATS, bncpu_batch_norm_forward_train_f32(
        x, y, N, C, S, NULL, NULL, stats_a, stats_a, 0.1, 1e-5, NULL, NULL, 1));
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_forward_eval_f32(
        x, y, N, C, S, NULL, NULL, NULL, stats_b, 1e-5));
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_backward_f32(
        x, x, y, N, C, S, weight, NULL, NULL, NULL, stats_b, 1, 1e-5, NULL, NULL));
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_backward_f32(
        x, x, y, N, C, S, weight, stats_a, NULL, NULL, NULL, 0, 1e-5, NULL, NULL));
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_stats_f32(x, N, C, S, NULL, m2));
    EXPECT(BNCPU_ERR_BAD_SIZE, bncpu_batch_norm_gather_stats_f32(
        2, 1, mean, m2, counts, NULL, NULL, 0.1, 1e-5, mean_out, invstd, 1));
    EXPECT(BNCPU_ERR_ONE_VALUE, bncpu_batch_norm_gather_stats_f32(
        1, C, mean, m2, &one_count, NULL, NULL, 0.1, 1e-5, mean_out, invstd, 1));
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_elemt_f32(x, y, N, C, S, mean, NULL, NULL, NULL));
    EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_batch_norm_backward_reduce_f32(
        x, NULL, N, C, S, mean, sum_dy, sum_dy_xmu));
    EXPECT(BNCPU_ERR_BAD_SIZE, bncpu_batch_norm_backward_elemt_f32(
        x, x, y, N, C, S, mean, invstd, weight, sum_dy, sum_dy_xmu, 0));
    EXPECT(BNCPU_ERR_BAD_SIZE, bncpu_set_num_threads(-1));
    /* The row norms' checks, where the loaded package provides them. */
    if (bncpu_api_table->group_norm_forward_f32 != NULL)
        EXPECT(BNCPU_ERR_BAD_GROUPS, bncpu_group_norm_forward_f32(
            x, y, N, C, S, 2, NULL, NULL, 1e-5, NULL, NULL));
    if (bncpu_api_table->layer_norm_forward_f32 != NULL)
        EXPECT(BNCPU_ERR_BAD_EPS, bncpu_layer_norm_forward_f32(
            x, y, N * C, S, NULL, NULL, -1.0, NULL, NULL));
    if (bncpu_api_table->rms_norm_forward_f32 != NULL)
        EXPECT(BNCPU_ERR_NULL_POINTER, bncpu_rms_norm_forward_f32(
            NULL, y, N * C, S, NULL, 1e-5, NULL));
#undef EXPECT
}

/* ---- several threads at once: each result must equal the serial one bit for bit ---- */
enum { THREADS = 4, ROUNDS = 8, BIG_N = 8, BIG_C = 16, BIG_S = 1024, BIG = BIG_N * BIG_C * BIG_S,
       SMALL_N = 5, SMALL_C = 3, SMALL = SMALL_N * SMALL_C };

typedef struct {
    const float *x, *dy, *expected_y, *expected_dx;  /* shared, read-only */
    const double *small_x, *expected_small_y;
    int index;
    int mismatches;
    int status;
} thread_job;

/* Training forward and backward of a large float input (threads compete for the OpenMP
 * team: the one that gets it runs in parallel, the others alone), plus a tiny double
 * call. Thread 0 also changes the thread count between rounds: results must not move. */
static void *thread_main(void *argument)
{
    thread_job *job = argument;
    float *y = malloc(BIG * sizeof(float)), *dx = malloc(BIG * sizeof(float));
    float save_mean[BIG_C], save_invstd[BIG_C];
    double small_y[SMALL];
    int round;
    int64_t i;
    for (round = 0; round < ROUNDS; round++) {
        if (job->index == 0)
            bncpu_set_num_threads(round % 2 ? 1 : 0);
        job->status |= bncpu_batch_norm_forward_train_f32(job->x, y, BIG_N, BIG_C, BIG_S, NULL,
            NULL, NULL, NULL, 0.1, 1e-5, save_mean, save_invstd, 1);
        job->status |= bncpu_batch_norm_backward_f32(job->dy, job->x, dx, BIG_N, BIG_C, BIG_S,
            NULL, NULL, NULL, save_mean, save_invstd, 1, 1e-5, NULL, NULL);
        job->status |= bncpu_batch_norm_forward_train_f64(job->small_x, small_y, SMALL_N,
            SMALL_C, 1, NULL, NULL, NULL, NULL, 0.1, 1e-5, NULL, NULL, 1);
        for (i = 0; i < BIG; i++)
            job->mismatches += (y[i] != job->expected_y[i]) + (dx[i] != job->expected_dx[i]);
        for (i = 0; i < SMALL; i++)
            job->mismatches += small_y[i] != job->expected_small_y[i];
    }
    free(y);
    free(dx);
    return NULL;
}

static void thread_cases(void)
{
    float *x = malloc(BIG * sizeof(float)), *dy = malloc(BIG * sizeof(float));
    float *expected_y = malloc(BIG * sizeof(float)), *expected_dx = malloc(BIG * sizeof(float));
    float save_mean[BIG_C], save_invstd[BIG_C];
    double small_x[SMALL], expected_small_y[SMALL];
    pthread_t threads[THREADS];
    thread_job jobs[THREADS];
    int t, mismatches = 0, status = 0;
    FILL(x, BIG, 5.0, 3.0);
    FILL(dy, BIG, 0.0, 1.0);
    FILL(small_x, SMALL, -2.0, 1.0);
    /* The serial reference: one thread, nothing else running. */
    bncpu_set_num_threads(1);
    status |= bncpu_batch_norm_forward_train_f32(x, expected_y, BIG_N, BIG_C, BIG_S, NULL, NULL,
        NULL, NULL, 0.1, 1e-5, save_mean, save_invstd, 1);
    status |= bncpu_batch_norm_backward_f32(dy, x, expected_dx, BIG_N, BIG_C, BIG_S, NULL, NULL,
        NULL, save_mean, save_invstd, 1, 1e-5, NULL, NULL);
    status |= bncpu_batch_norm_forward_train_f64(small_x, expected_small_y, SMALL_N, SMALL_C, 1,
        NULL, NULL, NULL, NULL, 0.1, 1e-5, NULL, NULL, 1);
    bncpu_set_num_threads(0);
    for (t = 0; t < THREADS; t++) {
        jobs[t] = (thread_job){x, dy, expected_y, expected_dx, small_x, expected_small_y, t, 0, 0};
        pthread_create(&threads[t], NULL, thread_main, &jobs[t]);
    }
    for (t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
        mismatches += jobs[t].mismatches;
        status |= jobs[t].status;
    }
    bncpu_set_num_threads(0);  /* thread 0 left it at 1 */
    printf("{\"case\": \"threads\", \"threads\": %d, \"rounds\": %d, \"elements\": %d, "
           "\"num_threads\": %d, \"status\": %d, \"mismatches\": %d}\n",
           THREADS, ROUNDS, BIG, bncpu_get_num_threads(), status, mismatches);
    if (status != BNCPU_OK || mismatches != 0)
        failures++;
    free(x);
    free(dy);
    free(expected_y);
    free(expected_dx);
}

/* ---- --bench: nanoseconds per call on a tiny input, through the macro and through
 * the table pointer directly, next to the same arithmetic written inline ---- */
static void bench_case(double import_ms)
{
    enum { CALLS = 200000, N = 2, C = 4 };
    float x[N * C], y[N * C], mean[C] = {0}, var[C] = {1, 1, 1, 1};
    double start, macro_ns, direct_ns, inline_ns;
    int call, status = 0;
    int64_t i;
    FILL(x, N * C, 0.0, 1.0);
    start = now_seconds();
    for (call = 0; call < CALLS; call++)
        status |= bncpu_batch_norm_forward_eval_f32(x, y, N, C, 1, NULL, NULL, mean, var, 1e-5);
    macro_ns = (now_seconds() - start) / CALLS * 1e9;
    start = now_seconds();
    for (call = 0; call < CALLS; call++)
        status |= bncpu_api_table->batch_norm_forward_eval_f32(x, y, N, C, 1, NULL, NULL, mean,
                                                               var, 1e-5);
    direct_ns = (now_seconds() - start) / CALLS * 1e9;
    start = now_seconds();
    for (call = 0; call < CALLS; call++) {
        for (i = 0; i < N * C; i++)
            y[i] = (float)((x[i] - mean[i % C]) / sqrt(var[i % C] + 1e-5));
        __asm__ __volatile__("" : : "r"(y) : "memory");  /* keep the loop from being folded */
    }
    inline_ns = (now_seconds() - start) / CALLS * 1e9;
    printf("{\"case\": \"bench\", \"import_ms\": %.3f, \"elements\": %d, \"macro_ns\": %.1f, "
           "\"direct_ns\": %.1f, \"inline_ns\": %.1f, \"status\": %d}\n",
           import_ms, N * C, macro_ns, direct_ns, inline_ns, status);
}

int main(int argc, char **argv)
{
    int bench = 0, status, i;
    double start, import_ms;
    float x[4] = {1, 2, 3, 4}, y[4];
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--full") == 0) {
            full_output = 1;
        } else if (strcmp(argv[i], "--bench") == 0) {
            bench = 1;
        } else {
            fprintf(stderr, "usage: %s [--full] [--bench]\n", argv[0]);
            return 2;
        }
    }
    /* Before bncpu_import(): statuses and messages work, kernels refuse politely. */
    status = bncpu_batch_norm_forward_train_f32(x, y, 2, 2, 1, NULL, NULL, NULL, NULL, 0.1, 1e-5,
                                                NULL, NULL, 1);
    expect_status("kernel before bncpu_import()", status, BNCPU_ERR_NOT_IMPORTED, NULL, 0);

    start = now_seconds();
    status = bncpu_import();
    import_ms = (now_seconds() - start) * 1e3;
    if (status != BNCPU_OK) {
        fprintf(stderr, "bncpu_import() failed: %s\n", bncpu_import_error());
        return 1;
    }
    printf("{\"case\": \"import\", \"version\": \"%s\", \"header_version\": \"%s\", "
           "\"isa\": \"%s\", \"num_threads\": %d, \"import_ms\": %.3f}\n",
           bncpu_version(), BNCPU_VERSION_STRING, bncpu_isa(), bncpu_get_num_threads(), import_ms);

    batch_norm_case_f32(4, 3, 5);   /* channel by channel */
    batch_norm_case_f64(4, 3, 5);
    batch_norm_case_f32(7, 5, 1);   /* (N, C) input: columns */
    batch_norm_case_f64(7, 5, 1);
    row_norm_cases_f32();
    row_norm_cases_f64();
    bad_argument_cases();
    thread_cases();
    if (bench)
        bench_case(import_ms);

    bncpu_finalize();
    status = bncpu_batch_norm_forward_train_f32(x, y, 2, 2, 1, NULL, NULL, NULL, NULL, 0.1, 1e-5,
                                                NULL, NULL, 1);
    expect_status("kernel after bncpu_finalize()", status, BNCPU_ERR_NOT_IMPORTED, NULL, 0);
    printf("{\"case\": \"summary\", \"failures\": %d}\n", failures);
    return failures == 0 ? 0 : 1;
}
