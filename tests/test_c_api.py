"""The C API (include/bncpu.h), used from C as its users would.

The system C compiler builds examples/c/bn_example.c (a standalone program: it starts an
embedded interpreter through bncpu_import()) and examples/c/bn_extension.c (a CPython
extension module) against bncpu.get_include() and python3-config, exactly as the README
says. The example prints its inputs and results as JSON lines; they must equal, bit for
bit, what the Python API computes from the same inputs (both run the same kernels), and
agree with bncpu.reference. Bad arguments must give the documented status and write
nothing; several C threads at once must get the serial results; valgrind must find no
invalid access and no lost memory in bncpu's code or the example.

Every test here is skipped, with the reason, where no C compiler or no python3-config
(the Python development files) is found.
"""
import json
import os
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

import bncpu
from bncpu import _capi, reference

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "c"
PACKAGE_DIR = Path(bncpu.__file__).resolve().parent

# |C result - reference| <= TOLERANCE * max(1, max |reference|), per array.
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}
# float64 statistics of float32 data: float32 squares and runs of float32 partial sums
# (see bncpu/_kernels/_float32_sums.h) leave relative errors near 1e-8.
STATS_OF_FLOAT32_TOLERANCE = 1e-7


# ----------------------------------------------------------------------------------
# Building: the README's commands
# ----------------------------------------------------------------------------------
def find_compiler():
    command = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]
    return command if command[0] and shutil.which(command[0]) else None


def find_python_config():
    """python3-config of the running Python (a virtual environment has none of its own:
    its base installation's serves, the version being the same)."""
    version = sysconfig.get_config_var("VERSION")
    for directory in (sysconfig.get_config_var("BINDIR"), os.path.dirname(sys.executable)):
        for name in (f"python{version}-config", "python3-config"):
            path = os.path.join(directory or "", name)
            if directory and os.access(path, os.X_OK):
                return path
    return shutil.which(f"python{version}-config")


@pytest.fixture(scope="module")
def toolchain():
    """(compiler command, flags to compile against bncpu.h, flags to link libpython)."""
    if sys.platform == "win32":
        pytest.skip("the C API tests use a POSIX C compiler")
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no C compiler found (cc, gcc or $CC)")
    config = find_python_config()
    if config is None:
        pytest.skip("python3-config not found: install the Python development files "
                    "(e.g. Debian's python3-dev)")

    def config_flags(*options):
        return shlex.split(subprocess.run([config, *options], capture_output=True, text=True,
                                          check=True).stdout)

    include_flags = ["-I" + bncpu.get_include()] + config_flags("--includes")
    return compiler, include_flags, config_flags("--embed", "--ldflags")


