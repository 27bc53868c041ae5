/*
 * bn_mpi.c: synchronized batch norm over MPI with bncpu's split-phase C API.
 *
 * Each rank holds its shard of one batch (n_r samples of c channels, s values each;
 * shards of unequal size, one of them empty) and normalizes it with the statistics of
 * the whole batch. One training step costs two collectives:
 *
 *   forward   bncpu_batch_norm_stats          local (mean, m2 = Σ(x - mean)², count)
 *             MPI_Allgather                   every rank's [c, count, mean, m2]
 *             bncpu_batch_norm_gather_stats   global mean, invstd; running stats updated
 *             bncpu_batch_norm_elemt          y = (x - mean)·invstd·weight + bias
 *   backward  bncpu_batch_norm_backward_reduce  local sum_dy, sum_dy_xmu
 *             MPI_Allreduce                   their sums over the ranks
 *             bncpu_batch_norm_backward_elemt   dx of the whole batch's loss
 *
 * The gathered partials are merged in rank order, so every rank computes the same
 * statistics bit for bit. The gradients of weight and bias stay local (each rank's
 * share: a data-parallel optimizer sums them with the other parameters' gradients).
 *
 * Build (in examples/c/, bncpu installed in the python3 on PATH; mpicc from
 * `pip install mpich` or any MPI):
 *   mpicc -O2 bn_mpi.c -o bn_mpi \
 *      -I"$(python3 -c 'import bncpu; print(bncpu.get_include())')" \
 *      $(python3-config --includes) $(python3-config --embed --ldflags)
 * Run:
 *   BNCPU_PYTHON="$(python3 -c 'import sys; print(sys.executable)')" mpiexec -n 3 ./bn_mpi
 *
 * Output: rank 0 prints one JSON object per rank (its shard, parameters and results in
 * full, %.17g), read by tests/test_distributed_mpi.py, and its verdict on stderr: it
 * gathers the whole batch, runs the fused batch-norm kernels on it, and checks that y,
 * dx, the running statistics and the summed gradients of weight and bias of the
 * synchronized step agree (to 1e-10 of their scale: the fused kernels sum in another
 * order). Exit status 0 when they do. Any failure aborts every rank (MPI_Abort), so no
 * rank waits forever in a collective for one that gave up.
 */
#include "bncpu.h"

#include <math.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHANNELS 3
#define SPATIAL 4
/* Samples of rank r: SHARD_SIZES[r % 4] (rank 1's shard is empty). */
static const int64_t SHARD_SIZES[4] = {3, 0, 2, 1};

/* A fixed pseudo-random sequence per rank (xorshift64*), values in [-1, 1). */
static uint64_t rng_state;

static double next_uniform(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) * 0x1.0p-52 - 1.0;
}

static void fill(double *values, int64_t count, double offset, double scale)
{
    for (int64_t i = 0; i < count; i++)
        values[i] = offset + scale * next_uniform();
}

