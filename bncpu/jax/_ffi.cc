// bncpu.jax._ffi: XLA FFI handlers that run bncpu's kernels inside a jitted JAX program.
//
// The module is a CPython extension so that its init function can load bncpu's kernel
// table (bncpu_import() inside a running interpreter, as examples/c/bn_extension.c does);
// it hands Python one capsule per handler, which bncpu/jax/_ops.py registers with
// jax.ffi.register_ffi_target. The handlers never touch Python.
//
// Every handler takes float32 or float64 buffers (one dtype per call, checked) and the
// sizes as attributes, computed in Python from the static shapes. An optional argument
// (weight, bias, running statistics) is passed as an array of no elements when absent,
// and reaches the kernel as NULL, as the NumPy API passes it.
#include "bncpu.h" /* includes Python.h, which must come first */

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The table's entries for one data type, as pointers to members of bncpu_api.
template <typename T> struct Entries;
template <> struct Entries<float> {
    static constexpr auto bn_train = &bncpu_api::batch_norm_forward_train_f32;
    static constexpr auto bn_eval = &bncpu_api::batch_norm_forward_eval_f32;
    static constexpr auto bn_backward = &bncpu_api::batch_norm_backward_f32;
    static constexpr auto group_forward = &bncpu_api::group_norm_forward_f32;
    static constexpr auto group_backward = &bncpu_api::group_norm_backward_f32;
    static constexpr auto group_last_forward = &bncpu_api::group_norm_channels_last_forward_f32;
    static constexpr auto group_last_backward = &bncpu_api::group_norm_channels_last_backward_f32;
    static constexpr auto rms_forward = &bncpu_api::rms_norm_forward_f32;
    static constexpr auto rms_backward = &bncpu_api::rms_norm_backward_f32;
};
template <> struct Entries<double> {
    static constexpr auto bn_train = &bncpu_api::batch_norm_forward_train_f64;
    static constexpr auto bn_eval = &bncpu_api::batch_norm_forward_eval_f64;
    static constexpr auto bn_backward = &bncpu_api::batch_norm_backward_f64;
    static constexpr auto group_forward = &bncpu_api::group_norm_forward_f64;
    static constexpr auto group_backward = &bncpu_api::group_norm_backward_f64;
    static constexpr auto group_last_forward = &bncpu_api::group_norm_channels_last_forward_f64;
    static constexpr auto group_last_backward = &bncpu_api::group_norm_channels_last_backward_f64;
    static constexpr auto rms_forward = &bncpu_api::rms_norm_forward_f64;
    static constexpr auto rms_backward = &bncpu_api::rms_norm_backward_f64;
};

// Group-norm layouts (the `layout` attribute), the branches of bncpu/_row_norm.py.
enum Layout : int64_t {
    kChannelsFirst = 0,  // (n, c, s) rows; layer norm is (rows, d, 1, 1)
    kChannelsLast = 1,   // (n, s, c), the channels-last entries
    kInstances = 2,      // groups == c: each sample as the (outer, c, inner) input of batch norm
};

// A zero-sized buffer may come with a null data pointer; the kernels reject a null
// required pointer, so those get an address that is never read.
void *required(ffi::AnyBuffer buffer)
{
    static double nothing;
    void *data = buffer.untyped_data();
    return data != nullptr ? data : &nothing;
}
void *required(ffi::Result<ffi::AnyBuffer> buffer) { return required(*buffer); }

template <typename T> T *data(ffi::AnyBuffer buffer) { return static_cast<T *>(required(buffer)); }
template <typename T> T *data(ffi::Result<ffi::AnyBuffer> buffer) { return data<T>(*buffer); }

// An optional argument: NULL when absent (no elements).
template <typename T> T *optional(ffi::AnyBuffer buffer)
{
    return buffer.element_count() == 0 ? nullptr : data<T>(buffer);
}
template <typename T> T *optional(ffi::Result<ffi::AnyBuffer> buffer) { return optional<T>(*buffer); }

ffi::Error status_error(int status)
{
    if (status == BNCPU_OK)
        return ffi::Error::Success();
    return ffi::Error::InvalidArgument(std::string("bncpu: ") + bncpu_strerror(status));
}