def compile_c(command):
    print("$", shlex.join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"compilation failed:\n{result.stdout}{result.stderr}"


def example_env(**extra):
    """The environment the example runs in: the embedded interpreter is this test's
    Python (BNCPU_PYTHON) and imports the very bncpu package this test imported."""
    env = dict(os.environ, BNCPU_PYTHON=sys.executable)
    package_parent = str(PACKAGE_DIR.parent)
    if package_parent not in site.getsitepackages():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def example_binary(toolchain, tmp_path_factory):
    compiler, include_flags, link_flags = toolchain
    binary = tmp_path_factory.mktemp("c_api") / "bn_example"
    compile_c(compiler + ["-O2", "-g", "-Wall", "-Wextra", "-Werror", "-pthread",
                          str(EXAMPLES / "bn_example.c"), "-o", str(binary)]
              + include_flags + link_flags)
    return binary


def run_example(binary, *arguments, env=None, wrapper=(), timeout=300):
    return subprocess.run([*wrapper, str(binary), *arguments], capture_output=True, text=True,
                          env=env or example_env(), timeout=timeout)


@pytest.fixture(scope="module")
def example_records(example_binary):
    """The example's JSON lines, from a run with every array printed in full."""
    result = run_example(example_binary, "--full")
    assert result.returncode == 0, f"bn_example failed:\n{result.stdout[-3000:]}{result.stderr}"
    return [json.loads(line) for line in result.stdout.splitlines()]


def records_of(records, case):
    return [record for record in records if record["case"] == case]


# ----------------------------------------------------------------------------------
# Comparing the C results with the Python API (exactly) and the reference (closely)
# ----------------------------------------------------------------------------------
def array(record, name, dtype):
    return np.array(record[name], dtype=dtype)


def assert_same(record, name, dtype, python_value, reference_value=None, tolerance=None):
    """The C array `name` equals the Python API's bit for bit, and is near the reference
    (within `tolerance`, by default TOLERANCE of its dtype)."""
    c_value = array(record, name, dtype)
    python_value = np.asarray(python_value).reshape(-1)
    assert c_value.dtype == python_value.dtype, name
    np.testing.assert_array_equal(c_value, python_value, err_msg=f"{name}: C vs Python API")
    if reference_value is not None:
        reference_value = np.asarray(reference_value, np.float64).reshape(-1)
        scale = max(1.0, float(np.abs(reference_value).max(initial=0)))
        error = float(np.abs(c_value - reference_value).max(initial=0))
        if tolerance is None:
            tolerance = TOLERANCE[c_value.dtype]
        assert error <= tolerance * scale, f"{name}: C vs reference, error {error}"


def test_example_runs_and_reports_the_loaded_package(example_records):
    imported = records_of(example_records, "import")[0]
    assert imported["version"] == bncpu.__version__ == imported["header_version"]
    assert imported["isa"] == bncpu.isa()
    assert imported["num_threads"] == bncpu.get_num_threads()
    assert records_of(example_records, "summary") == [{"case": "summary", "failures": 0}]


def test_batch_norm_matches_python_api(example_records):
    cases = records_of(example_records, "batch_norm")
    assert {(r["dtype"], r["s"] == 1) for r in cases} == {
        (dtype, columns) for dtype in ("float32", "float64") for columns in (False, True)}
    for record in cases:
        check_batch_norm_record(record)


def check_batch_norm_record(record):
    dtype = np.dtype(record["dtype"])
    n, c, s = record["n"], record["c"], record["s"]
    shape = (n, c) if s == 1 else (n, c, s)
    x = array(record, "x", dtype).reshape(shape)
    dy = array(record, "dy", dtype).reshape(shape)
    weight, bias = array(record, "weight", dtype), array(record, "bias", dtype)
    momentum, eps = record["momentum"], record["eps"]

    # Training forward: output, running statistics updated in place, saved statistics.
    running_mean = array(record, "running_mean_in", dtype)
    running_var = array(record, "running_var_in", dtype)
    reference_mean, reference_var = running_mean.astype(np.float64), running_var.astype(np.float64)
    y, save_mean, save_invstd = bncpu.batch_norm_forward(
        x, weight, bias, running_mean, running_var, True, momentum, eps)
    ref_y, ref_mean, ref_invstd = reference.batch_norm_forward(
        x, weight, bias, reference_mean, reference_var, True, momentum, eps)
    assert_same(record, "train_y", dtype, y, ref_y)
    assert_same(record, "train_running_mean", dtype, running_mean, reference_mean)
    assert_same(record, "train_running_var", dtype, running_var, reference_var)
    assert_same(record, "train_save_mean", dtype, save_mean, ref_mean)
    assert_same(record, "train_save_invstd", dtype, save_invstd, ref_invstd)

    # Inference with the updated running statistics.
    y_eval = bncpu.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    assert_same(record, "eval_y", dtype, y_eval,
                reference.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps))

    # Backward in both modes.
    grads = bncpu.batch_norm_backward(dy, x, weight, None, None, save_mean, save_invstd, True, eps)
    ref_grads = reference.batch_norm_backward(dy, x, weight, None, None, save_mean, save_invstd,
                                              True, eps)
    for name, value, ref_value in zip(("train_dx", "train_dweight", "train_dbias"), grads, ref_grads):
        assert_same(record, name, dtype, value, ref_value)
    grads = bncpu.batch_norm_backward(dy, x, weight, running_mean, running_var, None, None, False, eps)
    ref_grads = reference.batch_norm_backward(dy, x, weight, running_mean, running_var, None, None,
                                              False, eps)
    for name, value, ref_value in zip(("eval_dx", "eval_dweight", "eval_dbias"), grads, ref_grads):
        assert_same(record, name, dtype, value, ref_value)

    # Split phase, one process; gather_stats moves the running statistics once more.
    mean, m2, count = bncpu.batch_norm_stats(x)
    tolerance = STATS_OF_FLOAT32_TOLERANCE if dtype == np.float32 else None
    assert_same(record, "stats_mean", np.float64, mean, reference.batch_norm_stats(x)[0],
                tolerance)
    assert_same(record, "stats_m2", np.float64, m2, reference.batch_norm_stats(x)[1], tolerance)
    global_mean, invstd = bncpu.batch_norm_gather_stats(mean, m2, count, running_mean, running_var,
                                                        momentum, eps)
    assert_same(record, "gather_mean", np.float64, global_mean)
    assert_same(record, "gather_invstd", np.float64, invstd)
    assert_same(record, "gather_running_mean", dtype, running_mean)
    assert_same(record, "gather_running_var", dtype, running_var)
    assert_same(record, "elemt_y", dtype, bncpu.batch_norm_elemt(x, weight, bias, global_mean, invstd),
                reference.batch_norm_elemt(x, weight, bias, global_mean, invstd))
    sum_dy, sum_dy_xmu, _, _ = bncpu.batch_norm_backward_reduce(dy, x, global_mean, invstd, weight)
    assert_same(record, "reduce_sum_dy", np.float64, sum_dy)
    assert_same(record, "reduce_sum_dy_xmu", np.float64, sum_dy_xmu)
    assert_same(record, "elemt_dx", dtype,
                bncpu.batch_norm_backward_elemt(dy, x, global_mean, invstd, weight, sum_dy,
                                                sum_dy_xmu, count),
                reference.batch_norm_backward_elemt(dy, x, global_mean, invstd, weight, sum_dy,
                                                    sum_dy_xmu, count))


