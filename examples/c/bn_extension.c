/*
 * bn_extension.c: a CPython extension module, written in C, that calls bncpu's kernels.
 *
 *   >>> import numpy as np, bn_extension
 *   >>> x = np.random.rand(8, 3, 4, 4).astype(np.float32)
 *   >>> bn_extension.normalize(x)   # in place: bncpu.batch_norm(x, None, None, training=True)
 *
 * Build, in examples/c/ with bncpu installed in the python3 on PATH (README.md there
 * explains each flag):
 *   cc -shared -fPIC -O2 bn_extension.c \
 *      -o "bn_extension$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" \
 *      -I"$(python3 -c 'import bncpu; print(bncpu.get_include())')" $(python3-config --includes)
 * An extension module does not link libpython: the interpreter that imports it provides
 * Python, and bncpu_import() loads bncpu into that same interpreter.
 */
#define PY_SSIZE_T_CLEAN
#include "bncpu.h" /* includes Python.h */

#include <string.h>

/* normalize(array, eps=1e-5): training-mode batch norm of a writable C-contiguous float32
 * or float64 buffer of shape (N, C, *spatial), in place, without weight or bias. */
static PyObject *normalize(PyObject *module, PyObject *args)
{
    PyObject *array;
    Py_buffer view;
    double eps = 1e-5;
    int64_t n, c, s = 1;
    int status, i, is_float32;
    (void)module;
    if (!PyArg_ParseTuple(args, "O|d:normalize", &array, &eps))
        return NULL;
    if (PyObject_GetBuffer(array, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0)
        return NULL;
    is_float32 = strcmp(view.format, "f") == 0;
    if (!is_float32 && strcmp(view.format, "d") != 0) {
        PyErr_Format(PyExc_TypeError, "expected float32 or float64 data, got format '%s'",
                     view.format);
        PyBuffer_Release(&view);
        return NULL;
    }
    if (view.ndim < 2) {
        PyErr_Format(PyExc_ValueError, "expected an (N, C, *spatial) array, got %d dimension(s)",
                     view.ndim);
        PyBuffer_Release(&view);
        return NULL;
    }
    n = view.shape[0];
    c = view.shape[1];
    for (i = 2; i < view.ndim; i++)
        s *= view.shape[i];
    /* The kernel never touches Python: other Python threads may run meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    status = is_float32
        ? bncpu_batch_norm_forward_train_f32(view.buf, view.buf, n, c, s, NULL, NULL, NULL, NULL,
                                             0.0, eps, NULL, NULL, 1)
        : bncpu_batch_norm_forward_train_f64(view.buf, view.buf, n, c, s, NULL, NULL, NULL, NULL,
                                             0.0, eps, NULL, NULL, 1);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (status != BNCPU_OK) {
        PyErr_SetString(PyExc_ValueError, bncpu_strerror(status));
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"normalize", normalize, METH_VARARGS,
     "normalize(array, eps=1e-5)\n--\n\n"
     "Training-mode batch norm of a float32/float64 (N, C, *spatial) array, in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "bn_extension", "bncpu's kernels called from a C extension module.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_bn_extension(void)
{
    /* The interpreter runs and this thread holds the GIL: bncpu_import() imports bncpu
     * (if not yet imported) and reads its function table. */
    if (bncpu_import() != BNCPU_OK) {
        PyErr_SetString(PyExc_ImportError, bncpu_import_error());
        return NULL;
    }
    return PyModule_Create(&module_def);
}
