"""Kernels in a process that has created a subinterpreter.

Embedders such as mod_wsgi create subinterpreters. On Python 3.11, once one exists,
CPython stops checking which thread holds the GIL (PyGILState_Check() answers "held" in
every thread), and Cython's parallel loops, which release the GIL when the check says
it is held, used to release a GIL the thread did not hold: "Fatal Python error:
PyEval_SaveThread" on the first multithreaded call, even though bncpu was imported in
the main interpreter only. Each check runs in a subprocess (an abort must not take the
test run with it): every registry function, on inputs large enough for the thread team,
must give after the subinterpreter exists the very bits it gave before; and so must
examples/c/bn_extension.c, which calls a kernel between Py_BEGIN/END_ALLOW_THREADS.
"""
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import CHILD_CWD
from test_c_api import EXAMPLES, compile_c, example_env, toolchain  # noqa: F401 (fixture)

subinterpreters = pytest.importorskip(
    "_xxsubinterpreters", reason="this Python has no _xxsubinterpreters module")

# Create a subinterpreter (and leave it alive while the kernels run).
CREATE = "import _xxsubinterpreters\ninterpreter = _xxsubinterpreters.create()\n"


def run_python(script, env=None, cwd=None):
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=cwd or CHILD_CWD, timeout=600)
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr[-3000:]}"
    assert result.stdout.endswith("ok\n"), result.stdout
    return result.stdout


def test_every_function_after_a_subinterpreter_exists():
    """Large inputs (every work mode of batch norm, row and piece modes of the row norms),
    two threads: same bits before and after _xxsubinterpreters.create()."""
    script = textwrap.dedent("""
        import numpy as np
        import bncpu
        from bncpu._registry import FUNCTIONS

        SHAPES = {
            "batch_norm": [(16, 16, 48, 48), (2, 1, 320, 320), (4096, 64), (512, 32, 4, 4)],
            "layer_norm": [(256, 2048), (2, 100000)],
            "rms_norm": [(256, 2048), (2, 100000)],
            "group_norm": [(8, 16, 48, 48), (2, 4, 200, 200)],
            "instance_norm": [(8, 16, 48, 48)],
            "fused": [(16, 16, 48, 48), (4096, 64)],
        }
        bncpu.set_num_threads(2)

        def run_all():
            results = []
            for spec in FUNCTIONS.values():
                for shape in SHAPES[spec.family]:
                    for dtype in (np.float32, np.float64):
                        args = spec.copy_args(spec.inputs(shape, dtype, seed=1))
                        results.append(spec.call(args))
                        results.extend(args[name] for name in spec.written)
            return results

        before = run_all()
        assert bncpu.get_num_threads() == 2
        CREATE_SUBINTERPRETER
        after = run_all()
        assert len(before) == len(after)
        for b, a in zip(before, after):
            assert all(x is None and y is None or np.array_equal(x, y, equal_nan=True)
                       for x, y in zip(b, a))
        print("ok")
    """).replace("CREATE_SUBINTERPRETER\n", CREATE)
    run_python(script)


def test_c_extension_after_a_subinterpreter_exists(toolchain, tmp_path):  # noqa: F811
    compiler, include_flags, _ = toolchain
    module = tmp_path / ("bn_extension" + sysconfig.get_config_var("EXT_SUFFIX"))
    platform_flags = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    compile_c(compiler + ["-shared", "-fPIC", "-O2", str(EXAMPLES / "bn_extension.c"),
                          "-o", str(module)] + platform_flags + include_flags)
    script = CREATE + textwrap.dedent("""
        import numpy as np
        import bncpu
        import bn_extension
        bncpu.set_num_threads(2)
        for dtype in (np.float32, np.float64):
            x = np.random.default_rng(0).normal(3.0, 2.0, size=(16, 8, 64, 64)).astype(dtype)
            y = x.copy()
            bn_extension.normalize(y)
            assert np.array_equal(y, bncpu.batch_norm(x, None, None, training=True)), dtype
        print("ok")
    """)
    env = example_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    run_python(script, env=env, cwd=tmp_path)