# Per row-norm case: how to rebuild its input, and its forward/backward through a module
# with the Python API's signatures (bncpu and bncpu.reference both have them).
def layer_norm_results(api, record, x, dy, weight, bias):
    shape = (record["d"],)
    y, mean, rstd = api.layer_norm_forward(x, shape, weight, bias, record["eps"])
    return {"y": y, "mean": mean, "rstd": rstd, **dict(zip(
        ("dx", "dweight", "dbias"), api.layer_norm_backward(dy, x, shape, mean, rstd, weight)))}


def rms_norm_results(api, record, x, dy, weight, bias):
    shape = (record["d"],)
    y, rstd = api.rms_norm_forward(x, shape, weight, record["eps"])
    return {"y": y, "rstd": rstd, **dict(zip(
        ("dx", "dweight"), api.rms_norm_backward(dy, x, shape, rstd, weight)))}


def group_norm_results(api, record, x, dy, weight, bias):
    groups = record["groups"]
    y, mean, rstd = api.group_norm_forward(x, groups, weight, bias, record["eps"])
    return {"y": y, "mean": mean, "rstd": rstd, **dict(zip(
        ("dx", "dweight", "dbias"), api.group_norm_backward(dy, x, groups, mean, rstd, weight)))}


ROW_NORMS = {
    "layer_norm": (lambda r: (r["rows"], r["d"]), layer_norm_results),
    "rms_norm": (lambda r: (r["rows"], r["d"]), rms_norm_results),
    "group_norm": (lambda r: (r["n"], r["c"], r["s"]), group_norm_results),
}


