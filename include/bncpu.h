/*
 * bncpu.h: the C API of bncpu (batch, layer, group, instance and RMS normalization).
 *
 * The functions here are the very kernels the Python package runs (Cython, OpenMP),
 * reached through a table of function pointers that the installed package hands out.
 *
 *   #include "bncpu.h"
 *   if (bncpu_import() != BNCPU_OK) { fprintf(stderr, "%s\n", bncpu_import_error()); return 1; }
 *   int status = bncpu_batch_norm_forward_train_f32(x, y, n, c, s, ...);
 *   if (status != BNCPU_OK) fprintf(stderr, "%s\n", bncpu_strerror(status));
 *
 * Why a table and an interpreter: the kernels are compiled by Cython, whose parallel
 * loops check the state of the Python interpreter on entry; called before any
 * interpreter exists they abort. bncpu_import() therefore starts an embedded
 * interpreter when none runs (standalone programs; link with
 * `python3-config --embed --ldflags`), imports the package, copies the table, and
 * leaves the interpreter idle with the GIL released. It costs one import of bncpu
 * (tens of milliseconds, once per process); kernel calls afterwards never touch Python
 * and may come from any thread. Inside a Python extension module the interpreter
 * already runs: call bncpu_import() from the module's init function with the GIL held.
 * Call bncpu_import() in every translation unit that uses the macros below (the table
 * pointer is per file; repeated calls are cheap).
 *
 * Layout: every array is C-contiguous. Batch, group and instance norm see the input
 * as (n, c, s): n samples, c channels, s = product of the trailing dimensions
 * (s = 1 for 2-D input), element (i, j, k) at x[(i*c + j)*s + k]. Layer and RMS norm
 * see it as (rows, d): each row of d contiguous values is normalized on its own.
 * `T` below is float (suffix _f32) or double (suffix _f64). Per-channel statistics of
 * the split-phase functions are double for both. Pointers marked "may be NULL" are
 * optional; every other pointer must be valid for the sizes given, else
 * BNCPU_ERR_NULL_POINTER. Outputs may alias inputs of the same shape exactly (in
 * place), never partially.
 *
 * Threads: kernels use bncpu_get_num_threads() OpenMP threads for large inputs and
 * the calling thread alone for small ones; results are bitwise identical whatever
 * the number of threads. Calls from several threads at once are safe.
 */
#ifndef BNCPU_H
#define BNCPU_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define BNCPU_VERSION_MAJOR 0
#define BNCPU_VERSION_MINOR 1
#define BNCPU_VERSION_PATCH 0
#define BNCPU_VERSION_STRING "0.1.0"
/* Incremented whenever bncpu_api changes; bncpu_import() refuses a mismatch. */
#define BNCPU_API_VERSION 1

