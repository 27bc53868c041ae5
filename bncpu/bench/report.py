"""The speed report: ``python -m bncpu`` (or the ``bncpu-bench`` console script).

One table, in the spirit of bottleneck's ``bench()``: per shape and operation, bncpu's
median time and how many times faster it is than PyTorch CPU, oneDNN (when its wheels are
installed), the streaming floor and the NumPy reference, with the goals that apply marked
met or missed. It fits 120 columns; ``--wide`` prints every column, and ``--json`` writes
every timing.
"""
import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import sys
import textwrap

import numpy as np

import bncpu
from bncpu.bench import cases as cases_module
from bncpu.bench import frameworks, machine, onednn, peers, timing
from bncpu.bench.targets import SOURCE, ratios, targets

# The default table's width, and the share of the CPUs other processes may use before
# the report says that its timings are not a measurement.
WIDTH = 120
BUSY_SHARE = 0.1


def _parse_threads(text):
    try:
        return machine.parse_thread_counts(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parse_pattern(text):
    try:
        return re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"not a regular expression: {error}") from None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bncpu",
        description="Time bncpu against its NumPy reference, PyTorch CPU, oneDNN and the "
                    "streaming floor, side by side in one process, and print one table.")
    parser.add_argument("--threads", type=_parse_threads, default=None, metavar="N[,N...]",
                        help="thread counts to run at, e.g. 2 or 1,2 (default: "
                             "bncpu.get_num_threads())")
    parser.add_argument("--quick", action="store_true",
                        help="only the shapes with targets, shorter timing (about a minute)")
    parser.add_argument("--cases", type=_parse_pattern, default=None, metavar="REGEX",
                        help="only the cases whose id matches, e.g. 'bn_bwd_train-32x64x56x56' "
                             "(ids: operation-shape-dtype, as in the JSON and benchmarks/)")
    parser.add_argument("--wide", action="store_true",
                        help=f"every column (bncpu into out=, vs the reference, both oneDNN "
                             f"columns, vs batch norm alone, each goal): wider than {WIDTH}")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with the calling thread's CPU time instead of the wall "
                             "clock: steadier on a busy machine; needs --threads 1")
    parser.add_argument("--json", metavar="FILE", help="write every raw timing and the environment")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of the ratios "
                                                       "(needs matplotlib)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc thresholds alone: large results then may "
                             "page-fault fresh memory on every call, depending on case order")
    args = parser.parse_args(argv)
    if args.cpu_clock and args.threads != [1]:
        parser.error("--cpu-clock needs --threads 1 (other threads' work is not on the "
                     "calling thread's clock)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib, which is not installed "
                     "(pip install matplotlib, or pip install 'bncpu[bench]')")
    return args


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------
def run_case(case, thread_counts, budget):
    """Make the inputs of ``case`` once and time it at each thread count: yields
    (n_threads, {implementation: Timing}) as each thread count finishes."""
    inputs = cases_module.Inputs(case)
    for n_threads in thread_counts:
        machine.set_threads(n_threads)
        yield n_threads, timing.measure(peers.implementation_calls(inputs, n_threads), budget)


class Row:
    """One line of the table: a case at one thread count."""

    def __init__(self, case, n_threads, timings):
        self.case = case
        self.n_threads = n_threads
        self.timings = timings
        self.medians = {name: t.median for name, t in timings.items()}
        self.ratios = ratios(self.medians)
        self.targets = [(target, target.value(self.ratios), target.met(self.ratios))
                        for target in targets(case, n_threads)]

    def as_json(self):
        return {
            "case": self.case.id,
            "operation": self.case.op,
            "label": self.case.label,
            "shape": list(self.case.shape),
            "dtype": self.case.dtype,
            "param": self.case.param,
            "threads": self.n_threads,
            "bytes_moved": self.case.bytes_moved,
            "implementations": {
                name: {"status": t.status, "median_s": t.median,
                       "calls_per_sample": t.calls_per_sample, "note": t.note,
                       "page_faults_per_call": t.faults_per_call, "samples_s": t.samples}
                for name, t in self.timings.items()},
            "ratios": self.ratios,
            "targets": [{"target": str(target), "value": value, "met": met}
                        for target, value, met in self.targets],
        }


def run(cases, thread_counts, budget, log):
    rows = []
    total = len(cases) * len(thread_counts)
    for case in cases:
        for n_threads, timings in run_case(case, thread_counts, budget):
            rows.append(Row(case, n_threads, timings))
            times = "  ".join(f"{name} {timing.format_seconds(t.median)}"
                              if t.status == "ok" else f"{name} {t.status}"
                              for name, t in timings.items())
            log(f"[{len(rows):3d}/{total}] {n_threads}t {case.label} {case.shape} {case.dtype}: "
                f"{times}")
    return rows