@pytest.mark.parametrize("case", sorted(ROW_NORMS))
def test_row_norms_match_python_api(example_records, case):
    records = records_of(example_records, case)
    assert {r["dtype"] for r in records} == {"float32", "float64"}
    if any(record.get("available") is False for record in records):
        pytest.skip(f"the loaded bncpu has no C API entry for {case} yet")
    shape_of, results = ROW_NORMS[case]
    for record in records:
        dtype = np.dtype(record["dtype"])
        x = array(record, "x", dtype).reshape(shape_of(record))
        dy = array(record, "dy", dtype).reshape(x.shape)
        weight = array(record, "weight", dtype)
        bias = array(record, "bias", dtype) if "bias" in record else None
        python = results(bncpu, record, x, dy, weight, bias)
        # The reference's backward starts from the kernels' own statistics.
        expected = results(reference, record, x, dy, weight, bias)
        for name, value in python.items():
            assert_same(record, name, dtype, value, expected[name])


def test_bad_arguments_return_their_status_and_write_nothing(example_records):
    statuses = records_of(example_records, "status")
    for record in statuses:
        assert record["status"] == record["expected"], record
        assert record["unchanged"], record
        # The header's bncpu_strerror and the package's table say the same.
        assert record["message"] == _capi.strerror(record["status"]), record
    codes = {record["expected"] for record in statuses}
    assert set(range(1, 7)) | {9} <= codes   # NULL, size, one value, eps, momentum, aliasing, not imported
    calls = " ".join(record["call"] for record in statuses)
    assert "before bncpu_import()" in calls and "after bncpu_finalize()" in calls


def test_threads_calling_at_once_get_the_serial_results(example_records):
    (threads,) = records_of(example_records, "threads")
    assert threads["threads"] >= 4 and threads["elements"] >= 1 << 16
    assert threads["status"] == 0
    assert threads["mismatches"] == 0


def test_import_failure_is_reported_not_crashed(example_binary):
    """bncpu's own ImportError reaches the C caller as text (here: a bad BNCPU_ISA)."""
    result = run_example(example_binary, env=example_env(BNCPU_ISA="no-such-isa"))
    assert result.returncode == 1
    assert "bncpu_import() failed: import bncpu failed: ValueError: BNCPU_ISA" in result.stderr


def test_compiled_in_python_executable(toolchain, tmp_path):
    """-DBNCPU_PYTHON_EXECUTABLE picks the environment when BNCPU_PYTHON is unset (and no
    python3 is on PATH)."""
    compiler, include_flags, link_flags = toolchain
    binary = tmp_path / "bn_example_fixed_python"
    compile_c(compiler + ["-O2", "-pthread", f'-DBNCPU_PYTHON_EXECUTABLE="{sys.executable}"',
                          str(EXAMPLES / "bn_example.c"), "-o", str(binary)]
              + include_flags + link_flags)
    env = example_env(PATH=str(tmp_path))
    del env["BNCPU_PYTHON"]
    result = run_example(binary, env=env)
    assert result.returncode == 0, result.stderr


