"""pytest-benchmark suite configuration: the cases come from bncpu.bench (and its operations
from the function registry), as the speed report's (``python -m bncpu``) do.

Options:
  --bench-threads N[,N...]  thread counts (default: bncpu.get_num_threads())
  --bench-quick             only the --quick subset of the speed report

Plain ``pytest`` does not collect this folder (pyproject.toml: testpaths = ["tests"]);
run ``pytest benchmarks/``.
"""
import pytest

import bncpu
from bncpu.bench import cases, machine, peers, targets


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
        counts = [bncpu.get_num_threads()] if text is None else machine.parse_thread_counts(text)
    except ValueError as error:
        raise pytest.UsageError(f"--bench-threads: {error}") from None
    config.stash[_THREAD_COUNTS] = counts
    # As in the speed report: large results reuse freed memory instead of page-faulting
    # fresh pages, whichever benchmark ran before (see bncpu.bench.machine.reuse_freed_memory).
    machine.reuse_freed_memory()


def pytest_generate_tests(metafunc):
    """One test per (case, thread count, implementation); the implementations of a case
    run back to back so that its inputs are made once."""
    if "job" not in metafunc.fixturenames:
        return
    jobs, ids = [], []
    for case in cases.cases(quick=metafunc.config.getoption("--bench-quick")):
        for n_threads in metafunc.config.stash[_THREAD_COUNTS]:
            for implementation in peers.IMPLEMENTATIONS:
                if implementation == "bncpu_bn" and case.op not in cases.FUSED_OPS:
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
            self.inputs = cases.Inputs(case)
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
    torch_before = peers.torch.get_num_threads() if peers.torch is not None else None
    machine.set_threads(n_threads)
    yield n_threads
    bncpu.set_num_threads(before)
    if torch_before is not None:
        peers.torch.set_num_threads(torch_before)


def pytest_terminal_summary(terminalreporter):
    """The goals, checked on the medians of this session (each implementation timed on
    its own, not interleaved as in ``python -m bncpu``)."""
    lines = []
    for (case, n_threads), found in _MEDIANS.items():
        ratios = targets.ratios(found)
        for target in targets.targets(case, n_threads):
            met, value = target.met(ratios), target.value(ratios)
            verdict = {True: "met   ", False: "MISSED", None: "n/a   "}[met]
            measured = "not measured" if value is None else f"{value:.3g}"
            lines.append(f"{verdict}  {target} ({measured})  "
                         f"{case.label} {case.shape} {case.dtype} {n_threads}t")
    if lines:
        terminalreporter.section("bncpu targets")
        for line in lines:
            terminalreporter.write_line(line)