// Runs f<float> or f<double> on the dtype of `x` (every other data buffer matches it:
// bncpu/jax/_ops.py casts them).
template <template <typename> class F, typename... Args>
ffi::Error dispatch(ffi::AnyBuffer x, Args &&...args)
{
    if (bncpu_api_table == nullptr)
        return ffi::Error::Internal("bncpu's kernel table is not loaded");
    switch (x.element_type()) {
    case ffi::DataType::F32: return F<float>::run(x, std::forward<Args>(args)...);
    case ffi::DataType::F64: return F<double>::run(x, std::forward<Args>(args)...);
    default: return ffi::Error::InvalidArgument("bncpu: expected float32 or float64 data");
    }
}

// ---- batch norm ----------------------------------------------------------------------
// Training: the running statistics are copied to their outputs, which the kernel then
// updates in place. Evaluation: the running statistics pass through and save_mean,
// save_invstd are empty, as in bncpu.batch_norm_forward.
template <typename T> struct BatchNormForward {
    static ffi::Error run(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                          ffi::AnyBuffer running_mean, ffi::AnyBuffer running_var,
                          ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> new_mean,
                          ffi::Result<ffi::AnyBuffer> new_var, ffi::Result<ffi::AnyBuffer> save_mean,
                          ffi::Result<ffi::AnyBuffer> save_invstd, int64_t n, int64_t c, int64_t s,
                          bool training, double momentum, double eps, bool unbiased)
    {
        if (running_mean.element_count() != 0) {
            std::memcpy(required(new_mean), required(running_mean), running_mean.size_bytes());
            std::memcpy(required(new_var), required(running_var), running_var.size_bytes());
        }
        int status;
        if (training) {
            status = (bncpu_api_table->*Entries<T>::bn_train)(
                data<T>(x), data<T>(y), n, c, s, optional<T>(weight), optional<T>(bias),
                optional<T>(new_mean), optional<T>(new_var), momentum, eps, data<T>(save_mean),
                data<T>(save_invstd), unbiased ? 1 : 0);
        } else {
            status = (bncpu_api_table->*Entries<T>::bn_eval)(
                data<T>(x), data<T>(y), n, c, s, optional<T>(weight), optional<T>(bias),
                data<T>(running_mean), data<T>(running_var), eps);
        }
        return status_error(status);
    }
};

// dweight and dbias are always computed (the bias may be given without a weight).
template <typename T> struct BatchNormBackward {
    static ffi::Error run(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer weight,
                          ffi::AnyBuffer running_mean, ffi::AnyBuffer running_var,
                          ffi::AnyBuffer save_mean, ffi::AnyBuffer save_invstd,
                          ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweight,
                          ffi::Result<ffi::AnyBuffer> dbias, int64_t n, int64_t c, int64_t s,
                          bool training, double eps)
    {
        return status_error((bncpu_api_table->*Entries<T>::bn_backward)(
            data<T>(dy), data<T>(x), data<T>(dx), n, c, s, optional<T>(weight),
            optional<T>(running_mean), optional<T>(running_var), optional<T>(save_mean),
            optional<T>(save_invstd), training ? 1 : 0, eps, data<T>(dweight), data<T>(dbias)));
    }
};

// ---- group norm (and layer norm as one group of s = 1) ---------------------------------
template <typename T> struct GroupNormForward {
    static ffi::Error run(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                          ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                          ffi::Result<ffi::AnyBuffer> rstd, int64_t n, int64_t c, int64_t s,
                          int64_t groups, int64_t layout, int64_t outer, int64_t inner, double eps)
    {
        const T *w = optional<T>(weight), *b = optional<T>(bias);
        if (layout != kInstances) {
            auto entry = layout == kChannelsLast ? Entries<T>::group_last_forward
                                                 : Entries<T>::group_forward;
            return status_error((bncpu_api_table->*entry)(data<T>(x), data<T>(y), n, c, s, groups,
                                                           w, b, eps, data<T>(mean), data<T>(rstd)));
        }
        // Instance norm of channels-last data: per sample, batch norm's per-channel
        // statistics are the per-instance ones (bncpu/_row_norm.py does the same).
        const int64_t sample = outer * c * inner;
        for (int64_t i = 0; i < n; i++) {
            int status = (bncpu_api_table->*Entries<T>::bn_train)(
                data<T>(x) + i * sample, data<T>(y) + i * sample, outer, c, inner, w, b, nullptr,
                nullptr, 0.0, eps, data<T>(mean) + i * c, data<T>(rstd) + i * c, 1);
            if (status != BNCPU_OK)
                return status_error(status);
        }
        if (outer * inner == 0) {  // empty instances: rstd NaN, as the row kernels give it
            T *r = data<T>(rstd);
            for (int64_t k = 0; k < n * c; k++)
                r[k] = std::numeric_limits<T>::quiet_NaN();
        }
        return ffi::Error::Success();
    }
};

