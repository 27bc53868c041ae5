"""pytest-benchmark suite configuration: the cases come from bncpu._bench, the registry the
speed report (``python -m bncpu``) uses too.

Options:
  --bench-threads N[,N...]  thread counts (default: bncpu.get_num_threads())
  --bench-quick             only the --quick subset of the speed report

Plain ``pytest`` does not collect this folder (pyproject.toml: testpaths = ["tests"]);
run ``pytest benchmarks/``.
"""
import pytest

import bncpu
from bncpu import _bench


def pytest_addoption(parser):
    group = parser.getgroup("bncpu benchmarks")
    group.addoption("--bench-threads", default=None, metavar="N[,N...]",
                    help="thread counts to benchmark at (default: bncpu.get_num_threads())")
    group.addoption("--bench-quick", action="store_true",
                    help="only the cases of `python -m bncpu --quick`")


_THREAD_COUNTS = pytest.StashKey()


def pytest_configure(config):
    text = config.getoption("--bench-threads")
    try:
        counts = [bncpu.get_num_threads()] if text is None else _bench.parse_thread_counts(text)
    except ValueError as error:
        raise pytest.UsageError(f"--bench-threads: {error}") from None
    config.stash[_THREAD_COUNTS] = counts
    # As in the speed report: large results reuse freed memory instead of page-faulting
    # fresh pages, whichever benchmark ran before (see bncpu._bench.reuse_freed_memory).
    _bench.reuse_freed_memory()


def pytest_generate_tests(metafunc):
    """One test per (case, thread count, implementation); the implementations of a case
    run back to back so that its inputs are made once."""
    if "job" not in metafunc.fixturenames:
        return
    jobs, ids = [], []
    for case in _bench.cases(quick=metafunc.config.getoption("--bench-quick")):
        for n_threads in metafunc.config.stash[_THREAD_COUNTS]:
            for implementation in _bench.IMPLEMENTATIONS:
                if implementation == "bncpu_bn" and case.op not in _bench.FUSED_OPS:
                    continue   # batch norm alone: the fused rows' baseline only
                jobs.append((case, n_threads, implementation))
                ids.append(f"{case.id}-{n_threads}t-{implementation}")
    metafunc.parametrize("job", jobs, ids=ids)


class _LatestInputs:
    """Inputs of the case being benchmarked; the previous case's arrays are dropped so
    that the large shapes do not pile up in memory."""

    def __init__(self):
        self.case = None
        self.inputs = None

    def get(self, case):
        if case != self.case:
            self.inputs = None   # free the old arrays before making the new ones
            self.inputs = _bench.Inputs(case)
            self.case = case
        return self.inputs


@pytest.fixture(scope="session")
def latest_inputs():
    return _LatestInputs()


# {(case, n_threads): {implementation: median seconds}}: filled by the benchmarks, read by
# the target summary at the end of the session.
_MEDIANS = {}


@pytest.fixture(scope="session")
def medians():
    return _MEDIANS


@pytest.fixture
def threads(job):
    """Run bncpu and torch at the job's thread count, and restore both afterwards."""
    n_threads = job[1]
    before = bncpu.get_num_threads()
    torch_before = _bench.torch.get_num_threads() if _bench.torch is not None else None
    _bench.set_threads(n_threads)
    yield n_threads
    bncpu.set_num_threads(before)
    if torch_before is not None:
        _bench.torch.set_num_threads(torch_before)


def pytest_terminal_summary(terminalreporter):
    """The goals, checked on the medians of this session (each implementation timed on
    its own, not interleaved as in ``python -m bncpu``)."""
    lines = []
    for (case, n_threads), found in _MEDIANS.items():
        ratios = _bench.ratios(found)
        for target in _bench.targets(case, n_threads):
            met, value = target.met(ratios), target.value(ratios)
            verdict = {True: "met   ", False: "MISSED", None: "n/a   "}[met]
            measured = "not measured" if value is None else f"{value:.3g}"
            lines.append(f"{verdict}  {target} ({measured})  "
                         f"{case.label} {case.shape} {case.dtype} {n_threads}t")
    if lines:
        terminalreporter.section("bncpu targets")
        for line in lines:
            terminalreporter.write_line(line)
