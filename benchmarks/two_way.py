"""A plain two-way round-robin, to check the speed report against.

For each chosen case: bncpu, torch, bncpu, torch, ... a sample each, both allocating
their results as in the report, nothing else running in between; the speed-up is the
median torch time over the median bncpu time. This harness is deliberately plain: it
shares with ``python -m bncpu`` the case registry (inputs and calls) and the sampling rule
(samples of about 4 ms, a short call warmed by an untimed call), not its timing code, its
rotation over seven implementations or its statistics, so that agreement between the two
says the report's timing is sound.

    python benchmarks/two_way.py --threads 2                          # every report row
    python benchmarks/two_way.py --threads 2 --cases 'bn_bwd_train-32x64'
    python -m bncpu --threads 2 --json report.json
    python benchmarks/two_way.py --threads 2 --compare report.json    # rows side by side

With ``--compare``, each row prints the report's speed-up over torch next to this one's
and their difference; the last line gives the largest difference. Timings on a loaded
machine are noisy: run both on an idle one to check the 10% agreement.

On a busy machine the load changes between two runs minutes apart. ``--interleave K``
compares in one process instead: per case, K times, the report's harness (every
implementation, ``bncpu.bench.timing.measure`` with the report's budget) and then this two-way
loop, each giving a speed-up over torch; the medians of the K are compared.

    python benchmarks/two_way.py --threads 2 --interleave 3
"""
import argparse
import gc
import json
import re
import statistics
import sys

from bncpu.bench import cases, machine, peers, timing


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="thread count for bncpu and torch (default: bncpu's)")
    parser.add_argument("--samples", type=int, default=21, help="samples per side (default 21)")
    parser.add_argument("--min-sample", type=float, default=timing.FULL.sample_seconds,
                        metavar="SECONDS",
                        help="calls are looped until a sample lasts this long (default: the "
                             f"report's, {timing.FULL.sample_seconds})")
    parser.add_argument("--cases", default=None, metavar="REGEX",
                        help="only cases whose id matches, e.g. 'bn_bwd_train-32x64x56x56'")
    parser.add_argument("--quick", action="store_true", help="only the report's --quick cases")
    parser.add_argument("--compare", metavar="REPORT_JSON",
                        help="a `python -m bncpu --json` file to compare with")
    parser.add_argument("--cpu-clock", action="store_true",
                        help="time with the thread's CPU time (1 thread only), as the report's "
                             "--cpu-clock")
    parser.add_argument("--interleave", type=int, default=0, metavar="K",
                        help="alternate the report's harness and this one K times per case")
    parser.add_argument("--json", metavar="FILE", help="write the medians and ratios")
    return parser.parse_args(argv)


def two_way(bncpu_call, torch_call, samples, min_sample):
    """Median seconds per call of each side, alternating samples.

    Each side loops its own number of calls per sample (its fastest of three calls,
    against ``min_sample``) and, when that is more than one, is called once untimed
    before each sample: the report's sampling rule. (With one loop count for both sides
    and the warm-up tied to it, a 1.2 ms bncpu call paired with a 6 ms torch call ran
    cold right after torch's, 1.66-1.92 ms instead of 1.14-1.41 ms back to back, on
    (8, 32, 112, 112) training forward. Alternated in one process, the harnesses then
    disagreed by 15-44% on the medium training-forward rows, and by 5-30% after this
    change.)"""
    for call in (bncpu_call, torch_call, bncpu_call, torch_call):
        call()
    loops = {}
    for name, call in (("bncpu", bncpu_call), ("torch", torch_call)):
        per_call = min(_time_once(call) for _ in range(3))
        loops[name] = max(1, int(min_sample / max(per_call, 1e-7)))
    times = {"bncpu": [], "torch": []}
    for _ in range(samples):
        for name, call in (("bncpu", bncpu_call), ("torch", torch_call)):
            if loops[name] > 1:   # as the report: a short call starts from its own cache state
                call()
            start = timing.clock()
            for _ in range(loops[name]):
                call()
            times[name].append((timing.clock() - start) / loops[name])
    return {name: statistics.median(values) for name, values in times.items()}


def _time_once(call):
    start = timing.clock()
    call()
    return timing.clock() - start


def interleaved(inputs, calls, n_threads, args):
    """(two-way speed-up, report-harness speed-up), medians over ``args.interleave``
    alternations in this process."""
    mine, report = [], []
    for _ in range(args.interleave):
        timings = timing.measure(peers.implementation_calls(inputs, n_threads), timing.FULL)
        report.append(timings["torch"].median / timings["bncpu"].median)
        medians = two_way(*calls, args.samples, args.min_sample)
        mine.append(medians["torch"] / medians["bncpu"])
    return statistics.median(mine), statistics.median(report)


def report_ratios(path, n_threads):
    """{case id: speed-up over torch} of a report's JSON at ``n_threads``."""
    with open(path) as source:
        report = json.load(source)
    return {row["case"]: row["ratios"].get("torch") for row in report["results"]
            if row["threads"] == n_threads}


def main(argv=None):
    args = parse_args(argv)
    if peers.torch is None:
        sys.exit("two_way.py compares with torch: install torch==2.13.0")
    machine.reuse_freed_memory()   # the report's default, so that both see the same malloc
    n_threads = args.threads or bncpu.get_num_threads()
    if args.cpu_clock:
        if n_threads != 1:
            sys.exit("--cpu-clock needs --threads 1")
        timing.use_cpu_clock(True)
    machine.set_threads(n_threads)
    pattern = re.compile(args.cases) if args.cases else None
    reported = report_ratios(args.compare, n_threads) if args.compare else {}
    results = []
    gc.disable()
    for case in cases.cases(quick=args.quick):
        if pattern and not pattern.search(case.id):
            continue
        inputs = cases.Inputs(case)
        calls = [peers.implementation_call(inputs, name, n_threads) for name in ("bncpu", "torch")]
        if any(isinstance(call, Exception) for call in calls):
            continue
        try:
            medians = two_way(*calls, args.samples, args.min_sample)
        except (NotImplementedError, RuntimeError):   # no CPU kernel in torch
            continue
        ratio = medians["torch"] / medians["bncpu"]
        if args.interleave:
            ratio, reported[case.id] = interleaved(inputs, calls, n_threads, args)
        line = (f"{case.id:45s} bncpu {timing.format_seconds(medians['bncpu']):>9s}  "
                f"torch {timing.format_seconds(medians['torch']):>9s}  vs torch {ratio:6.3g}x")
        result = {"case": case.id, "threads": n_threads, "median_s": medians, "vs_torch": ratio}
        if reported.get(case.id):
            difference = reported[case.id] / ratio - 1
            result["report_vs_torch"] = reported[case.id]
            result["difference"] = difference
            line += f"  report {reported[case.id]:6.3g}x  {difference:+6.1%}"
        print(line, flush=True)
        results.append(result)
    compared = [result for result in results if "difference" in result]
    if compared:
        worst = max(compared, key=lambda result: abs(result["difference"]))
        within = sum(abs(result["difference"]) <= 0.1 for result in compared)
        print(f"{within} of {len(compared)} rows within 10% of the report; largest difference "
              f"{worst['difference']:+.1%} ({worst['case']})")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"threads": n_threads, "samples": args.samples, "results": results}, out,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