template <typename T> struct GroupNormBackward {
    static ffi::Error run(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                          ffi::AnyBuffer rstd, ffi::AnyBuffer weight,
                          ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweight,
                          ffi::Result<ffi::AnyBuffer> dbias, int64_t n, int64_t c, int64_t s,
                          int64_t groups, int64_t layout, int64_t outer, int64_t inner)
    {
        const T *w = optional<T>(weight);
        if (layout != kInstances) {
            auto entry = layout == kChannelsLast ? Entries<T>::group_last_backward
                                                 : Entries<T>::group_backward;
            return status_error((bncpu_api_table->*entry)(
                data<T>(dy), data<T>(x), data<T>(dx), n, c, s, groups, data<T>(mean),
                data<T>(rstd), w, data<T>(dweight), data<T>(dbias)));
        }
        // Per-sample parameter gradients, summed over the samples in double in sample
        // order, as bncpu/_row_norm.py sums them (NumPy's sum along a non-contiguous axis).
        const int64_t sample = outer * c * inner;
        std::vector<T> sample_grads(static_cast<size_t>(2 * n * c), T(0));
        for (int64_t i = 0; i < n; i++) {
            int status = (bncpu_api_table->*Entries<T>::bn_backward)(
                data<T>(dy) + i * sample, data<T>(x) + i * sample, data<T>(dx) + i * sample, outer,
                c, inner, w, nullptr, nullptr, data<T>(mean) + i * c, data<T>(rstd) + i * c, 1, 0.0,
                sample_grads.data() + i * c, sample_grads.data() + (n + i) * c);
            if (status != BNCPU_OK)
                return status_error(status);
        }
        T *gw = data<T>(dweight), *gb = data<T>(dbias);
        for (int64_t j = 0; j < c; j++) {
            double sum_w = 0.0, sum_b = 0.0;
            for (int64_t i = 0; i < n; i++) {
                sum_w += static_cast<double>(sample_grads[i * c + j]);
                sum_b += static_cast<double>(sample_grads[(n + i) * c + j]);
            }
            gw[j] = static_cast<T>(sum_w);
            gb[j] = static_cast<T>(sum_b);
        }
        return ffi::Error::Success();
    }
};

// ---- RMS norm ------------------------------------------------------------------------
template <typename T> struct RmsNormForward {
    static ffi::Error run(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> y,
                          ffi::Result<ffi::AnyBuffer> rstd, int64_t rows, int64_t d, double eps)
    {
        return status_error((bncpu_api_table->*Entries<T>::rms_forward)(
            data<T>(x), data<T>(y), rows, d, optional<T>(weight), eps, data<T>(rstd)));
    }
};

template <typename T> struct RmsNormBackward {
    static ffi::Error run(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer rstd,
                          ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> dx,
                          ffi::Result<ffi::AnyBuffer> dweight, int64_t rows, int64_t d)
    {
        return status_error((bncpu_api_table->*Entries<T>::rms_backward)(
            data<T>(dy), data<T>(x), data<T>(dx), rows, d, data<T>(rstd), optional<T>(weight),
            data<T>(dweight)));
    }
};

ffi::Error batch_norm_forward(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                              ffi::AnyBuffer running_mean, ffi::AnyBuffer running_var,
                              ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> new_mean,
                              ffi::Result<ffi::AnyBuffer> new_var,
                              ffi::Result<ffi::AnyBuffer> save_mean,
                              ffi::Result<ffi::AnyBuffer> save_invstd, int64_t n, int64_t c,
                              int64_t s, bool training, double momentum, double eps, bool unbiased)
{
    return dispatch<BatchNormForward>(x, weight, bias, running_mean, running_var, y, new_mean,
                                      new_var, save_mean, save_invstd, n, c, s, training, momentum,
                                      eps, unbiased);
}

ffi::Error batch_norm_backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer weight,
                               ffi::AnyBuffer running_mean, ffi::AnyBuffer running_var,
                               ffi::AnyBuffer save_mean, ffi::AnyBuffer save_invstd,
                               ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweight,
                               ffi::Result<ffi::AnyBuffer> dbias, int64_t n, int64_t c, int64_t s,
                               bool training, double eps)
{
    return dispatch<BatchNormBackward>(x, dy, weight, running_mean, running_var, save_mean,
                                       save_invstd, dx, dweight, dbias, n, c, s, training, eps);
}