def test_extension_module(toolchain, tmp_path):
    compiler, include_flags, _ = toolchain
    module = tmp_path / ("bn_extension" + sysconfig.get_config_var("EXT_SUFFIX"))
    platform_flags = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
    compile_c(compiler + ["-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror",
                          str(EXAMPLES / "bn_extension.c"), "-o", str(module)]
              + platform_flags + include_flags)
    script = textwrap.dedent("""
        import numpy as np
        import bncpu
        import bn_extension
        for dtype in (np.float32, np.float64):
            x = np.random.default_rng(0).normal(3.0, 2.0, size=(4, 3, 5, 2)).astype(dtype)
            y = x.copy()
            assert bn_extension.normalize(y) is None
            assert np.array_equal(y, bncpu.batch_norm(x, None, None, training=True)), dtype
        for bad, error in [(np.zeros((4, 3), np.int32), TypeError),
                           (np.zeros(3), ValueError),
                           (np.zeros((1, 3)), ValueError),
                           (np.zeros((4, 6))[:, ::2], ValueError)]:
            try:
                bn_extension.normalize(bad)
            except error as e:
                print(type(e).__name__, e)
            else:
                raise AssertionError(f"no {error.__name__} for {bad!r}")
        print("ok")
    """)
    env = example_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    # Run from tmp_path: `python -c` puts the working directory first on sys.path, where a
    # source checkout's unbuilt bncpu/ would hide the installed package.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "expected more than 1 value per channel when training" in result.stdout
    assert result.stdout.endswith("ok\n")


# ----------------------------------------------------------------------------------
# valgrind
# ----------------------------------------------------------------------------------
# Frames that only carry an error up from where it happened: the allocator, the C
# library, the dynamic loader, valgrind's own preload.
PASS_THROUGH_OBJECTS = ("vgpreload", "/libc.so", "/libc-", "ld-linux", "/ld-")


def error_site(error):
    """(object file, function) of the frame where a valgrind error happened: for a leak,
    the caller of the allocator; for a bad access, the code that made it."""
    for frame in error.find("stack").iter("frame"):
        obj, function = frame.findtext("obj") or "", frame.findtext("fn") or ""
        if any(marker in obj for marker in PASS_THROUGH_OBJECTS) or "alloc" in function.lower():
            continue
        return obj, function
    return "", ""


def test_example_under_valgrind(example_binary, tmp_path):
    """No invalid read or write, no use of uninitialised memory and no definitely lost
    block may arise in bncpu's code or the example.

    The embedded CPython and NumPy are not clean themselves (CPython 3.11 loses a few
    hundred bytes at finalization, NumPy's ufunc tables are never freed, ld.so reads past
    a string while loading libraries), so valgrind's --error-exitcode would fail on
    them: each error is attributed instead to the frame where it happened, and only
    those in the example binary or the bncpu package fail the test. PYTHONMALLOC=malloc
    makes every Python allocation visible to valgrind.
    """
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.skip("valgrind not installed")
    log = tmp_path / "valgrind.xml"
    result = run_example(
        example_binary, env=example_env(PYTHONMALLOC="malloc"), timeout=900,
        wrapper=[valgrind, "--keep-debuginfo=yes", "--num-callers=30", "--leak-check=full",
                 "--show-leak-kinds=definite",
                 "--errors-for-leak-kinds=definite", "--xml=yes", f"--xml-file={log}"])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ours = (str(example_binary.resolve()), str(PACKAGE_DIR))
    errors = ElementTree.parse(log).getroot().findall("error")
    bncpu_errors = []
    for error in errors:
        obj, function = error_site(error)
        if obj.startswith(ours):
            bncpu_errors.append(f"{error.findtext('kind')} in {function} ({obj}): "
                                f"{error.findtext('what') or error.findtext('xwhat/text')}")
    print(f"valgrind: {len(errors)} errors, {len(bncpu_errors)} in bncpu or the example")
    assert not bncpu_errors, "\n".join(bncpu_errors)


# ----------------------------------------------------------------------------------
# API versions: a program runs with a package of the same major version and the same or
# a later minor version (the table only grows)
# ----------------------------------------------------------------------------------
VERSION_PROGRAM = r"""
#include "bncpu.h"
int main(void)
{
    const float x[4] = {1.0f, 2.0f, 4.0f, 7.0f};
    float y[4];
    if (bncpu_import() != BNCPU_OK) {
        printf("refused: %s\n", bncpu_import_error());
        return 1;
    }
    int status = bncpu_batch_norm_forward_train_f32(x, y, 4, 1, 1, NULL, NULL, NULL, NULL,
                                                    0.1, 1e-5, NULL, NULL, 1);
    printf("%d %.9g %.9g %.9g %.9g\n", status, y[0], y[1], y[2], y[3]);
    bncpu_finalize();
    return 0;
}
"""


