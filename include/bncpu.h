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
 * interpreter when none runs (standalone programs), loads the modules that fill the
 * table (not NumPy, nor the rest of the package: see bncpu_import()), copies the table
 * pointer from the capsule bncpu._capi._C_API, checks the API version, and leaves the
 * interpreter idle with the GIL released. That costs one start of Python, once per
 * process; kernel calls afterwards never touch Python, cost one indirect call more
 * than a direct one, and may come from any thread. bncpu_finalize() ends that
 * interpreter. Inside a Python extension module the interpreter already runs: call
 * bncpu_import() from the module's init function.
 * Call bncpu_import() in every translation unit that uses the macros below (the table
 * pointer is per file; repeated calls are cheap).
 *
 * Building: this header includes <Python.h>, so compile with the include flags of the
 * Python that has bncpu installed; a standalone program also links libpython:
 *   cc prog.c -I"$(python3 -c 'import bncpu; print(bncpu.get_include())')" \
 *      $(python3-config --includes) $(python3-config --embed --ldflags) -o prog
 * A C extension module needs only the include flags (examples/c/ has both cases).
 * Which Python environment the embedded interpreter uses: the one of the python named
 * by the environment variable BNCPU_PYTHON at run time, else by the macro
 * BNCPU_PYTHON_EXECUTABLE at compile time (-DBNCPU_PYTHON_EXECUTABLE='"/path/venv/bin/python"'),
 * else the first python3 on PATH (an activated virtual environment). PYTHONPATH and the
 * other PYTHON* variables apply as to python itself.
 *
 * Layout: every array is C-contiguous. Batch, group and instance norm see the input
 * as (n, c, s): n samples, c channels, s = product of the trailing dimensions
 * (s = 1 for 2-D input), element (i, j, k) at x[(i*c + j)*s + k]. Layer and RMS norm
 * see it as (rows, d): each row of d contiguous values is normalized on its own.
 * Channels-last data (NHWC, NLC, NDHWC: n samples, s positions, c channels last,
 * element (i, k, j) at x[(i*s + k)*c + j]):
 *  - batch norm: such a buffer IS the (n*s, c, 1) input of the batch-norm entries, the
 *    statistics of channel j being those over all n*s positions either way. Every
 *    batch-norm entry (training and inference forward, backward, and the split-phase
 *    stats, elemt, backward_reduce, backward_elemt) takes channels-last data when
 *    called with n = n*s (samples times positions), c = c, s = 1; the per-channel
 *    arguments and results are unchanged. This runs the kernels' column mode, with
 *    no copy. E.g. NHWC (N, H, W, C): bncpu_batch_norm_forward_train_f32(x, y, N*H*W,
 *    C, 1, ...).
 *  - group and instance norm: the group_norm_channels_last_* entries below, with
 *    the same arguments as group_norm_* (instance norm: groups = c).
 * `T` below is float (suffix _f32) or double (suffix _f64). Per-channel statistics of
 * the split-phase functions are double for both. Pointers marked "may be NULL" are
 * optional; every other pointer must be valid for the sizes given, else
 * BNCPU_ERR_NULL_POINTER. Only data-shaped arrays (x, y, dy, dx, residual, dresidual)
 * may be the same array (in place, exactly, where an entry allows it); any other sharing
 * of memory by an output, partial or whole, is BNCPU_ERR_ALIASED and nothing is written.
 *
 * Threads: kernels use bncpu_get_num_threads() OpenMP threads for large inputs and
 * the calling thread alone for small ones; results are bitwise identical whatever
 * the number of threads. Calls from several threads at once are safe. A kernel never
 * calls Python and needs no GIL: call it with the GIL released (Py_BEGIN_ALLOW_THREADS
 * in an extension module) so that other Python threads run meanwhile. Subinterpreters
 * in the process are no obstacle.
 */
#ifndef BNCPU_H
#define BNCPU_H

/* Python.h comes first, as CPython requires (it sets feature macros of the C library). */
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define BNCPU_VERSION_MAJOR 0
#define BNCPU_VERSION_MINOR 1
#define BNCPU_VERSION_PATCH 0
#define BNCPU_VERSION_STRING "0.1.0"