#ifdef __cplusplus
extern "C" {
#endif

/* Every kernel returns one of these; bncpu_strerror() describes it. */
typedef enum {
    BNCPU_OK = 0,
    BNCPU_ERR_NULL_POINTER = 1,      /* a required pointer is NULL */
    BNCPU_ERR_BAD_SIZE = 2,          /* a size is negative, or sizes disagree */
    BNCPU_ERR_ONE_VALUE = 3,         /* training with one value per channel (n*s == 1) */
    BNCPU_ERR_BAD_EPS = 4,           /* eps < 0, NaN or infinite */
    BNCPU_ERR_BAD_MOMENTUM = 5,      /* momentum outside [0, 1] or NaN */
    BNCPU_ERR_ALIASED_STATS = 6,     /* running_mean and running_var are the same array */
    BNCPU_ERR_BAD_GROUPS = 7,        /* groups < 1 or c not divisible by groups */
    BNCPU_ERR_NO_MEMORY = 8,         /* a temporary buffer could not be allocated */
    BNCPU_ERR_NOT_IMPORTED = 9,      /* bncpu_import() was not called or failed */
    BNCPU_ERR_IMPORT = 10            /* bncpu_import(): the Python package could not be loaded */
} bncpu_status;

/* The function table (ABI of BNCPU_API_VERSION); use the macros further below. */
typedef struct bncpu_api {
    int api_version;
    const char *version;
    const char *isa;                                       /* instruction set in use, e.g. "avx2" */
    const char *(*strerror)(int status);
    int (*get_num_threads)(void);
    void (*set_num_threads)(int n);                         /* 0 = OpenMP default */

    /* ---- batch norm: fused ------------------------------------------------------ */
    /* Training forward. Per channel j over its M = n*s values: mean, biased var,
     * invstd = 1/sqrt(var + eps), y = (x - mean)*invstd*weight[j] + bias[j].
     * If running_mean/running_var are given (both or neither; may be NULL) and M > 0:
     *   running_mean = (1-momentum)*running_mean + momentum*mean
     *   running_var  = (1-momentum)*running_var  + momentum*var*M/(M-1)
     * save_mean/save_invstd (c values each, may be NULL) receive mean and invstd.
     * weight/bias may be NULL (1 and 0). y may be x. M == 1 is BNCPU_ERR_ONE_VALUE;
     * M == 0 writes nothing but save_mean = 0, save_invstd = 1/sqrt(eps)... (nan-free). */
    int (*batch_norm_forward_train_f32)(const float *x, float *y, int64_t n, int64_t c, int64_t s,
        const float *weight, const float *bias, float *running_mean, float *running_var,
        double momentum, double eps, float *save_mean, float *save_invstd);
    int (*batch_norm_forward_train_f64)(const double *x, double *y, int64_t n, int64_t c, int64_t s,
        const double *weight, const double *bias, double *running_mean, double *running_var,
        double momentum, double eps, double *save_mean, double *save_invstd);
    /* Inference forward: y = (x - running_mean)/sqrt(running_var + eps)*weight + bias. */
    int (*batch_norm_forward_eval_f32)(const float *x, float *y, int64_t n, int64_t c, int64_t s,
        const float *weight, const float *bias, const float *running_mean, const float *running_var,
        double eps);
    int (*batch_norm_forward_eval_f64)(const double *x, double *y, int64_t n, int64_t c, int64_t s,
        const double *weight, const double *bias, const double *running_mean, const double *running_var,
        double eps);
    /* Backward. training != 0: mean = save_mean, invstd = save_invstd (from the forward),
     *   xhat = (x - mean)*invstd, dbias = Σ dy, dweight = Σ dy*xhat,
     *   dx = weight*invstd*(dy - Σdy/M - xhat*Σ(dy*xhat)/M).
     * training == 0: mean = running_mean, invstd = 1/sqrt(running_var + eps),
     *   dx = dy*weight*invstd, dweight = Σ dy*(x - mean)*invstd, dbias = Σ dy.
     * dx, dweight, dbias may each be NULL (not computed); dx may be dy or x.
     * The statistics not used by the chosen mode may be NULL. */
    int (*batch_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t n, int64_t c, int64_t s,
        const float *weight, const float *running_mean, const float *running_var,
        const float *save_mean, const float *save_invstd, int training, double eps,
        float *dweight, float *dbias);
    int (*batch_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t n, int64_t c, int64_t s,
        const double *weight, const double *running_mean, const double *running_var,
        const double *save_mean, const double *save_invstd, int training, double eps,
        double *dweight, double *dbias);

    /* ---- batch norm: split phase (synchronized batch norm across processes) ------- */
    /* Local statistics: per channel mean and m2 = Σ (x - mean)² over the n*s values
     * (count = n*s; count 0 gives 0 and 0). */
    int (*batch_norm_stats_f32)(const float *x, int64_t n, int64_t c, int64_t s, double *mean, double *m2);
    int (*batch_norm_stats_f64)(const double *x, int64_t n, int64_t c, int64_t s, double *mean, double *m2);
    /* Merge p partials (mean and m2 are p*c row-major, counts has p entries) into the
     * global mean and invstd = 1/sqrt(M2/count + eps), and update the running statistics
     * (may be NULL) as the training forward does, with the total count. A total count of
     * 0 leaves everything unchanged and gives mean 0, invstd 1/sqrt(eps). */
    int (*batch_norm_gather_stats_f32)(int64_t p, int64_t c, const double *mean, const double *m2,
        const int64_t *counts, float *running_mean, float *running_var, double momentum, double eps,
        double *mean_out, double *invstd_out);
    int (*batch_norm_gather_stats_f64)(int64_t p, int64_t c, const double *mean, const double *m2,
        const int64_t *counts, double *running_mean, double *running_var, double momentum, double eps,
        double *mean_out, double *invstd_out);
    /* Normalize with given statistics: y = (x - mean)*invstd*weight + bias. */
    int (*batch_norm_elemt_f32)(const float *x, float *y, int64_t n, int64_t c, int64_t s,
        const double *mean, const double *invstd, const float *weight, const float *bias);
    int (*batch_norm_elemt_f64)(const double *x, double *y, int64_t n, int64_t c, int64_t s,
        const double *mean, const double *invstd, const double *weight, const double *bias);
    /* Backward reduce: sum_dy = Σ dy, sum_dy_xmu = Σ dy*(x - mean), per channel. */
    int (*batch_norm_backward_reduce_f32)(const float *dy, const float *x, int64_t n, int64_t c, int64_t s,
        const double *mean, double *sum_dy, double *sum_dy_xmu);
    int (*batch_norm_backward_reduce_f64)(const double *dy, const double *x, int64_t n, int64_t c, int64_t s,
        const double *mean, double *sum_dy, double *sum_dy_xmu);
    /* Backward elementwise, with the global sums and count of all processes:
     * dx = weight*invstd*(dy - sum_dy/count - (x - mean)*invstd²*sum_dy_xmu/count). */
    int (*batch_norm_backward_elemt_f32)(const float *dy, const float *x, float *dx, int64_t n, int64_t c,
        int64_t s, const double *mean, const double *invstd, const float *weight,
        const double *sum_dy, const double *sum_dy_xmu, int64_t count);
    int (*batch_norm_backward_elemt_f64)(const double *dy, const double *x, double *dx, int64_t n, int64_t c,
        int64_t s, const double *mean, const double *invstd, const double *weight,
        const double *sum_dy, const double *sum_dy_xmu, int64_t count);

    /* ---- layer norm: rows of d values ------------------------------------------ */
    /* y = (x - mean_r)*rstd_r*weight[k] + bias[k], mean_r and rstd_r = 1/sqrt(var_r + eps)
     * over each row r; weight/bias (d values) may be NULL; save_mean/save_rstd (rows
     * values) may be NULL. */
    int (*layer_norm_forward_f32)(const float *x, float *y, int64_t rows, int64_t d,
        const float *weight, const float *bias, double eps, float *save_mean, float *save_rstd);
    int (*layer_norm_forward_f64)(const double *x, double *y, int64_t rows, int64_t d,
        const double *weight, const double *bias, double eps, double *save_mean, double *save_rstd);
    /* xhat = (x - mean)*rstd, g = dy*weight:
     * dx = rstd*(g - mean_k(g) - xhat*mean_k(g*xhat)); dweight = Σ_r dy*xhat; dbias = Σ_r dy.
     * dx, dweight, dbias may be NULL. */
    int (*layer_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t rows, int64_t d,
        const float *mean, const float *rstd, const float *weight, float *dweight, float *dbias);
    int (*layer_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t rows, int64_t d,
        const double *mean, const double *rstd, const double *weight, double *dweight, double *dbias);

    /* ---- group norm: (n, c, s), groups of c/groups contiguous channels ------------ */
    /* Statistics per (sample, group) over (c/groups)*s values; weight/bias per channel.
     * save_mean/save_rstd hold n*groups values. groups == c is instance norm. */
    int (*group_norm_forward_f32)(const float *x, float *y, int64_t n, int64_t c, int64_t s, int64_t groups,
        const float *weight, const float *bias, double eps, float *save_mean, float *save_rstd);
    int (*group_norm_forward_f64)(const double *x, double *y, int64_t n, int64_t c, int64_t s, int64_t groups,
        const double *weight, const double *bias, double eps, double *save_mean, double *save_rstd);
    int (*group_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t n, int64_t c, int64_t s,
        int64_t groups, const float *mean, const float *rstd, const float *weight, float *dweight, float *dbias);
    int (*group_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t n, int64_t c,
        int64_t s, int64_t groups, const double *mean, const double *rstd, const double *weight,
        double *dweight, double *dbias);

    /* ---- RMS norm: rows of d values ---------------------------------------------- */
    /* y = x*rstd_r*weight[k], rstd_r = 1/sqrt(mean_k(x²) + eps); weight and save_rstd
     * may be NULL. Backward: g = dy*weight, dx = rstd*(g - x*rstd²*mean_k(g*x)),
     * dweight = Σ_r dy*x*rstd. */
    int (*rms_norm_forward_f32)(const float *x, float *y, int64_t rows, int64_t d,
        const float *weight, double eps, float *save_rstd);
    int (*rms_norm_forward_f64)(const double *x, double *y, int64_t rows, int64_t d,
        const double *weight, double eps, double *save_rstd);
    int (*rms_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t rows, int64_t d,
        const float *rstd, const float *weight, float *dweight);
    int (*rms_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t rows, int64_t d,
        const double *rstd, const double *weight, double *dweight);
} bncpu_api;

#ifdef __cplusplus
}
#endif
#endif /* BNCPU_H */
