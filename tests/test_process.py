"""The process survives what processes do: fork() after a multithreaded call, absurd
thread counts from the environment or set_num_threads, finalizing and re-importing the C
API, importing the package from a source tree that was never built.

Each case that could hang or kill the process runs in a child Python with a timeout, so
that a regression fails this test instead of stopping the suite.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bncpu
from bncpu import _threads
from conftest import CHILD_CWD, num_threads

PACKAGE_DIR = Path(bncpu.__file__).resolve().parent
TIMEOUT = 120

# Large enough that every call below runs a parallel team (more than SMALL_INPUT values).
CALLS = textwrap.dedent("""
    import hashlib
    import numpy as np
    import bncpu

    def results():
        rng = np.random.default_rng(0)
        x = rng.standard_normal((16, 8, 64, 64))
        dy = rng.standard_normal(x.shape)
        out = [bncpu.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)[0],
               bncpu.layer_norm(x, (64, 64)), bncpu.group_norm(x, 4),
               bncpu.batch_norm_backward(dy, x, np.ones(8), None, None,
                                         *bncpu.batch_norm_forward(x, None, None, None, None,
                                                                   True, 0.1, 1e-5)[1:],
                                         True, 1e-5)[0]]
        return hashlib.sha256(b"".join(a.tobytes() for a in out)).hexdigest()
""")


def run_python(code, env=None, timeout=TIMEOUT):
    """Run ``code`` in a child Python importing this very bncpu; (returncode, stdout, stderr)."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PACKAGE_DIR.parent), environment.get("PYTHONPATH")]))
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=environment, timeout=timeout, cwd=CHILD_CWD)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child Python did not finish within {timeout} s (hung):\n"
                    f"{exc.stdout}\n{exc.stderr}")
    return result.returncode, result.stdout, result.stderr