def header_with(rows):
    """bncpu.h as the manifest would have generated it with these table members."""
    from bncpu._kernels import manifest
    text = (Path(bncpu.get_include()) / "bncpu.h").read_text()
    for begin, end, block in [(manifest.TABLE_BEGIN, manifest.TABLE_END,
                               manifest.header_table(rows)),
                              (manifest.MACROS_BEGIN, manifest.MACROS_END,
                               manifest.header_macros(rows))]:
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + block + text[stop:]
    return text


def run_against(toolchain, tmp_path, header_text):
    compiler, include_flags, link_flags = toolchain
    (tmp_path / "bncpu.h").write_text(header_text)
    (tmp_path / "version.c").write_text(VERSION_PROGRAM)
    binary = tmp_path / "version"
    compile_c(compiler + ["-O2", "-Wall", "-Werror", f"-I{tmp_path}", str(tmp_path / "version.c"),
                          "-o", str(binary)] + include_flags + link_flags)
    return run_example(binary, timeout=120)


def test_program_of_an_earlier_header_runs(toolchain, tmp_path):
    """A header of an earlier minor version (its table lacks the members added since: here
    the last entry) runs against this package, and its calls land on the right members."""
    from bncpu._kernels import manifest
    last = manifest.ENTRIES[-1].name
    earlier = [m for m in manifest.members() if m.entry.name != last]
    result = run_against(toolchain, tmp_path, header_with(earlier))
    assert result.returncode == 0, result.stdout + result.stderr
    status, *y = result.stdout.split()
    x = np.array([1, 2, 4, 7], np.float32).reshape(4, 1)
    assert int(status) == 0
    np.testing.assert_array_equal(np.array(y, np.float32),
                                  bncpu.batch_norm(x, None, None, training=True).ravel())


def test_program_of_a_later_header_is_refused(toolchain, tmp_path):
    """A header of a later minor version (one more entry) would read members this package
    lacks: bncpu_import() refuses it, saying why."""
    from bncpu._kernels import manifest
    later = manifest.Member("later_entry_f32", manifest.ENTRIES[0], manifest.DTYPES[0],
                            manifest.API_VERSION_MINOR + 1)
    result = run_against(toolchain, tmp_path, header_with(manifest.members() + [later]))
    major, minor = manifest.API_VERSION_MAJOR, manifest.API_VERSION_MINOR
    assert result.returncode == 1
    assert (f"refused: bncpu.h is for API version {major}.{minor + 1} but the bncpu package "
            f"{bncpu.__version__} provides version {major}.{minor}") in result.stdout


def test_import_loads_no_numpy(toolchain, tmp_path):
    """A standalone program's bncpu_import() loads the modules that fill the table and not
    NumPy (most of the start-up time); Python code run later still gets the whole package."""
    compiler, include_flags, link_flags = toolchain
    (tmp_path / "modules.c").write_text(r"""
#include "bncpu.h"
int main(void)
{
    PyGILState_STATE gil;
    if (bncpu_import() != BNCPU_OK) {
        fprintf(stderr, "%s\n", bncpu_import_error());
        return 1;
    }
    gil = PyGILState_Ensure();
    PyRun_SimpleString("import sys\n"
                       "print('numpy' in sys.modules)\n"
                       "import bncpu\n"
                       "print(bncpu.batch_norm.__name__, 'numpy' in sys.modules)\n");
    PyGILState_Release(gil);
    bncpu_finalize();
    return 0;
}
""")
    binary = tmp_path / "modules"
    compile_c(compiler + ["-O2", str(tmp_path / "modules.c"), "-o", str(binary)]
              + include_flags + link_flags)
    result = run_example(binary, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "batch_norm", "True"]
