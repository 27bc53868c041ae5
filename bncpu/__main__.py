"""The speed report: ``python -m bncpu`` (or the ``bncpu-bench`` console script).

One table, in the spirit of bottleneck's ``bench()``: per shape and operation, bncpu's
median time (allocating its result, and into ``out=``), its speed-up over the NumPy
reference, PyTorch CPU and oneDNN (when its wheels are installed), and its time as a
multiple of the streaming floor, with the goals that apply marked met or missed. The
cases and the timing harness live in bncpu/_bench.py, shared with the pytest-benchmark
suite in benchmarks/.
"""
import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import sys

from bncpu import _bench


def parse_threads(text):
    try:
        return _bench.parse_thread_counts(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_pattern(text):
    try:
        return re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"not a regular expression: {error}") from None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bncpu",
        description="Time bncpu against its NumPy reference, PyTorch CPU, oneDNN and the "
                    "streaming floor, side by side in one process, and print one table.")
    parser.add_argument("--threads", type=parse_threads, default=None, metavar="N[,N...]",
                        help="thread counts to run at, e.g. 2 or 1,2 (default: "
                             "bncpu.get_num_threads())")
    parser.add_argument("--quick", action="store_true",
                        help="only the shapes with targets, shorter timing (about a minute)")
    parser.add_argument("--cases", type=parse_pattern, default=None, metavar="REGEX",
                        help="only the cases whose id matches, e.g. 'bn_bwd_train-32x64x56x56' "
                             "(ids: operation-shape-dtype, as in the JSON and benchmarks/)")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with the calling thread's CPU time instead of the wall "
                             "clock: steadier on a busy machine; needs --threads 1")
    parser.add_argument("--json", metavar="FILE", help="write every raw timing and the environment")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG bar chart of the speed-ups "
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
class Row:
    """One line of the table: a case at one thread count."""

    def __init__(self, case, n_threads, timings):
        self.case = case
        self.n_threads = n_threads
        self.timings = timings
        self.medians = {name: timing.median for name, timing in timings.items()}
        self.ratios = _bench.ratios(self.medians)
        self.targets = [(target, target.value(self.ratios), target.met(self.ratios))
                        for target in _bench.targets(case, n_threads)]

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
                name: {"status": timing.status, "median_s": timing.median,
                       "calls_per_sample": timing.calls_per_sample, "note": timing.note,
                       "page_faults_per_call": timing.faults_per_call,
                       "samples_s": timing.samples}
                for name, timing in self.timings.items()},
            "ratios": self.ratios,
            "targets": [{"target": str(target), "value": value, "met": met}
                        for target, value, met in self.targets],
        }


def run(cases, thread_counts, budget, log):
    rows = []
    total = len(cases) * len(thread_counts)
    for case in cases:
        for n_threads, timings in _bench.run_case(case, thread_counts, budget):
            rows.append(Row(case, n_threads, timings))
            times = "  ".join(f"{name} {_bench.format_seconds(timing.median)}"
                              if timing.status == "ok" else f"{name} {timing.status}"
                              for name, timing in timings.items())
            log(f"[{len(rows):3d}/{total}] {n_threads}t {case.label} {case.shape} {case.dtype}: "
                f"{times}")
    return rows


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def _speedup(value):
    if value is None:
        return "n/a"
    return f"{value:.0f}x" if value >= 1000 else f"{value:.3g}x"


def _targets_cell(row):
    cells = []
    for target, value, met in row.targets:
        if met is None:
            cells.append(f"{target}:?")
        else:
            cells.append(f"{target}:ok" if met else f"{target}:MISS({value:.3g})")
    return " ".join(cells)


COLUMNS = ("shape", "dtype", "operation", "bncpu", "out=", "GB/s", "vs ref", "vs torch",
           "vs oneDNN", "oneDNN best", "x floor", "targets")


def table_lines(rows):
    body = []
    for row in rows:
        own = row.medians.get("bncpu")
        gbps = f"{row.case.bytes_moved / own / 1e9:.1f}" if own else "-"
        floor = row.ratios.get("floor")
        # Without a time, the bncpu cell says why (the status, cut to fit).
        own_cell = _bench.format_seconds(own) if own else row.timings["bncpu"].status[:40]
        out = row.medians.get("bncpu_out")
        best = _speedup(row.ratios.get("onednn_best"))
        if row.ratios.get("onednn_best") and row.timings["onednn_best"].note not in (None,
                                                                                      "plain"):
            best += f" {row.timings['onednn_best'].note}"
        body.append((str(row.case.shape), row.case.dtype, row.case.label, own_cell,
                     _bench.format_seconds(out) if out else "-", gbps,
                     _speedup(row.ratios.get("reference")), _speedup(row.ratios.get("torch")),
                     _speedup(row.ratios.get("onednn")), best,
                     f"{floor:.2f}x" if floor else "n/a", _targets_cell(row)))
    widths = [max(len(line[i]) for line in body + [COLUMNS]) for i in range(len(COLUMNS))]
    left = {0, 1, 2, 9, 11}

    def render(cells):
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()
    lines = [render(COLUMNS), render(["-" * w for w in widths])]
    previous_shape = None
    for cells in body:
        if previous_shape is not None and cells[0] != previous_shape:
            lines.append("")
        previous_shape = cells[0]
        lines.append(render(cells))
    return lines