def child_json(code, env=None):
    returncode, stdout, stderr = run_python(code, env)
    assert returncode == 0, f"child Python failed with status {returncode}:\n{stdout}\n{stderr}"
    return json.loads(stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------
# fork()
# ----------------------------------------------------------------------------------
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the platform has no fork()")


@needs_fork
@pytest.mark.parametrize("method", ["multiprocessing", "os.fork"])
def test_forked_child_after_a_multithreaded_call_runs_single_threaded(method):
    # The parent runs a team first: GNU OpenMP's pool then exists in the parent only, and
    # a child that tried to use it waited forever.
    code = CALLS + textwrap.dedent(f"""
        import json, multiprocessing, os

        def child(queue):
            queue.put((bncpu.get_num_threads(), results()))

        if __name__ == "__main__":
            bncpu.set_num_threads(2)
            expected = results()
            if "{method}" == "multiprocessing":
                context = multiprocessing.get_context("fork")
                queue = context.Queue()
                process = context.Process(target=child, args=(queue,))
                process.start()
                process.join(60)
                if process.is_alive():
                    process.kill()
                    raise SystemExit("the forked child hung")
                threads, digest = queue.get(timeout=10)
            else:
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.write(write_end, json.dumps([bncpu.get_num_threads(), results()]).encode())
                    os._exit(0)
                os.close(write_end)
                threads, digest = json.loads(os.read(read_end, 4096))
                assert os.waitpid(pid, 0)[1] == 0
            print(json.dumps({{"parent_threads": bncpu.get_num_threads(), "child_threads": threads,
                              "same": digest == expected}}))
    """)
    report = child_json(code)
    assert report["child_threads"] == 1
    assert report["parent_threads"] == min(2, _threads.MAX_THREADS)
    assert report["same"], "the forked child's results differ from the parent's"


# ----------------------------------------------------------------------------------
# Thread counts
# ----------------------------------------------------------------------------------
def test_thread_cap_is_four_per_available_cpu_and_at_least_sixteen():
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    if bncpu.openmp_enabled():
        assert _threads.MAX_THREADS == max(_threads.MIN_THREADS_CAP,
                                           _threads.MAX_THREADS_PER_CPU * cpus)
    assert _threads.MIN_THREADS_CAP == 16 and _threads.MAX_THREADS_PER_CPU == 4


@pytest.mark.parametrize("n", [10**6, 2**31, 2**40, 10**100])
def test_set_num_threads_above_the_cap_is_lowered_to_it(n):
    with num_threads(n):
        assert bncpu.get_num_threads() == _threads.MAX_THREADS


@pytest.mark.parametrize("n", [np.int64(2), np.int32(3), np.uint8(2)])
def test_set_num_threads_accepts_numpy_integers(n):
    with num_threads(n):
        assert bncpu.get_num_threads() == int(n)


@pytest.mark.parametrize("bad", [True, np.True_, 2.0, np.float64(2), "2", None])
def test_set_num_threads_rejects_what_is_not_an_integer(bad):
    before = bncpu.get_num_threads()
    with pytest.raises(TypeError, match="number of threads must be an int"):
        bncpu.set_num_threads(bad)
    assert bncpu.get_num_threads() == before


@pytest.mark.parametrize("setting", ["OMP_NUM_THREADS=99999", "set_num_threads(10**6)"])
def test_absurd_thread_counts_run_at_the_cap_with_single_thread_bits(setting):
    env = dict(os.environ)
    call = "pass"
    if setting.startswith("OMP"):
        env["OMP_NUM_THREADS"] = "99999"
    else:
        call = "bncpu.set_num_threads(10**6)"
    code = CALLS + textwrap.dedent(f"""
        import json
        from bncpu import _threads
        {call}
        threads = bncpu.get_num_threads()
        many = results()
        bncpu.set_num_threads(1)
        print(json.dumps({{"threads": threads, "cap": _threads.MAX_THREADS,
                          "same": many == results()}}))
    """)
    report = child_json(code, env)
    # Without OpenMP, OMP_NUM_THREADS means nothing and the default is 1.
    from_environment_only = setting.startswith("OMP") and not bncpu.openmp_enabled()
    assert report["threads"] == (1 if from_environment_only else report["cap"])
    assert report["same"]


# ----------------------------------------------------------------------------------
# C API: bncpu_import() after bncpu_finalize()
# ----------------------------------------------------------------------------------
REIMPORT_PROGRAM = r"""
#include "bncpu.h"

static void step(const char *name, int status)
{
    printf("%s\t%d\t%s\n", name, status, status == BNCPU_OK ? "" : bncpu_import_error());
}

int main(int argc, char **argv)
{
    /* With an argument the program runs Python itself, as an embedding program does. */
    int embedding = argc > 1;
    (void)argv;
    if (embedding)
        Py_Initialize();
    step("import", bncpu_import());
    bncpu_finalize();
    step("import after finalize", bncpu_import());
    printf("threads\t%d\t\n", bncpu_get_num_threads());
    bncpu_finalize();
    if (embedding)
        Py_FinalizeEx();
    return 0;
}
"""


@pytest.fixture(scope="module")
def reimport_binary(tmp_path_factory):
    from test_c_api import find_compiler, find_python_config
    compiler, config = find_compiler(), find_python_config()
    if sys.platform == "win32" or compiler is None or config is None:
        pytest.skip("needs a POSIX C compiler and python3-config (the Python development files)")

    def config_flags(*options):
        return subprocess.run([config, *options], capture_output=True, text=True,
                              check=True).stdout.split()

    directory = tmp_path_factory.mktemp("reimport")
    source, binary = directory / "reimport.c", directory / "reimport"
    source.write_text(REIMPORT_PROGRAM)
    command = (compiler + ["-Wall", "-Wextra", "-Werror", str(source), "-o", str(binary),
                           "-I" + bncpu.get_include()]
               + config_flags("--includes") + config_flags("--embed", "--ldflags"))
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return binary


@pytest.mark.parametrize("embedding", [False, True], ids=["standalone", "embedding"])
def test_c_import_after_finalize(reimport_binary, embedding):
    from test_c_api import example_env
    import site
    env = example_env()
    # An embedding program's own interpreter finds NumPy through PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join([env.get("PYTHONPATH", "")] + site.getsitepackages())
    result = subprocess.run([str(reimport_binary)] + (["embedding"] if embedding else []),
                            capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = {name: (int(status), message) for name, status, message in
             (line.split("\t") for line in result.stdout.splitlines())}
    assert steps["import"] == (0, ""), steps
    status, message = steps["import after finalize"]
    if embedding:
        # bncpu_finalize() left the program's interpreter alone: importing again works.
        assert (status, message) == (0, "")
        assert steps["threads"][0] >= 1
    else:
        # The interpreter bncpu_import() started is gone and cannot be started again.
        assert status == 10   # BNCPU_ERR_IMPORT
        assert "bncpu_import() after bncpu_finalize()" in message
        assert "cannot be started twice" in message
        assert steps["threads"][0] == 0


# ----------------------------------------------------------------------------------
# Importing an unbuilt source tree
# ----------------------------------------------------------------------------------
def test_importing_an_unbuilt_source_tree_says_how_to_build(tmp_path):
    # The package's Python files without any compiled module, as in a fresh checkout.
    shutil.copytree(PACKAGE_DIR, tmp_path / "bncpu",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__", "include"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "import bncpu"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: bncpu is imported from"), result.stderr
    assert "not its compiled extension modules" in last_line
    assert "pip install -e ." in last_line and "build_ext --inplace" in last_line
    assert "circular import" not in last_line
