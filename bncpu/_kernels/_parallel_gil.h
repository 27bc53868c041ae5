/*
 * _parallel_gil.h: the kernels' parallel loops leave the GIL alone (included by every
 * kernel module through _common.pxd, nowhere else).
 *
 * Cython cannot know whether a `nogil` function was called with the GIL, so it wraps each
 * parallel loop in "release the GIL if this thread holds it, take it back after". Before
 * Python 3.12 it asks PyGILState_Check(), and CPython 3.11 switches that check off once a
 * subinterpreter exists (mod_wsgi and other embedders create them): it then answers "held"
 * in every thread, and a kernel called without the GIL (as bncpu's Python wrappers and C
 * callers do) would release a GIL it does not hold: "Fatal Python error:
 * PyEval_SaveThread", whether or not bncpu was imported in the subinterpreter.
 *
 * The kernels never call Python, so they have no reason to release the GIL themselves:
 * a caller holding it keeps it for the call (the Python wrappers release it first; C
 * callers release it around long calls, see examples/c/bn_extension.c). In these modules
 * the check therefore answers "not held". Cython's only use of PyGILState_Check in them
 * is that release; from Python 3.12 on it asks the thread's own state, which is exact,
 * and nothing is changed. tests/test_subinterpreters.py runs every kernel after a
 * subinterpreter was created.
 */
#ifndef BNCPU_PARALLEL_GIL_H
#define BNCPU_PARALLEL_GIL_H

#include <Python.h>

#if PY_VERSION_HEX < 0x030C0000 && !defined(PYPY_VERSION)
#undef PyGILState_Check
#define PyGILState_Check() 0
#endif

#endif /* BNCPU_PARALLEL_GIL_H */