def header_lines(env, thread_counts, quick):
    lines = [
        f"bncpu {env['bncpu']} speed report{' (--quick)' if quick else ''}",
        f"  kernels : {env['isa']} build, OpenMP {'on' if env['openmp'] else 'off'}, "
        f"threads {','.join(map(str, thread_counts))}"
        + (" (bncpu and torch alike)" if env["torch"] else ""),
        f"  CPU     : {env['cpu']}, {env['cpu_count']} logical CPUs",
        f"  versions: Python {env['python']}, numpy {env['numpy']}, "
        f"torch {env['torch'] or 'not installed'}",
        f"  floor   : {env['floor']}",
        f"  clock   : {env['clock']}",
        "  timing  : medians of samples taken round-robin (bncpu, bncpu out=, bncpu's batch",
        "            norm alone for the fused rows, torch, oneDNN, floor), then the NumPy",
        "            reference's apart; bncpu, torch and the reference allocate their results,",
        "            bncpu out=, oneDNN and the floor write into preallocated arrays",
        f"  OpenMP  : wait policy {env['wait_policy']}",
        "  memory  : " + ("malloc keeps freed memory for reuse (no page faults on every call)"
                          if env["reuse_freed_memory"] else "the C library's default malloc"),
        "  oneDNN  : " + (f"{env['onednn']}, on the case's layout, and on the fastest of plain, "
                          "NHWC, nChw8c, nChw16c (its\n            reference code left out; "
                          "named when not plain)" if env["onednn"]
                          else f"column skipped: {env['onednn_missing']}"),
        "  not timed: " + "; ".join(f"{name} ({why})" for name, why in _bench.NOT_TIMED.items()),
        "  columns : bncpu = time per call; out= = time per call into a preallocated out=;",
        "            GB/s = bytes an ideal kernel moves / bncpu time;",
        "            vs ref, vs torch = their time / bncpu time;",
        "            vs oneDNN, oneDNN best = its time / bncpu out= time;",
        "            x floor = bncpu time / floor time;",
        "            targets = the goals that apply, ok, MISS(measured value), or ? when not",
        "            measurable here",
    ]
    return lines


def layout_lines(rows):
    """Channels-last rows against the channels-first rows of the same size: bncpu's time
    on NHWC data over its time on NCHW data."""
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
                         f"{row.medians['bncpu'] / nchw.medians['bncpu']:.2f}x the time of "
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
        ax.set_xlabel("speed-up of bncpu (their time / bncpu time, log scale)")
        ax.set_title(f"bncpu speed-ups, {n_threads} thread{'s' if n_threads > 1 else ''}")
        ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    env = _bench.environment()
    env["reuse_freed_memory"] = not args.default_malloc and _bench.reuse_freed_memory()
    thread_counts = args.threads or [env["default_threads"]]
    _bench.use_cpu_clock(args.cpu_clock)
    env["clock"] = "thread CPU time" if args.cpu_clock else "wall clock"
    cases = [case for case in _bench.cases(quick=args.quick)
             if args.cases is None or args.cases.search(case.id)]
    budget = _bench.QUICK if args.quick else _bench.FULL

    def log(message):
        print(message, file=sys.stderr, flush=True)

    started = datetime.datetime.now().astimezone()
    before = _bench.cpu_snapshot()
    log(f"timing {len(cases)} cases at {','.join(map(str, thread_counts))} thread(s)...")
    rows = run(cases, thread_counts, budget, log)
    after = _bench.cpu_snapshot()
    elapsed = after[0] - before[0]
    env["others_cpu_share"] = _bench.others_share(before, after)

    print("\n".join(header_lines(env, thread_counts, args.quick)))
    for n_threads in thread_counts:
        print(f"\nthreads: {n_threads}")
        print("\n".join(table_lines([row for row in rows if row.n_threads == n_threads])))
    layouts = layout_lines(rows)
    if layouts:
        print("\n" + "\n".join(layouts))
    print(f"\n{summary_line(rows)}; {len(rows)} rows in {elapsed:.0f} s")
    # Other processes on the CPUs stretch multi-threaded timings most: an OpenMP team waits
    # for its slowest thread.
    if env["others_cpu_share"] is not None:
        print(f"other processes used {env['others_cpu_share']:.0%} of the CPUs during the run"
              + ("; the timings are noisy, rerun on an idle machine"
                 if env["others_cpu_share"] > 0.1 else ""))
        # A spinning OpenMP worker that shares its core with other processes stalls the
        # team for a scheduler time slice at every barrier (benchmarks/thread_wait.py).
        if (env["others_cpu_share"] > 0.1 and max(thread_counts) > 1
                and not os.environ.get("OMP_WAIT_POLICY")):
            print("with other processes on the cores, OpenMP's spinning workers stall at "
                  "barriers: OMP_WAIT_POLICY=passive gives steadier multi-thread timings")

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


if __name__ == "__main__":
    sys.exit(main())