ffi::Error group_norm_forward(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::AnyBuffer bias,
                              ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                              ffi::Result<ffi::AnyBuffer> rstd, int64_t n, int64_t c, int64_t s,
                              int64_t groups, int64_t layout, int64_t outer, int64_t inner,
                              double eps)
{
    return dispatch<GroupNormForward>(x, weight, bias, y, mean, rstd, n, c, s, groups, layout,
                                      outer, inner, eps);
}

ffi::Error group_norm_backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer mean,
                               ffi::AnyBuffer rstd, ffi::AnyBuffer weight,
                               ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dweight,
                               ffi::Result<ffi::AnyBuffer> dbias, int64_t n, int64_t c, int64_t s,
                               int64_t groups, int64_t layout, int64_t outer, int64_t inner)
{
    return dispatch<GroupNormBackward>(x, dy, mean, rstd, weight, dx, dweight, dbias, n, c, s,
                                       groups, layout, outer, inner);
}

ffi::Error rms_norm_forward(ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> y,
                            ffi::Result<ffi::AnyBuffer> rstd, int64_t rows, int64_t d, double eps)
{
    return dispatch<RmsNormForward>(x, weight, y, rstd, rows, d, eps);
}

ffi::Error rms_norm_backward(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer rstd,
                             ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> dx,
                             ffi::Result<ffi::AnyBuffer> dweight, int64_t rows, int64_t d)
{
    return dispatch<RmsNormBackward>(x, dy, rstd, weight, dx, dweight, rows, d);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BncpuBatchNormForward, batch_norm_forward,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
        .Attr<int64_t>("n").Attr<int64_t>("c").Attr<int64_t>("s").Attr<bool>("training")
        .Attr<double>("momentum").Attr<double>("eps").Attr<bool>("unbiased"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BncpuBatchNormBackward, batch_norm_backward,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
        .Attr<int64_t>("n").Attr<int64_t>("c").Attr<int64_t>("s").Attr<bool>("training")
        .Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BncpuGroupNormForward, group_norm_forward,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
        .Attr<int64_t>("n").Attr<int64_t>("c").Attr<int64_t>("s").Attr<int64_t>("groups")
        .Attr<int64_t>("layout").Attr<int64_t>("outer").Attr<int64_t>("inner")
        .Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BncpuGroupNormBackward, group_norm_backward,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
        .Attr<int64_t>("n").Attr<int64_t>("c").Attr<int64_t>("s").Attr<int64_t>("groups")
        .Attr<int64_t>("layout").Attr<int64_t>("outer").Attr<int64_t>("inner"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BncpuRmsNormForward, rms_norm_forward,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
        .Attr<int64_t>("rows").Attr<int64_t>("d").Attr<double>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BncpuRmsNormBackward, rms_norm_backward,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
        .Attr<int64_t>("rows").Attr<int64_t>("d"));

// ---- the Python module: targets() -> {name: capsule} ---------------------------------
static PyObject *targets(PyObject *, PyObject *)
{
    struct Target { const char *name; XLA_FFI_Handler *handler; };
    static const Target all[] = {
        {"bncpu_batch_norm_forward", BncpuBatchNormForward},
        {"bncpu_batch_norm_backward", BncpuBatchNormBackward},
        {"bncpu_group_norm_forward", BncpuGroupNormForward},
        {"bncpu_group_norm_backward", BncpuGroupNormBackward},
        {"bncpu_rms_norm_forward", BncpuRmsNormForward},
        {"bncpu_rms_norm_backward", BncpuRmsNormBackward},
    };
    PyObject *result = PyDict_New();
    if (result == nullptr)
        return nullptr;
    for (const Target &target : all) {
        PyObject *capsule = PyCapsule_New(reinterpret_cast<void *>(target.handler), nullptr, nullptr);
        if (capsule == nullptr || PyDict_SetItemString(result, target.name, capsule) != 0) {
            Py_XDECREF(capsule);
            Py_DECREF(result);
            return nullptr;
        }
        Py_DECREF(capsule);
    }
    return result;
}

static PyMethodDef methods[] = {
    {"targets", targets, METH_NOARGS, "targets()\n--\n\nThe XLA FFI handlers: {name: capsule}."},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "bncpu.jax._ffi", "bncpu's kernels as XLA FFI handlers.", -1, methods,
    nullptr, nullptr, nullptr, nullptr,
};

PyMODINIT_FUNC PyInit__ffi(void)
{
    if (bncpu_import() != BNCPU_OK) {
        PyErr_SetString(PyExc_ImportError, bncpu_import_error());
        return nullptr;
    }
    return PyModule_Create(&module_def);
}