def environment():
    return {
        "bncpu": bncpu.__version__,
        "isa": bncpu.isa(),
        "openmp": bncpu.openmp_enabled(),
        "default_threads": bncpu.get_num_threads(),
        "cpu": machine.cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": peers.torch.__version__ if peers.torch is not None else None,
        "onednn": onednn.version(),
        "onednn_missing": onednn.unavailable_reason(),
        "floor": peers.floor_description(),
        "frameworks": frameworks.versions(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "wait_policy": machine.wait_policy(),
    }


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def _times(value):
    if value is None:
        return "n/a"
    return f"{value:.0f}x" if value >= 1000 else f"{value:.3g}x"


# Short names of the ratios in the default table's targets cell.
_SHORT = {"torch": "torch", "reference": "ref", "onednn": "oneDNN", "onednn_best": "oneDNN",
          "floor": "floor", "bn_alone": "bn", "stock": "stock"}


def _targets_cell(row):
    """Every goal with its verdict: ok, MISS(measured value), or ? (not measurable)."""
    cells = []
    for target, value, met in row.targets:
        if met is None:
            cells.append(f"{target}:?")
        else:
            cells.append(f"{target}:ok" if met else f"{target}:MISS({value:.3g})")
    return " ".join(cells)


def _targets_short(row):
    """ok when every goal is met; else MISS and the ratios that miss, ? when some cannot
    be measured here."""
    if not row.targets:
        return ""
    missed = list(dict.fromkeys(_SHORT[t.metric] for t, _, met in row.targets if met is False))
    unknown = any(met is None for _, _, met in row.targets)
    cell = f"MISS {','.join(missed)}" if missed else "ok"
    return cell + (" ?" if unknown else "")


def _bncpu_cell(row, width):
    """bncpu's time, or why there is none (its status, cut to ``width``)."""
    own = row.medians.get("bncpu")
    return timing.format_seconds(own) if own else row.timings["bncpu"].status[:width]


def _gbps(row):
    own = row.medians.get("bncpu")
    return f"{row.case.bytes_moved / own / 1e9:.1f}" if own else "-"


def _onednn_best(row):
    cell = _times(row.ratios.get("onednn_best"))
    note = row.timings["onednn_best"].note
    if row.ratios.get("onednn_best") and note not in (None, "plain"):
        cell += f" {note}"
    return cell


# (title, cell of a row, left-aligned): the default table, then the wide one.
COLUMNS = (
    ("operation", lambda row: row.case.label, True),
    ("bncpu", lambda row: _bncpu_cell(row, 12), False),
    ("GB/s", _gbps, False),
    ("vs torch", lambda row: _times(row.ratios.get("torch")), False),
    ("vs oneDNN", lambda row: _times(row.ratios.get("onednn_best")), False),
    ("vs floor", lambda row: _times(row.ratios.get("floor")), False),
    ("targets", _targets_short, True),
)
WIDE_COLUMNS = (
    ("operation", lambda row: row.case.label, True),
    ("bncpu", lambda row: _bncpu_cell(row, 40), False),
    ("out=", lambda row: timing.format_seconds(row.medians.get("bncpu_out")), False),
    ("GB/s", _gbps, False),
    ("vs ref", lambda row: _times(row.ratios.get("reference")), False),
    ("vs torch", lambda row: _times(row.ratios.get("torch")), False),
    ("vs oneDNN", lambda row: _times(row.ratios.get("onednn")), False),
    ("vs oneDNN best", _onednn_best, True),
    ("vs floor", lambda row: _times(row.ratios.get("floor")), False),
    ("vs bn alone", lambda row: _times(row.ratios.get("bn_alone")), False),
    ("targets", _targets_cell, True),
)

# The Keras and JAX rows: bncpu inside the framework against the framework's own.
FRAMEWORK_COLUMNS = (
    ("training step", lambda row: row.case.label, True),
    ("bncpu", lambda row: _bncpu_cell(row, 40), False),
    ("GB/s", _gbps, False),
    ("against", lambda row: frameworks.STOCK[row.case.operation.framework], True),
    ("its time", lambda row: timing.format_seconds(row.medians.get("stock")), False),
    ("vs it", lambda row: _times(row.ratios.get("stock")), False),
    ("targets", _targets_short, True),
)
WIDE_FRAMEWORK_COLUMNS = FRAMEWORK_COLUMNS[:-1] + (("targets", _targets_cell, True),)


def table_lines(rows, wide=False, columns=None):
    """The rows under a heading per shape and dtype (``columns``: the table's, by
    default COLUMNS or WIDE_COLUMNS)."""
    columns = columns or (WIDE_COLUMNS if wide else COLUMNS)
    titles = [title for title, _, _ in columns]
    body = [[cell(row) for _, cell, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in body + [titles]) for i in range(len(columns))]

    def render(cells):
        return "  " + "  ".join(
            cell.ljust(width) if left else cell.rjust(width)
            for cell, width, (_, _, left) in zip(cells, widths, columns)).rstrip()
    lines = [render(titles)]
    previous = None
    for row, cells in zip(rows, body):
        heading = f"{row.case.shape} {row.case.dtype}"
        if heading != previous:
            lines.append(heading)
            previous = heading
        lines.append(render(cells))
    return lines


def busy_lines(env, thread_counts):
    """The warning a busy machine's report gets, at its top and its bottom: empty when
    other processes used at most ``BUSY_SHARE`` of the CPUs."""
    share = env.get("others_cpu_share")
    if share is None or share <= BUSY_SHARE:
        return []
    lines = [f"WARNING: other processes used {share:.0%} of the CPUs during the run: these "
             f"timings are not a measurement.",
             "         Rerun on an idle machine (or --threads 1 --cpu-clock)."]
    # A spinning OpenMP worker that shares its core with other processes stalls the team
    # for a scheduler time slice at every barrier (benchmarks/thread_wait.py).
    if max(thread_counts) > 1 and not os.environ.get("OMP_WAIT_POLICY"):
        lines.append("         With other processes on the cores, OpenMP's spinning workers "
                     "stall at barriers:")
        lines.append("         OMP_WAIT_POLICY=passive gives steadier multi-thread timings.")
    return lines


def _fit(lines):
    """Lines wrapped to ``WIDTH``, continued under the text after 'name    : '."""
    fitted = []
    for line in lines:
        fitted += textwrap.wrap(line, WIDTH, subsequent_indent=" " * 12,
                                break_on_hyphens=False) or [""]
    return fitted


def framework_lines(env, rows, wide=False):
    """The Keras and JAX rows' own table, with how they were run: empty without them."""
    steps = [row for row in rows if row.case.operation.framework]
    if not steps:
        return []
    versions = ", ".join(f"{name} {version}" for name, version in env["frameworks"].items())
    pool = (f"XLA_FLAGS={env['xla_flags']}" if env.get("xla_flags")
            else f"its default, one thread per logical CPU ({env['cpu_count']})")
    notes = _fit([
        f"Keras and JAX: {versions}; Keras on the jax backend, in this process",
        "  threads : bncpu's OpenMP team at the row's thread count; XLA's own pool as jax "
        f"starts it: {pool}; the two steps alternate, call by call, each starting right "
        "after the other's (as bncpu's calls sit between XLA's ops in a model)",
        "  step    : jax.jit(jax.grad) of vdot(batch norm(x), dy) in training: the gradients "
        "and the new running statistics",
    ])
    columns = WIDE_FRAMEWORK_COLUMNS if wide else FRAMEWORK_COLUMNS
    return ["", *notes, *table_lines(steps, columns=columns)]


def header_lines(env, thread_counts, quick):
    onednn_line = (f"{env['onednn']}, on the case's layout, and (--wide) on the fastest of "
                   "plain, NHWC, nChw8c, nChw16c" if env["onednn"]
                   else f"column skipped: {env['onednn_missing']}")
    return _fit([
        f"bncpu {env['bncpu']} speed report{' (--quick)' if quick else ''}",
        f"  kernels : {env['isa']} build, OpenMP {'on' if env['openmp'] else 'off'}, "
        f"threads {','.join(map(str, thread_counts))}"
        + (" (bncpu and torch alike)" if env["torch"] else ""),
        f"  CPU     : {env['cpu']}, {env['cpu_count']} logical CPUs",
        f"  versions: Python {env['python']}, numpy {env['numpy']}, "
        f"torch {env['torch'] or 'not installed'}",
        f"  floor   : {env['floor']}",
        f"  clock   : {env['clock']}; medians of samples taken round-robin, the NumPy "
        "reference's apart",
        f"  OpenMP  : wait policy {env['wait_policy']}",
        "  memory  : " + ("malloc keeps freed memory for reuse (no page faults on every call)"
                          if env["reuse_freed_memory"] else "the C library's default malloc"),
        f"  oneDNN  : {onednn_line}",
        "  not timed: " + "; ".join(f"{name} ({why})"
                                    for name, why in cases_module.NOT_TIMED.items()),
        "  columns : bncpu = time per call, allocating its results; GB/s = bytes an ideal "
        "kernel moves / bncpu time;",
        "            vs X = X's time / bncpu's time: how many times faster bncpu is (above 1: "
        "faster);",
        "            oneDNN (best layout) runs on preallocated buffers, so it is compared with "
        "bncpu into out=;",
        "            the floor (one pass over the bytes) is not beatable: vs floor 0.5x = twice "
        "its time",
        f"  targets : {SOURCE};",
        "            ok when every goal is met, else MISS and the ratios that miss "
        "(--wide or --json: each goal)",
    ])


def layout_lines(rows):
    """Channels-last rows against the channels-first rows of the same size: how many
    times faster bncpu is on NHWC data than on NCHW data."""
    first = {(row.case.op, row.case.shape, row.case.dtype, row.n_threads): row
             for row in rows if row.case.axis == 1}
    lines = []
    for row in rows:
        if row.case.axis != -1 or not row.medians.get("bncpu"):
            continue
        shape = row.case.shape
        nchw = first.get((row.case.op, (shape[0], shape[-1]) + shape[1:-1], row.case.dtype,
                          row.n_threads))
        if nchw is not None and nchw.medians.get("bncpu"):
            lines.append(f"  {row.case.label} {shape} {row.n_threads}t: "
                         f"{nchw.medians['bncpu'] / row.medians['bncpu']:.2f}x faster than "
                         f"channels-first {nchw.case.shape}")
    return (["channels-last vs channels-first (bncpu, same sizes):"] + lines) if lines else []


def summary_line(rows):
    verdicts = [met for row in rows for _, _, met in row.targets]
    return (f"targets: {verdicts.count(True)} met, {verdicts.count(False)} missed, "
            f"{verdicts.count(None)} not measurable")


# ---------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------
def write_plot(rows, thread_counts, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_threads = [[row for row in rows if row.n_threads == n] for n in thread_counts]
    height = max(4.0, 0.22 * max(len(group) for group in per_threads) + 1.5)
    figure, axes = plt.subplots(1, len(thread_counts), figsize=(9 * len(thread_counts), height),
                                squeeze=False)
    series = (("torch", "vs PyTorch"), ("reference", "vs NumPy reference"))
    for ax, n_threads, group in zip(axes[0], thread_counts, per_threads):
        positions = range(len(group))
        bar = 0.4
        for offset, (metric, label) in enumerate(series):
            values = [row.ratios.get(metric, float("nan")) for row in group]
            ax.barh([p + offset * bar for p in positions], values, height=bar, label=label)
        ax.set_yticks([p + bar / 2 for p in positions])
        ax.set_yticklabels([f"{row.case.label} {row.case.shape} {row.case.dtype}" for row in group],
                           fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("times faster than (their time / bncpu time, log scale)")
        ax.set_title(f"bncpu, {n_threads} thread{'s' if n_threads > 1 else ''}")
        ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    cases = [case for case in cases_module.cases(quick=args.quick)
             if args.cases is None or args.cases.search(case.id)]
    env = environment()
    env["reuse_freed_memory"] = not args.default_malloc and machine.reuse_freed_memory()
    thread_counts = args.threads or [env["default_threads"]]
    timing.use_cpu_clock(args.cpu_clock)
    env["clock"] = "thread CPU time" if args.cpu_clock else "wall clock"
    budget = timing.QUICK if args.quick else timing.FULL

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = datetime.datetime.now().astimezone()
    before = machine.cpu_snapshot()
    log(f"timing {len(cases)} cases at {','.join(map(str, thread_counts))} thread(s)...")
    rows = run(cases, thread_counts, budget, log)
    after = machine.cpu_snapshot()
    elapsed = after[0] - before[0]
    env["others_cpu_share"] = machine.others_share(before, after)

    # Other processes on the CPUs stretch multi-threaded timings most: an OpenMP team
    # waits for its slowest thread. Said first and last, where a reader looks.
    busy = busy_lines(env, thread_counts)
    print("\n".join(busy + header_lines(env, thread_counts, args.quick)))
    for n_threads in thread_counts:
        at_n = [row for row in rows if row.n_threads == n_threads]
        print(f"\nthreads: {n_threads}")
        ours = [row for row in at_n if not row.case.operation.framework]
        print("\n".join((table_lines(ours, wide=args.wide) if ours else [])
                        + framework_lines(env, at_n, wide=args.wide)))
    layouts = layout_lines(rows)
    if layouts:
        print("\n" + "\n".join(layouts))
    print(f"\n{summary_line(rows)}; {len(rows)} rows in {elapsed:.0f} s")
    if env["others_cpu_share"] is not None:
        print(f"other processes used {env['others_cpu_share']:.0%} of the CPUs during the run")
    if busy:
        print("\n".join(busy))

    if args.json:
        with open(args.json, "w") as out:
            json.dump({"environment": env, "argv": sys.argv[1:] if argv is None else list(argv),
                       "started": started.isoformat(timespec="seconds"),
                       "elapsed_s": elapsed, "quick": args.quick, "threads": thread_counts,
                       "budget": dataclasses.asdict(budget),
                       "results": [row.as_json() for row in rows]}, out, indent=1)
        log(f"wrote {args.json}")
    if args.plot:
        write_plot(rows, thread_counts, args.plot)
        log(f"wrote {args.plot}")
    return 0