#ifdef __cplusplus
extern "C" {
#endif

/* Every kernel returns one of these; bncpu_strerror() describes it. */
typedef enum {
    BNCPU_OK = 0,
    BNCPU_ERR_NULL_POINTER = 1,      /* a required pointer is NULL */
    BNCPU_ERR_BAD_SIZE = 2,          /* a size is negative or too large for its arrays to
                                        exist (2^57 values or more), or sizes disagree */
    BNCPU_ERR_ONE_VALUE = 3,         /* training with one value per channel (n*s == 1) */
    BNCPU_ERR_BAD_EPS = 4,           /* eps < 0, NaN or infinite */
    BNCPU_ERR_BAD_MOMENTUM = 5,      /* momentum outside [0, 1] or NaN */
    BNCPU_ERR_ALIASED_STATS = 6,     /* running_mean and running_var are the same array */
    BNCPU_ERR_BAD_GROUPS = 7,        /* groups < 1 or c not divisible by groups */
    BNCPU_ERR_NO_MEMORY = 8,         /* a temporary buffer could not be allocated */
    BNCPU_ERR_NOT_IMPORTED = 9,      /* bncpu_import() was not called or failed */
    BNCPU_ERR_IMPORT = 10,           /* bncpu_import(): the Python package could not be loaded */
    BNCPU_ERR_ALIASED = 11           /* two outputs share memory, or an output shares memory
                                        with an input other than exactly (in place: same
                                        start, same size, both shaped like the data) */
} bncpu_status;

/* The function table; use the macros further below. Its kernel members follow
 * bncpu/_kernels/manifest.py, which generates this block (the build fails when a
 * kernel's signature differs from its member).
 * Versions: the table only grows. A later minor version appends members and keeps
 * every earlier one where it was; anything else increments the major version.
 * bncpu_import() accepts a package of the same major version and a minor version
 * >= BNCPU_API_VERSION_MINOR of this header, so a program keeps working with later
 * packages of the same major version (it only sees the members it was compiled with). */
/* ---- the API table: generated from bncpu/_kernels/manifest.py ---- */
#define BNCPU_API_VERSION_MAJOR 3
#define BNCPU_API_VERSION_MINOR 1

/* Half-precision data, as bits. bfloat16: sign, 8 exponent and 7
 * fraction bits, the upper half of a float32 of the same sign and
 * exponent. */
typedef uint16_t bncpu_bf16;
/* IEEE 754 binary16: sign, 5 exponent and 10 fraction bits. */
typedef uint16_t bncpu_f16;

typedef struct bncpu_api {
    int api_version_major;                   /* BNCPU_API_VERSION_MAJOR of the package */
    int api_version_minor;                   /* BNCPU_API_VERSION_MINOR of the package */
    const char *version;                     /* the package's version, e.g. "0.1.0" */
    const char *isa;                         /* instruction set in use, e.g. "avx2" */
    const char *(*strerror)(int status);     /* the message of a status */
    int (*get_num_threads)(void);            /* threads a large call uses */
    void (*set_num_threads)(int n);          /* 0 = OpenMP default */

    /* ==== members of API version 3.0 ==== */

    /* ---- batch norm: fused ----------------------------------------------------------- */
    /* Training forward. Per channel j over its M = n*s values: mean, biased var,
     * invstd = 1/sqrt(var + eps), y = (x - mean)*invstd*weight[j] + bias[j].
     * If running_mean/running_var are given (both or neither; may be NULL) and M > 0:
     *   running_mean = (1-momentum)*running_mean + momentum*mean
     *   running_var  = (1-momentum)*running_var  + momentum*var*M/(M-1)
     * (unbiased != 0, PyTorch's convention), or momentum*var (unbiased == 0: the biased
     * batch variance, as Keras and d2l keep it).
     * save_mean/save_invstd (c values each, may be NULL) receive mean and invstd.
     * weight/bias may be NULL (1 and 0). y may be x. M == 1 is BNCPU_ERR_ONE_VALUE;
     * M == 0 writes nothing but save_mean = 0, save_invstd = 1/sqrt(eps) (nan-free). */
    int (*batch_norm_forward_train_f32)(const float *x, float *y, int64_t n, int64_t c,
        int64_t s, const float *weight, const float *bias, float *running_mean,
        float *running_var, double momentum, double eps, float *save_mean, float *save_invstd,
        int unbiased);
    int (*batch_norm_forward_train_f64)(const double *x, double *y, int64_t n, int64_t c,
        int64_t s, const double *weight, const double *bias, double *running_mean,
        double *running_var, double momentum, double eps, double *save_mean,
        double *save_invstd, int unbiased);
    /* Inference forward: y = (x - running_mean)/sqrt(running_var + eps)*weight + bias. */
    int (*batch_norm_forward_eval_f32)(const float *x, float *y, int64_t n, int64_t c,
        int64_t s, const float *weight, const float *bias, const float *running_mean,
        const float *running_var, double eps);
    int (*batch_norm_forward_eval_f64)(const double *x, double *y, int64_t n, int64_t c,
        int64_t s, const double *weight, const double *bias, const double *running_mean,
        const double *running_var, double eps);
    /* Backward. training != 0: mean = save_mean, invstd = save_invstd (from the forward),
     *   xhat = (x - mean)*invstd, dbias = Σ dy, dweight = Σ dy*xhat,
     *   dx = weight*invstd*(dy - Σdy/M - xhat*Σ(dy*xhat)/M).
     * training == 0: mean = running_mean, invstd = 1/sqrt(running_var + eps),
     *   dx = dy*weight*invstd, dweight = Σ dy*(x - mean)*invstd, dbias = Σ dy.
     * dx, dweight, dbias may each be NULL (not computed); dx may be dy or x.
     * The statistics not used by the chosen mode may be NULL. eps is checked in both modes. */
    int (*batch_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t n,
        int64_t c, int64_t s, const float *weight, const float *running_mean,
        const float *running_var, const float *save_mean, const float *save_invstd,
        int training, double eps, float *dweight, float *dbias);
    int (*batch_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t n,
        int64_t c, int64_t s, const double *weight, const double *running_mean,
        const double *running_var, const double *save_mean, const double *save_invstd,
        int training, double eps, double *dweight, double *dbias);

    /* ---- batch norm: split phase (synchronized batch norm across processes) ---------- */
    /* Local statistics: per channel mean and m2 = Σ (x - mean)² over the n*s values
     * (count = n*s; count 0 gives 0 and 0). */
    int (*batch_norm_stats_f32)(const float *x, int64_t n, int64_t c, int64_t s, double *mean,
        double *m2);
    int (*batch_norm_stats_f64)(const double *x, int64_t n, int64_t c, int64_t s, double *mean,
        double *m2);
    /* Merge p partials (mean and m2 are p*c row-major, counts has p entries) into the
     * global mean and invstd = 1/sqrt(M2/count + eps), and update the running statistics
     * (may be NULL) as the training forward does, with the total count (unbiased as
     * there). A total count of 0 leaves everything unchanged and gives mean 0,
     * invstd 1/sqrt(eps). */
    int (*batch_norm_gather_stats_f32)(int64_t p, int64_t c, const double *mean,
        const double *m2, const int64_t *counts, float *running_mean, float *running_var,
        double momentum, double eps, double *mean_out, double *invstd_out, int unbiased);
    int (*batch_norm_gather_stats_f64)(int64_t p, int64_t c, const double *mean,
        const double *m2, const int64_t *counts, double *running_mean, double *running_var,
        double momentum, double eps, double *mean_out, double *invstd_out, int unbiased);
    /* Normalize with given statistics: y = (x - mean)*invstd*weight + bias. */
    int (*batch_norm_elemt_f32)(const float *x, float *y, int64_t n, int64_t c, int64_t s,
        const double *mean, const double *invstd, const float *weight, const float *bias);
    int (*batch_norm_elemt_f64)(const double *x, double *y, int64_t n, int64_t c, int64_t s,
        const double *mean, const double *invstd, const double *weight, const double *bias);
    /* Backward reduce: sum_dy = Σ dy, sum_dy_xmu = Σ dy*(x - mean), per channel. */
    int (*batch_norm_backward_reduce_f32)(const float *dy, const float *x, int64_t n, int64_t c,
        int64_t s, const double *mean, double *sum_dy, double *sum_dy_xmu);
    int (*batch_norm_backward_reduce_f64)(const double *dy, const double *x, int64_t n,
        int64_t c, int64_t s, const double *mean, double *sum_dy, double *sum_dy_xmu);
    /* Backward elementwise, with the global sums and count of all processes:
     * dx = weight*invstd*(dy - sum_dy/count - (x - mean)*invstd²*sum_dy_xmu/count). */
    int (*batch_norm_backward_elemt_f32)(const float *dy, const float *x, float *dx, int64_t n,
        int64_t c, int64_t s, const double *mean, const double *invstd, const float *weight,
        const double *sum_dy, const double *sum_dy_xmu, int64_t count);
    int (*batch_norm_backward_elemt_f64)(const double *dy, const double *x, double *dx,
        int64_t n, int64_t c, int64_t s, const double *mean, const double *invstd,
        const double *weight, const double *sum_dy, const double *sum_dy_xmu, int64_t count);

    /* ---- batch norm + (add +) ReLU, fused -------------------------------------------- */
    /* Training and inference forward of y = relu(batch_norm(x) + residual), relu(v) = 0
     * where v < 0, else v (NaN kept): the arguments and statistics of the batch-norm
     * forwards above, and residual (n*c*s values, may be NULL: no add). After the
     * statistics, one pass over x and the residual. y may be x or residual. */
    int (*batch_norm_relu_forward_train_f32)(const float *x, const float *residual, float *y,
        int64_t n, int64_t c, int64_t s, const float *weight, const float *bias,
        float *running_mean, float *running_var, double momentum, double eps, float *save_mean,
        float *save_invstd, int unbiased);
    int (*batch_norm_relu_forward_train_f64)(const double *x, const double *residual, double *y,
        int64_t n, int64_t c, int64_t s, const double *weight, const double *bias,
        double *running_mean, double *running_var, double momentum, double eps,
        double *save_mean, double *save_invstd, int unbiased);
    int (*batch_norm_relu_forward_eval_f32)(const float *x, const float *residual, float *y,
        int64_t n, int64_t c, int64_t s, const float *weight, const float *bias,
        const float *running_mean, const float *running_var, double eps);
    int (*batch_norm_relu_forward_eval_f64)(const double *x, const double *residual, double *y,
        int64_t n, int64_t c, int64_t s, const double *weight, const double *bias,
        const double *running_mean, const double *running_var, double eps);
    /* Backward of those, y their output: g = dy where y passed the ReLU (!(y <= 0): a NaN
     * output passes), else 0, applied as dy is read; dx, dweight, dbias are
     * batch_norm_backward's for g (training or not, as there), and dresidual = g
     * (may be NULL: not written). dx is required and may be dy, y or x; dresidual must
     * not alias dx. */
    int (*batch_norm_relu_backward_f32)(const float *dy, const float *y, const float *x,
        float *dx, int64_t n, int64_t c, int64_t s, const float *weight,
        const float *running_mean, const float *running_var, const float *save_mean,
        const float *save_invstd, int training, double eps, float *dweight, float *dbias,
        float *dresidual);
    int (*batch_norm_relu_backward_f64)(const double *dy, const double *y, const double *x,
        double *dx, int64_t n, int64_t c, int64_t s, const double *weight,
        const double *running_mean, const double *running_var, const double *save_mean,
        const double *save_invstd, int training, double eps, double *dweight, double *dbias,
        double *dresidual);

    /* ---- layer norm: rows of d values ------------------------------------------------ */
    /* y = (x - mean_r)*rstd_r*weight[k] + bias[k], mean_r and rstd_r = 1/sqrt(var_r + eps)
     * over each row r; weight/bias (d values) may be NULL; save_mean/save_rstd (rows
     * values) may be NULL. */
    int (*layer_norm_forward_f32)(const float *x, float *y, int64_t rows, int64_t d,
        const float *weight, const float *bias, double eps, float *save_mean, float *save_rstd);
    int (*layer_norm_forward_f64)(const double *x, double *y, int64_t rows, int64_t d,
        const double *weight, const double *bias, double eps, double *save_mean,
        double *save_rstd);
    /* xhat = (x - mean)*rstd, g = dy*weight:
     * dx = rstd*(g - mean_k(g) - xhat*mean_k(g*xhat)); dweight = Σ_r dy*xhat; dbias = Σ_r dy.
     * dx, dweight, dbias may be NULL. */
    int (*layer_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t rows,
        int64_t d, const float *mean, const float *rstd, const float *weight, float *dweight,
        float *dbias);
    int (*layer_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t rows,
        int64_t d, const double *mean, const double *rstd, const double *weight,
        double *dweight, double *dbias);

    /* ---- group norm: (n, c, s), groups of c/groups contiguous channels --------------- */
    /* Statistics per (sample, group) over (c/groups)*s values; weight/bias per channel.
     * save_mean/save_rstd hold n*groups values. groups == c is instance norm. */
    int (*group_norm_forward_f32)(const float *x, float *y, int64_t n, int64_t c, int64_t s,
        int64_t groups, const float *weight, const float *bias, double eps, float *save_mean,
        float *save_rstd);
    int (*group_norm_forward_f64)(const double *x, double *y, int64_t n, int64_t c, int64_t s,
        int64_t groups, const double *weight, const double *bias, double eps, double *save_mean,
        double *save_rstd);
    int (*group_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t n,
        int64_t c, int64_t s, int64_t groups, const float *mean, const float *rstd,
        const float *weight, float *dweight, float *dbias);
    int (*group_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t n,
        int64_t c, int64_t s, int64_t groups, const double *mean, const double *rstd,
        const double *weight, double *dweight, double *dbias);
    /* Channels last: the same arguments and results as group_norm_forward/_backward
     * (n, c, s, groups; save_mean/save_rstd and mean/rstd n*groups values, weight, bias,
     * dweight, dbias c values), with x, y, dy, dx laid out (n, s, c): value (i, k, j) of
     * sample i, position k, channel j at [(i*s + k)*c + j]. No copy is made; y may be x,
     * dx may be dy or x. The results equal those of group_norm_* on the same values
     * laid out channels first to rounding (the sums run in another order; bit for bit
     * when s <= 1, where the two layouts are one), and are bitwise identical for any
     * number of threads. groups == c is instance norm. */
    int (*group_norm_channels_last_forward_f32)(const float *x, float *y, int64_t n, int64_t c,
        int64_t s, int64_t groups, const float *weight, const float *bias, double eps,
        float *save_mean, float *save_rstd);
    int (*group_norm_channels_last_forward_f64)(const double *x, double *y, int64_t n,
        int64_t c, int64_t s, int64_t groups, const double *weight, const double *bias,
        double eps, double *save_mean, double *save_rstd);
    int (*group_norm_channels_last_backward_f32)(const float *dy, const float *x, float *dx,
        int64_t n, int64_t c, int64_t s, int64_t groups, const float *mean, const float *rstd,
        const float *weight, float *dweight, float *dbias);
    int (*group_norm_channels_last_backward_f64)(const double *dy, const double *x, double *dx,
        int64_t n, int64_t c, int64_t s, int64_t groups, const double *mean, const double *rstd,
        const double *weight, double *dweight, double *dbias);

    /* ---- RMS norm: rows of d values -------------------------------------------------- */
    /* y = x*rstd_r*weight[k], rstd_r = 1/sqrt(mean_k(x²) + eps); weight and save_rstd
     * may be NULL. Backward: g = dy*weight, dx = rstd*(g - x*rstd²*mean_k(g*x)),
     * dweight = Σ_r dy*x*rstd. */
    int (*rms_norm_forward_f32)(const float *x, float *y, int64_t rows, int64_t d,
        const float *weight, double eps, float *save_rstd);
    int (*rms_norm_forward_f64)(const double *x, double *y, int64_t rows, int64_t d,
        const double *weight, double eps, double *save_rstd);
    int (*rms_norm_backward_f32)(const float *dy, const float *x, float *dx, int64_t rows,
        int64_t d, const float *rstd, const float *weight, float *dweight);
    int (*rms_norm_backward_f64)(const double *dy, const double *x, double *dx, int64_t rows,
        int64_t d, const double *rstd, const double *weight, double *dweight);

    /* ==== members of API version 3.1 ==== */
    int (*batch_norm_forward_train_bf16)(const bncpu_bf16 *x, bncpu_bf16 *y, int64_t n,
        int64_t c, int64_t s, const float *weight, const float *bias, float *running_mean,
        float *running_var, double momentum, double eps, float *save_mean, float *save_invstd,
        int unbiased);
    int (*batch_norm_forward_train_f16)(const bncpu_f16 *x, bncpu_f16 *y, int64_t n, int64_t c,
        int64_t s, const float *weight, const float *bias, float *running_mean,
        float *running_var, double momentum, double eps, float *save_mean, float *save_invstd,
        int unbiased);
    int (*batch_norm_forward_eval_bf16)(const bncpu_bf16 *x, bncpu_bf16 *y, int64_t n,
        int64_t c, int64_t s, const float *weight, const float *bias, const float *running_mean,
        const float *running_var, double eps);
    int (*batch_norm_forward_eval_f16)(const bncpu_f16 *x, bncpu_f16 *y, int64_t n, int64_t c,
        int64_t s, const float *weight, const float *bias, const float *running_mean,
        const float *running_var, double eps);
    int (*batch_norm_backward_bf16)(const bncpu_bf16 *dy, const bncpu_bf16 *x, bncpu_bf16 *dx,
        int64_t n, int64_t c, int64_t s, const float *weight, const float *running_mean,
        const float *running_var, const float *save_mean, const float *save_invstd,
        int training, double eps, float *dweight, float *dbias);
    int (*batch_norm_backward_f16)(const bncpu_f16 *dy, const bncpu_f16 *x, bncpu_f16 *dx,
        int64_t n, int64_t c, int64_t s, const float *weight, const float *running_mean,
        const float *running_var, const float *save_mean, const float *save_invstd,
        int training, double eps, float *dweight, float *dbias);
    int (*batch_norm_stats_bf16)(const bncpu_bf16 *x, int64_t n, int64_t c, int64_t s,
        double *mean, double *m2);
    int (*batch_norm_stats_f16)(const bncpu_f16 *x, int64_t n, int64_t c, int64_t s,
        double *mean, double *m2);
    int (*batch_norm_elemt_bf16)(const bncpu_bf16 *x, bncpu_bf16 *y, int64_t n, int64_t c,
        int64_t s, const double *mean, const double *invstd, const float *weight,
        const float *bias);
    int (*batch_norm_elemt_f16)(const bncpu_f16 *x, bncpu_f16 *y, int64_t n, int64_t c,
        int64_t s, const double *mean, const double *invstd, const float *weight,
        const float *bias);
    int (*batch_norm_backward_reduce_bf16)(const bncpu_bf16 *dy, const bncpu_bf16 *x, int64_t n,
        int64_t c, int64_t s, const double *mean, double *sum_dy, double *sum_dy_xmu);
    int (*batch_norm_backward_reduce_f16)(const bncpu_f16 *dy, const bncpu_f16 *x, int64_t n,
        int64_t c, int64_t s, const double *mean, double *sum_dy, double *sum_dy_xmu);
    int (*batch_norm_backward_elemt_bf16)(const bncpu_bf16 *dy, const bncpu_bf16 *x,
        bncpu_bf16 *dx, int64_t n, int64_t c, int64_t s, const double *mean,
        const double *invstd, const float *weight, const double *sum_dy,
        const double *sum_dy_xmu, int64_t count);
    int (*batch_norm_backward_elemt_f16)(const bncpu_f16 *dy, const bncpu_f16 *x, bncpu_f16 *dx,
        int64_t n, int64_t c, int64_t s, const double *mean, const double *invstd,
        const float *weight, const double *sum_dy, const double *sum_dy_xmu, int64_t count);
    int (*batch_norm_relu_forward_train_bf16)(const bncpu_bf16 *x, const bncpu_bf16 *residual,
        bncpu_bf16 *y, int64_t n, int64_t c, int64_t s, const float *weight, const float *bias,
        float *running_mean, float *running_var, double momentum, double eps, float *save_mean,
        float *save_invstd, int unbiased);
    int (*batch_norm_relu_forward_train_f16)(const bncpu_f16 *x, const bncpu_f16 *residual,
        bncpu_f16 *y, int64_t n, int64_t c, int64_t s, const float *weight, const float *bias,
        float *running_mean, float *running_var, double momentum, double eps, float *save_mean,
        float *save_invstd, int unbiased);
    int (*batch_norm_relu_forward_eval_bf16)(const bncpu_bf16 *x, const bncpu_bf16 *residual,
        bncpu_bf16 *y, int64_t n, int64_t c, int64_t s, const float *weight, const float *bias,
        const float *running_mean, const float *running_var, double eps);
    int (*batch_norm_relu_forward_eval_f16)(const bncpu_f16 *x, const bncpu_f16 *residual,
        bncpu_f16 *y, int64_t n, int64_t c, int64_t s, const float *weight, const float *bias,
        const float *running_mean, const float *running_var, double eps);
} bncpu_api;
/* ---- end of the generated table ---- */

/* ==================================================================================
 * Importing the table, and calling through it
 * ================================================================================== */

/* This translation unit's table: NULL until bncpu_import() succeeds. */
static const bncpu_api *bncpu_api_table = NULL;

/* What bncpu_import() and bncpu_finalize() remember in this translation unit. */
static struct {
    PyThreadState *interpreter_thread; /* non-NULL: this unit's bncpu_import() started the
                                          interpreter and released the GIL with this state */
    int attempted;                     /* bncpu_import() has been called */
    int finalized;                     /* bncpu_finalize() ended the interpreter */
    char error[1024];                  /* why the last bncpu_import() failed, "" if it did not */
} bncpu_import_state_;

/* The message of a status code (any int); usable before bncpu_import(). */
static inline const char *bncpu_strerror(int status)
{
    switch (status) {
    case BNCPU_OK: return "success";
    case BNCPU_ERR_NULL_POINTER: return "a required pointer argument is NULL";
    case BNCPU_ERR_BAD_SIZE: return "a size is negative or too large, or the sizes disagree";
    case BNCPU_ERR_ONE_VALUE: return "expected more than 1 value per channel when training";
    case BNCPU_ERR_BAD_EPS: return "eps must be finite and >= 0";
    case BNCPU_ERR_BAD_MOMENTUM: return "momentum must be in [0, 1]";
    case BNCPU_ERR_ALIASED_STATS: return "running_mean and running_var must be different arrays";
    case BNCPU_ERR_BAD_GROUPS:
        return "the number of channels must be divisible by the number of groups (>= 1)";
    case BNCPU_ERR_NO_MEMORY: return "out of memory for a temporary buffer";
    case BNCPU_ERR_NOT_IMPORTED: return "bncpu_import() has not succeeded";
    case BNCPU_ERR_IMPORT: return "the bncpu Python package could not be imported";
    case BNCPU_ERR_ALIASED:
        return "two outputs, or an output and an input it may not alias, share memory";
    default: return "unknown bncpu status";
    }
}

/* Record the pending Python exception as "context: Type: message" and clear it. */
static inline void bncpu_record_python_error_(const char *context)
{
    PyObject *type, *value, *traceback = NULL, *text = NULL;
    const char *message = NULL, *executable = NULL;
#if PY_VERSION_HEX >= 0x030C0000
    value = PyErr_GetRaisedException();
    type = value != NULL ? (PyObject *)Py_NewRef(Py_TYPE(value)) : NULL;
#else
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
#endif
    if (value != NULL && (text = PyObject_Str(value)) != NULL)
        message = PyUnicode_AsUTF8(text);
    if (type != NULL && PyErr_GivenExceptionMatches(type, PyExc_ImportError)) {
        /* The usual cause: the interpreter runs another environment than the one holding bncpu. */
        PyObject *sys_executable = PySys_GetObject("executable");
        if (sys_executable != NULL && PyUnicode_Check(sys_executable))
            executable = PyUnicode_AsUTF8(sys_executable);
    }
    PyErr_Clear();
    snprintf(bncpu_import_state_.error, sizeof bncpu_import_state_.error, "%s: %s: %s%s%s%s",
             context, type != NULL ? ((PyTypeObject *)type)->tp_name : "error",
             message != NULL ? message : "(no message)",
             executable != NULL ? " (Python is " : "", executable != NULL ? executable : "",
             executable != NULL ? "; set BNCPU_PYTHON to the python of the environment "
                                  "where bncpu is installed)" : "");
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* Start an embedded interpreter for a program that has none; 0 on success (GIL held). */
static inline int bncpu_start_interpreter_(void)
{
    PyPreConfig preconfig;
    PyConfig config;
    PyStatus status;
    const char *python = getenv("BNCPU_PYTHON");
#ifdef BNCPU_PYTHON_EXECUTABLE
    if (python == NULL || python[0] == '\0')
        python = BNCPU_PYTHON_EXECUTABLE;
#endif
    /* The host program keeps its locale: Python would otherwise set LC_CTYPE (and may
     * coerce a C locale to C.UTF-8 in the environment). */
    PyPreConfig_InitPythonConfig(&preconfig);
    preconfig.configure_locale = 0;
    status = Py_PreInitialize(&preconfig);
    if (!PyStatus_Exception(status)) {
        PyConfig_InitPythonConfig(&config);
        /* The host program keeps its signal handlers (Ctrl-C, SIGPIPE). */
        config.install_signal_handlers = 0;
        /* Python derives sys.prefix, hence site-packages, from its executable: naming a
         * virtual environment's python selects that environment (its pyvenv.cfg). */
        if (python != NULL && python[0] != '\0')
            status = PyConfig_SetBytesString(&config, &config.program_name, python);
        if (!PyStatus_Exception(status))
            status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
    }
    if (PyStatus_Exception(status)) {
        snprintf(bncpu_import_state_.error, sizeof bncpu_import_state_.error,
                 "starting the embedded Python interpreter failed: %s%s%s",
                 status.func != NULL ? status.func : "", status.func != NULL ? ": " : "",
                 status.err_msg != NULL ? status.err_msg : "unknown error");
        return -1;
    }
    return 0;
}

/* Python that bncpu_import() runs in an interpreter it started: it loads only what fills
 * the table (bncpu._dispatch, bncpu._capi, bncpu._threads, the kernel modules), none of
 * which imports NumPy, by registering the package without running its __init__.py (the
 * NumPy API: most of the start-up time). Once they are loaded, the package completes
 * itself (runs __init__.py) the first time an attribute it lacks is read, so Python code
 * that imports bncpu later in this interpreter gets the whole package. */
static const char bncpu_table_loader_[] =
    "import importlib.util, sys\n"
    "spec = importlib.util.find_spec('bncpu')\n"
    "if spec is None:\n"
    "    raise ModuleNotFoundError(\"No module named 'bncpu'\", name='bncpu')\n"
    "package = importlib.util.module_from_spec(spec)\n"
    "def complete(name):\n"
    "    del package.__getattr__\n"
    "    spec.loader.exec_module(package)\n"
    "    return getattr(package, name)\n"
    "sys.modules['bncpu'] = package\n"
    "try:\n"
    "    importlib.import_module('bncpu._dispatch')\n"
    "except BaseException:\n"
    "    del sys.modules['bncpu']\n"
    "    raise\n"
    "package.__getattr__ = complete\n";

/* Import what publishes the table (GIL held): 0, or -1 with a Python exception set. An
 * interpreter bncpu_import() started runs bncpu_table_loader_; a running one imports the
 * package, as its Python code would. */
static inline int bncpu_load_table_modules_(int started)
{
    PyObject *globals, *result = NULL;
    if (!started) {
        result = PyImport_ImportModule("bncpu");
    } else if ((globals = PyDict_New()) != NULL) {
        if (PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins()) == 0)
            result = PyRun_String(bncpu_table_loader_, Py_file_input, globals, globals);
        Py_DECREF(globals);
    }
    Py_XDECREF(result);
    return result != NULL ? 0 : -1;
}

/* Load the kernels: BNCPU_OK, or BNCPU_ERR_IMPORT with the reason in bncpu_import_error().
 * After this unit's bncpu_finalize() ended the interpreter, it returns BNCPU_ERR_IMPORT
 * at once (see bncpu_finalize()).
 *
 * Standalone program (no interpreter yet): starts one (see BNCPU_PYTHON at the top),
 * loads the modules that fill the table (not NumPy), and returns with the GIL released,
 * so that kernels may then be called from any thread. Call it once, before starting
 * threads that use bncpu.
 * Python extension module or embedding program (an interpreter runs): imports bncpu
 * using the running interpreter; the calling thread may or may not hold the GIL.
 * Each translation unit has its own table: call bncpu_import() in each one that calls
 * kernels (after the first, a call costs a dictionary lookup). Once it has succeeded,
 * further calls return BNCPU_OK at once.
 * The package must have the API version of this header: the same major version and a
 * minor version at least this header's (a later package of the same major version
 * serves programs compiled against an earlier header). */
static inline int bncpu_import(void)
{
    const bncpu_api *table = NULL;
    PyGILState_STATE gil = PyGILState_UNLOCKED;
    int started = 0;
    if (bncpu_api_table != NULL)
        return BNCPU_OK;
    bncpu_import_state_.attempted = 1;
    bncpu_import_state_.error[0] = '\0';
    if (bncpu_import_state_.finalized) {
        /* The compiled modules (and NumPy) cannot be initialized a second time in one
         * process: refuse with the reason rather than fail with an unrelated error. */
        snprintf(bncpu_import_state_.error, sizeof bncpu_import_state_.error,
                 "bncpu_import() after bncpu_finalize(): the embedded Python interpreter "
                 "cannot be started twice in one process (bncpu's compiled modules cannot be "
                 "loaded again); call bncpu_finalize() once, at the end of the program");
        return BNCPU_ERR_IMPORT;
    }
    if (!Py_IsInitialized()) {
        if (bncpu_start_interpreter_() != 0)
            return BNCPU_ERR_IMPORT;
        started = 1;
    } else {
        gil = PyGILState_Ensure();
    }
    /* The modules are imported on their own first, because PyCapsule_Import would
     * replace the reason of a failure with a generic message. */
    if (bncpu_load_table_modules_(started) == 0)
        table = (const bncpu_api *)PyCapsule_Import("bncpu._capi._C_API", 0);
    if (table == NULL) {
        bncpu_record_python_error_("import bncpu failed");
    } else if (table->api_version_major != BNCPU_API_VERSION_MAJOR
               || table->api_version_minor < BNCPU_API_VERSION_MINOR) {
        snprintf(bncpu_import_state_.error, sizeof bncpu_import_state_.error,
                 "bncpu.h is for API version %d.%d but the bncpu package %s provides version "
                 "%d.%d (it must have the same major version and at least the minor one): "
                 "compile against the header of the installed package (bncpu.get_include())",
                 BNCPU_API_VERSION_MAJOR, BNCPU_API_VERSION_MINOR, table->version,
                 table->api_version_major, table->api_version_minor);
        table = NULL;
    }
    if (started)
        bncpu_import_state_.interpreter_thread = PyEval_SaveThread();
    else
        PyGILState_Release(gil);
    bncpu_api_table = table;
    return table != NULL ? BNCPU_OK : BNCPU_ERR_IMPORT;
}

/* Why the last bncpu_import() of this translation unit failed ("" if it succeeded). */
static inline const char *bncpu_import_error(void)
{
    return bncpu_import_state_.attempted ? bncpu_import_state_.error
                                         : "bncpu_import() has not been called";
}

/* End of use, for programs whose bncpu_import() started the interpreter: finalizes that
 * interpreter (so leak checkers see its memory returned) and forgets the table. Call it
 * once, from the thread that called bncpu_import(), after every kernel call of every
 * thread has returned. No kernel may be called afterwards: the macros of this unit
 * return BNCPU_ERR_NOT_IMPORTED, but a table pointer kept elsewhere would call code
 * whose interpreter is gone. Python cannot be started again in the same process
 * (bncpu's compiled modules cannot be loaded twice): a later bncpu_import() of this unit
 * returns BNCPU_ERR_IMPORT, bncpu_import_error() saying why; in another unit it fails
 * too. Where the interpreter was already running (an extension module), it only forgets
 * the table and leaves the interpreter alone: bncpu_import() works again afterwards. */
static inline void bncpu_finalize(void)
{
    bncpu_api_table = NULL;
    if (bncpu_import_state_.interpreter_thread != NULL) {
        PyEval_RestoreThread(bncpu_import_state_.interpreter_thread);
        bncpu_import_state_.interpreter_thread = NULL;
        bncpu_import_state_.finalized = 1;
        Py_FinalizeEx();
    }
}

/* Version of the loaded bncpu package, or of this header before bncpu_import(). */
static inline const char *bncpu_version(void)
{
    return bncpu_api_table != NULL ? bncpu_api_table->version : BNCPU_VERSION_STRING;
}

/* Instruction set the loaded kernels use ("avx512", "avx2", "baseline"); "" before import. */
static inline const char *bncpu_isa(void)
{
    return bncpu_api_table != NULL ? bncpu_api_table->isa : "";
}

/* Threads a large kernel call will use (process-wide setting); 0 before bncpu_import().
 * At most 4 per CPU available to the process (at least 16), and 1 in a process created by
 * fork(): GNU OpenMP's threads do not survive a fork, so a forked child runs single-threaded. */
static inline int bncpu_get_num_threads(void)
{
    return bncpu_api_table != NULL ? bncpu_api_table->get_num_threads() : 0;
}

/* Use n threads in every later call of this process (n >= 1), or OpenMP's default
 * (n == 0: OMP_NUM_THREADS or the number of cores), lowered to the cap that
 * bncpu_get_num_threads() describes. The same setting as Python's bncpu.set_num_threads.
 * n < 0 is BNCPU_ERR_BAD_SIZE. */
static inline int bncpu_set_num_threads(int n)
{
    if (bncpu_api_table == NULL)
        return BNCPU_ERR_NOT_IMPORTED;
    if (n < 0)
        return BNCPU_ERR_BAD_SIZE;
    bncpu_api_table->set_num_threads(n);
    return BNCPU_OK;
}

/* The kernels: bncpu_<entry>(arguments) calls the table's <entry> (documented in the
 * struct above) and returns its status, or BNCPU_ERR_NOT_IMPORTED without evaluating
 * the arguments when bncpu_import() has not succeeded in this translation unit or the
 * loaded package lacks the entry. */
#define BNCPU_CALL_(entry, ...) \
    ((bncpu_api_table != NULL && bncpu_api_table->entry != NULL) \
         ? bncpu_api_table->entry(__VA_ARGS__) : (int)BNCPU_ERR_NOT_IMPORTED)

/* ---- the kernels' macros: generated from bncpu/_kernels/manifest.py ---- */
#define bncpu_batch_norm_forward_train_f32(...) BNCPU_CALL_(batch_norm_forward_train_f32, __VA_ARGS__)
#define bncpu_batch_norm_forward_train_f64(...) BNCPU_CALL_(batch_norm_forward_train_f64, __VA_ARGS__)
#define bncpu_batch_norm_forward_eval_f32(...) BNCPU_CALL_(batch_norm_forward_eval_f32, __VA_ARGS__)
#define bncpu_batch_norm_forward_eval_f64(...) BNCPU_CALL_(batch_norm_forward_eval_f64, __VA_ARGS__)
#define bncpu_batch_norm_backward_f32(...) BNCPU_CALL_(batch_norm_backward_f32, __VA_ARGS__)
#define bncpu_batch_norm_backward_f64(...) BNCPU_CALL_(batch_norm_backward_f64, __VA_ARGS__)
#define bncpu_batch_norm_stats_f32(...) BNCPU_CALL_(batch_norm_stats_f32, __VA_ARGS__)
#define bncpu_batch_norm_stats_f64(...) BNCPU_CALL_(batch_norm_stats_f64, __VA_ARGS__)
#define bncpu_batch_norm_gather_stats_f32(...) BNCPU_CALL_(batch_norm_gather_stats_f32, __VA_ARGS__)
#define bncpu_batch_norm_gather_stats_f64(...) BNCPU_CALL_(batch_norm_gather_stats_f64, __VA_ARGS__)
#define bncpu_batch_norm_elemt_f32(...) BNCPU_CALL_(batch_norm_elemt_f32, __VA_ARGS__)
#define bncpu_batch_norm_elemt_f64(...) BNCPU_CALL_(batch_norm_elemt_f64, __VA_ARGS__)
#define bncpu_batch_norm_backward_reduce_f32(...) BNCPU_CALL_(batch_norm_backward_reduce_f32, __VA_ARGS__)
#define bncpu_batch_norm_backward_reduce_f64(...) BNCPU_CALL_(batch_norm_backward_reduce_f64, __VA_ARGS__)
#define bncpu_batch_norm_backward_elemt_f32(...) BNCPU_CALL_(batch_norm_backward_elemt_f32, __VA_ARGS__)
#define bncpu_batch_norm_backward_elemt_f64(...) BNCPU_CALL_(batch_norm_backward_elemt_f64, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_train_f32(...) BNCPU_CALL_(batch_norm_relu_forward_train_f32, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_train_f64(...) BNCPU_CALL_(batch_norm_relu_forward_train_f64, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_eval_f32(...) BNCPU_CALL_(batch_norm_relu_forward_eval_f32, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_eval_f64(...) BNCPU_CALL_(batch_norm_relu_forward_eval_f64, __VA_ARGS__)
#define bncpu_batch_norm_relu_backward_f32(...) BNCPU_CALL_(batch_norm_relu_backward_f32, __VA_ARGS__)
#define bncpu_batch_norm_relu_backward_f64(...) BNCPU_CALL_(batch_norm_relu_backward_f64, __VA_ARGS__)
#define bncpu_layer_norm_forward_f32(...) BNCPU_CALL_(layer_norm_forward_f32, __VA_ARGS__)
#define bncpu_layer_norm_forward_f64(...) BNCPU_CALL_(layer_norm_forward_f64, __VA_ARGS__)
#define bncpu_layer_norm_backward_f32(...) BNCPU_CALL_(layer_norm_backward_f32, __VA_ARGS__)
#define bncpu_layer_norm_backward_f64(...) BNCPU_CALL_(layer_norm_backward_f64, __VA_ARGS__)
#define bncpu_group_norm_forward_f32(...) BNCPU_CALL_(group_norm_forward_f32, __VA_ARGS__)
#define bncpu_group_norm_forward_f64(...) BNCPU_CALL_(group_norm_forward_f64, __VA_ARGS__)
#define bncpu_group_norm_backward_f32(...) BNCPU_CALL_(group_norm_backward_f32, __VA_ARGS__)
#define bncpu_group_norm_backward_f64(...) BNCPU_CALL_(group_norm_backward_f64, __VA_ARGS__)
#define bncpu_group_norm_channels_last_forward_f32(...) BNCPU_CALL_(group_norm_channels_last_forward_f32, __VA_ARGS__)
#define bncpu_group_norm_channels_last_forward_f64(...) BNCPU_CALL_(group_norm_channels_last_forward_f64, __VA_ARGS__)
#define bncpu_group_norm_channels_last_backward_f32(...) BNCPU_CALL_(group_norm_channels_last_backward_f32, __VA_ARGS__)
#define bncpu_group_norm_channels_last_backward_f64(...) BNCPU_CALL_(group_norm_channels_last_backward_f64, __VA_ARGS__)
#define bncpu_rms_norm_forward_f32(...) BNCPU_CALL_(rms_norm_forward_f32, __VA_ARGS__)
#define bncpu_rms_norm_forward_f64(...) BNCPU_CALL_(rms_norm_forward_f64, __VA_ARGS__)
#define bncpu_rms_norm_backward_f32(...) BNCPU_CALL_(rms_norm_backward_f32, __VA_ARGS__)
#define bncpu_rms_norm_backward_f64(...) BNCPU_CALL_(rms_norm_backward_f64, __VA_ARGS__)
#define bncpu_batch_norm_forward_train_bf16(...) BNCPU_CALL_(batch_norm_forward_train_bf16, __VA_ARGS__)
#define bncpu_batch_norm_forward_train_f16(...) BNCPU_CALL_(batch_norm_forward_train_f16, __VA_ARGS__)
#define bncpu_batch_norm_forward_eval_bf16(...) BNCPU_CALL_(batch_norm_forward_eval_bf16, __VA_ARGS__)
#define bncpu_batch_norm_forward_eval_f16(...) BNCPU_CALL_(batch_norm_forward_eval_f16, __VA_ARGS__)
#define bncpu_batch_norm_backward_bf16(...) BNCPU_CALL_(batch_norm_backward_bf16, __VA_ARGS__)
#define bncpu_batch_norm_backward_f16(...) BNCPU_CALL_(batch_norm_backward_f16, __VA_ARGS__)
#define bncpu_batch_norm_stats_bf16(...) BNCPU_CALL_(batch_norm_stats_bf16, __VA_ARGS__)
#define bncpu_batch_norm_stats_f16(...) BNCPU_CALL_(batch_norm_stats_f16, __VA_ARGS__)
#define bncpu_batch_norm_elemt_bf16(...) BNCPU_CALL_(batch_norm_elemt_bf16, __VA_ARGS__)
#define bncpu_batch_norm_elemt_f16(...) BNCPU_CALL_(batch_norm_elemt_f16, __VA_ARGS__)
#define bncpu_batch_norm_backward_reduce_bf16(...) BNCPU_CALL_(batch_norm_backward_reduce_bf16, __VA_ARGS__)
#define bncpu_batch_norm_backward_reduce_f16(...) BNCPU_CALL_(batch_norm_backward_reduce_f16, __VA_ARGS__)
#define bncpu_batch_norm_backward_elemt_bf16(...) BNCPU_CALL_(batch_norm_backward_elemt_bf16, __VA_ARGS__)
#define bncpu_batch_norm_backward_elemt_f16(...) BNCPU_CALL_(batch_norm_backward_elemt_f16, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_train_bf16(...) BNCPU_CALL_(batch_norm_relu_forward_train_bf16, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_train_f16(...) BNCPU_CALL_(batch_norm_relu_forward_train_f16, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_eval_bf16(...) BNCPU_CALL_(batch_norm_relu_forward_eval_bf16, __VA_ARGS__)
#define bncpu_batch_norm_relu_forward_eval_f16(...) BNCPU_CALL_(batch_norm_relu_forward_eval_f16, __VA_ARGS__)
/* ---- end of the generated macros ---- */

#ifdef __cplusplus
}
#endif
#endif /* BNCPU_H */