static void fail(const char *what, const char *why)
{
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    fprintf(stderr, "rank %d: %s: %s\n", rank, what, why);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static void check(int status, const char *call)
{
    if (status != BNCPU_OK)
        fail(call, bncpu_strerror(status));
}
#define CHECK(call) check((call), #call)

static void *allocate(size_t bytes)
{
    void *memory = malloc(bytes > 0 ? bytes : 1);
    if (memory == NULL)
        fail("malloc", "out of memory");
    return memory;
}

/* ---- one JSON line per rank, built in a growing buffer ---- */
typedef struct { char *text; size_t length, capacity; } line_buffer;

static void append(line_buffer *line, const char *format, ...)
{
    va_list arguments;
    for (;;) {
        size_t room = line->capacity - line->length;
        va_start(arguments, format);
        int written = vsnprintf(line->text + line->length, room, format, arguments);
        va_end(arguments);
        if (written < 0)
            fail("vsnprintf", "formatting failed");
        if ((size_t)written < room) {
            line->length += (size_t)written;
            return;
        }
        line->capacity = 2 * line->capacity + (size_t)written;
        line->text = realloc(line->text, line->capacity);
        if (line->text == NULL)
            fail("realloc", "out of memory");
    }
}

/* max |a - b| <= tolerance * max(1, max |b|) */
static int agrees(const double *a, const double *b, int64_t count, double tolerance)
{
    double error = 0.0, scale = 1.0;
    for (int64_t i = 0; i < count; i++) {
        error = fmax(error, fabs(a[i] - b[i]));
        scale = fmax(scale, fabs(b[i]));
    }
    return error <= tolerance * scale;
}

/* Rank 0: the synchronized step of every rank (gathered in rank order) against the fused
 * kernels on the whole batch; prints the verdict and returns 1 when it passed. */
static int whole_batch_agrees(int size, int64_t c, int64_t s, const int *shard_values,
                              int64_t total_n, const double *x,
                              const double *dy, const double *y, const double *dx,
                              const double *weight, const double *bias,
                              const double *running_mean_in, const double *running_var_in,
                              const double *running_mean, const double *running_var,
                              const double *grad_weight, const double *grad_bias,
                              double momentum, double eps)
{
    const int64_t values = total_n * c * s;
    double *y_whole = allocate(values * sizeof(double));
    double *dx_whole = allocate(values * sizeof(double));
    double mean_whole[CHANNELS], invstd_whole[CHANNELS], grad_weight_whole[CHANNELS];
    double grad_bias_whole[CHANNELS], running_mean_whole[CHANNELS], running_var_whole[CHANNELS];
    memcpy(running_mean_whole, running_mean_in, c * sizeof(double));
    memcpy(running_var_whole, running_var_in, c * sizeof(double));
    CHECK(bncpu_batch_norm_forward_train_f64(x, y_whole, total_n, c, s, weight, bias,
                                             running_mean_whole, running_var_whole, momentum,
                                             eps, mean_whole, invstd_whole, 1));
    CHECK(bncpu_batch_norm_backward_f64(dy, x, dx_whole, total_n, c, s, weight, NULL, NULL,
                                        mean_whole, invstd_whole, 1, eps, grad_weight_whole,
                                        grad_bias_whole));
    int passed = agrees(y, y_whole, values, 1e-10) && agrees(dx, dx_whole, values, 1e-10)
        && agrees(running_mean, running_mean_whole, c, 1e-10)
        && agrees(running_var, running_var_whole, c, 1e-10)
        && agrees(grad_weight, grad_weight_whole, c, 1e-10)
        && agrees(grad_bias, grad_bias_whole, c, 1e-10);
    fprintf(stderr, "bn_mpi: %s: %d ranks (%lld samples, shards of", passed ? "passed" : "FAILED",
            size, (long long)total_n);
    for (int p = 0; p < size; p++)
        fprintf(stderr, " %lld", (long long)(shard_values[p] / (c * s)));
    fprintf(stderr, "): the synchronized step %s the whole batch's batch norm\n",
            passed ? "equals" : "differs from");
    free(dx_whole);
    free(y_whole);
    return passed;
}

static void append_array(line_buffer *line, const char *name, const double *values, int64_t count)
{
    append(line, ", \"%s\": [", name);
    for (int64_t i = 0; i < count; i++)
        append(line, i ? ", %.17g" : "%.17g", values[i]);
    append(line, "]");
}

int main(int argc, char **argv)
{
    int rank, size;
    const int64_t c = CHANNELS, s = SPATIAL;
    const double momentum = 0.1, eps = 1e-5;

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (bncpu_import() != BNCPU_OK)
        fail("bncpu_import", bncpu_import_error());

    /* This rank's shard, and the parameters every rank shares. */
    const int64_t n = SHARD_SIZES[rank % 4], count = n * s;
    double *x = allocate(n * c * s * sizeof(double)), *dy = allocate(n * c * s * sizeof(double));
    double *y = allocate(n * c * s * sizeof(double)), *dx = allocate(n * c * s * sizeof(double));
    double weight[CHANNELS], bias[CHANNELS], running_mean[CHANNELS], running_var[CHANNELS];
    double running_mean_in[CHANNELS], running_var_in[CHANNELS];
    rng_state = 0x9E3779B97F4A7C15ull;
    fill(weight, c, 1.0, 0.5);
    fill(bias, c, 0.0, 0.5);
    fill(running_mean, c, 0.0, 0.5);
    fill(running_var, c, 1.5, 0.5);
    memcpy(running_mean_in, running_mean, sizeof running_mean);
    memcpy(running_var_in, running_var, sizeof running_var);
    rng_state = 0x2545F4914F6CDD1Dull * (uint64_t)(rank + 1);
    fill(x, n * c * s, 3.0, 2.0);
    fill(dy, n * c * s, 0.0, 1.0);

    /* ---- forward: local statistics, one all-gather, merge, normalize ---- */
    /* row = [c, count, mean[c], m2[c]]: the header lets each rank check what it got. */
    const int row_length = 2 + 2 * CHANNELS;
    double row[2 + 2 * CHANNELS];
    double *rows = allocate((size_t)size * row_length * sizeof(double));
    row[0] = (double)c;
    row[1] = (double)count;
    CHECK(bncpu_batch_norm_stats_f64(x, n, c, s, row + 2, row + 2 + c));
    MPI_Allgather(row, row_length, MPI_DOUBLE, rows, row_length, MPI_DOUBLE, MPI_COMM_WORLD);

    double *means = allocate((size_t)size * c * sizeof(double));
    double *m2s = allocate((size_t)size * c * sizeof(double));
    int64_t *counts = allocate((size_t)size * sizeof(int64_t)), total_count = 0;
    for (int p = 0; p < size; p++) {
        const double *other = rows + (size_t)p * row_length;
        if (other[0] != (double)c)
            fail("MPI_Allgather", "the ranks disagree on the number of channels");
        counts[p] = (int64_t)other[1];
        total_count += counts[p];
        memcpy(means + (size_t)p * c, other + 2, c * sizeof(double));
        memcpy(m2s + (size_t)p * c, other + 2 + c, c * sizeof(double));
    }
    double mean[CHANNELS], invstd[CHANNELS];
    CHECK(bncpu_batch_norm_gather_stats_f64(size, c, means, m2s, counts, running_mean,
                                            running_var, momentum, eps, mean, invstd, 1));
    CHECK(bncpu_batch_norm_elemt_f64(x, y, n, c, s, mean, invstd, weight, bias));

    /* ---- backward: local sums, one all-reduce, gradient of the whole batch's loss ---- */
    double local_sums[2 * CHANNELS], global_sums[2 * CHANNELS];   /* sum_dy, then sum_dy_xmu */
    CHECK(bncpu_batch_norm_backward_reduce_f64(dy, x, n, c, s, mean, local_sums, local_sums + c));
    MPI_Allreduce(local_sums, global_sums, 2 * CHANNELS, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    CHECK(bncpu_batch_norm_backward_elemt_f64(dy, x, dx, n, c, s, mean, invstd, weight,
                                              global_sums, global_sums + c, total_count));
    double grad_weight[CHANNELS], grad_bias[CHANNELS];   /* this rank's share */
    for (int64_t j = 0; j < c; j++) {
        grad_weight[j] = local_sums[c + j] * invstd[j];
        grad_bias[j] = local_sums[j];
    }

    /* ---- check: rank 0 gathers the whole batch and runs the fused kernels on it ---- */
    int shard_values = (int)(n * c * s), *all_values = NULL, *value_offsets = NULL;
    double *whole = NULL, grad_sums[2 * CHANNELS], grads[2 * CHANNELS];
    if (rank == 0) {
        all_values = allocate((size_t)size * sizeof(int));
        value_offsets = allocate((size_t)size * sizeof(int));
    }
    MPI_Gather(&shard_values, 1, MPI_INT, all_values, 1, MPI_INT, 0, MPI_COMM_WORLD);
    int64_t whole_values = 0;
    if (rank == 0) {
        for (int p = 0; p < size; p++) {
            value_offsets[p] = (int)whole_values;
            whole_values += all_values[p];
        }
        whole = allocate(4 * (size_t)whole_values * sizeof(double));   /* x, dy, y, dx */
    }
    const double *shard_arrays[4] = {x, dy, y, dx};
    for (int k = 0; k < 4; k++)
        MPI_Gatherv(shard_arrays[k], shard_values, MPI_DOUBLE,
                    rank == 0 ? whole + k * whole_values : NULL, all_values, value_offsets,
                    MPI_DOUBLE, 0, MPI_COMM_WORLD);
    memcpy(grads, grad_weight, sizeof grad_weight);
    memcpy(grads + c, grad_bias, sizeof grad_bias);
    MPI_Reduce(grads, grad_sums, 2 * CHANNELS, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    int passed = 1;
    if (rank == 0)
        passed = whole_batch_agrees(size, c, s, all_values, whole_values / (c * s), whole,
                                    whole + whole_values, whole + 2 * whole_values,
                                    whole + 3 * whole_values, weight, bias, running_mean_in,
                                    running_var_in, running_mean, running_var, grad_sums,
                                    grad_sums + c, momentum, eps);

    /* ---- report: each rank's line, printed by rank 0 in rank order ---- */
    line_buffer line = {allocate(4096), 0, 4096};
    append(&line, "{\"rank\": %d, \"size\": %d, \"n\": %lld, \"c\": %lld, \"s\": %lld, "
           "\"momentum\": %.17g, \"eps\": %.17g", rank, size, (long long)n, (long long)c,
           (long long)s, momentum, eps);
    append_array(&line, "x", x, n * c * s);
    append_array(&line, "dy", dy, n * c * s);
    append_array(&line, "weight", weight, c);
    append_array(&line, "bias", bias, c);
    append_array(&line, "running_mean_in", running_mean_in, c);
    append_array(&line, "running_var_in", running_var_in, c);
    append_array(&line, "y", y, n * c * s);
    append_array(&line, "dx", dx, n * c * s);
    append_array(&line, "running_mean", running_mean, c);
    append_array(&line, "running_var", running_var, c);
    append_array(&line, "grad_weight", grad_weight, c);
    append_array(&line, "grad_bias", grad_bias, c);
    append(&line, "}\n");

    int length = (int)line.length, *lengths = NULL, *offsets = NULL;
    char *all_lines = NULL;
    if (rank == 0) {
        lengths = allocate((size_t)size * sizeof(int));
        offsets = allocate((size_t)size * sizeof(int));
    }
    MPI_Gather(&length, 1, MPI_INT, lengths, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        int total = 0;
        for (int p = 0; p < size; p++) {
            offsets[p] = total;
            total += lengths[p];
        }
        all_lines = allocate((size_t)total + 1);
        all_lines[total] = '\0';
    }
    MPI_Gatherv(line.text, length, MPI_CHAR, all_lines, lengths, offsets, MPI_CHAR, 0,
                MPI_COMM_WORLD);
    if (rank == 0) {
        fputs(all_lines, stdout);
        fflush(stdout);
    }

    free(whole);
    free(value_offsets);
    free(all_values);
    free(all_lines);
    free(offsets);
    free(lengths);
    free(line.text);
    free(counts);
    free(m2s);
    free(means);
    free(rows);
    free(dx);
    free(y);
    free(dy);
    free(x);
    bncpu_finalize();
    MPI_Finalize();
    return passed ? 0 : 1;
}
