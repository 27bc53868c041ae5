"""A paper model of thread scaling from a speed report run at 1 and 2 threads.

No many-core machine was at hand, so each row's 1- and 2-thread medians are fitted to

    t(p) = max(serial + parallel / p,  bytes_moved / min(p * per_core_bw, socket_bw))

(Amdahl's law, bounded below by memory bandwidth): ``parallel = 2 * (t1 - t2)``, ``serial =
t1 - parallel``; ``per_core_bw`` is the bandwidth one thread reached (bytes / t1, never more
than ``--core-bw``), ``socket_bw`` what the whole socket can stream (``--socket-bw``, 100
GB/s by default: a typical 8-channel DDR4 server; measure yours with the floor column of
a many-thread report). The model ignores fork/join costs (a few microseconds per region,
growing with the team) and shared L3, so it flatters small inputs; it says which of the
two limits a kernel meets first.

    python -m bncpu --threads 1,2 --json report.json
    python benchmarks/scaling_model.py report.json --socket-bw 100
"""
import argparse
import json
import sys

THREADS = (1, 2, 4, 8, 16)


def model(t1, t2, bytes_moved, core_bw, socket_bw):
    """({p: predicted seconds}, limit) for one row."""
    parallel = min(t1, max(0.0, 2.0 * (t1 - t2)))   # 2 threads no slower, no better than 2x
    serial = t1 - parallel
    per_core = min(bytes_moved / t1, core_bw)
    predicted, limits = {}, {}
    for p in THREADS:
        compute = serial + parallel / p
        memory = bytes_moved / min(p * per_core, socket_bw)
        predicted[p] = max(compute, memory)
        limits[p] = "bandwidth" if memory > compute * 1.000001 else (
            "serial part" if serial > parallel / p else "compute")
    return predicted, limits[THREADS[-1]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="JSON of `python -m bncpu --threads 1,2 --json FILE`")
    parser.add_argument("--socket-bw", type=float, default=100.0, metavar="GB/s")
    parser.add_argument("--core-bw", type=float, default=20.0, metavar="GB/s",
                        help="most one thread can stream (default 20)")
    parser.add_argument("--implementation", default="bncpu")
    args = parser.parse_args(argv)
    with open(args.report) as source:
        results = json.load(source)["results"]
    by_case = {}
    for row in results:
        median = row["implementations"].get(args.implementation, {}).get("median_s")
        if median:
            by_case.setdefault(row["case"], {"bytes": row["bytes_moved"]})[row["threads"]] = median
    print(f"{'case':48s} {'t1':>8s} {'2t':>6s} " + " ".join(f"{p:>5d}t" for p in THREADS[2:])
          + "  limit at 16t")
    for case, found in by_case.items():
        if 1 not in found or 2 not in found:
            continue
        t1, t2 = found[1], found[2]
        predicted, limit = model(t1, t2, found["bytes"], args.core_bw * 1e9,
                                 args.socket_bw * 1e9)
        speedups = " ".join(f"{t1 / predicted[p]:5.1f}x" for p in THREADS[2:])
        print(f"{case:48s} {t1 * 1e3:6.2f}ms {t1 / t2:5.2f}x {speedups}  {limit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
