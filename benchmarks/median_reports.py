"""Medians over several speed reports: the figure the targets are judged on.

One report is one sample of a noisy machine. Run the report a few times in a row and give
the JSON files to this script: per row (case and thread count) it takes the median of
each ratio over the reports, judges every target on that median, and prints the rows that
miss, with the value of each report beside the median.

    for r in 1 2 3; do python -m bncpu --threads 1,2 --json report$r.json; done
    python benchmarks/median_reports.py report1.json report2.json report3.json
    python benchmarks/median_reports.py report*.json --all     # every row, not only misses
"""
import argparse
import json
import statistics
import sys

from bncpu.bench import targets


def load(paths):
    reports = []
    for path in paths:
        with open(path) as handle:
            reports.append(json.load(handle))
    return reports


def rows_by_key(report):
    return {(row["case"], row["threads"]): row for row in report["results"]}


def judge(target, value):
    """Whether ``value`` meets ``target`` (its text in a report), as the report judges."""
    if value is None:
        return None
    parsed = targets.Target.parse(target)
    return parsed.met({parsed.metric: value})


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(reports):
    """[(key, label, shape, dtype, {ratio: (median, [values])}, [(target, median, values,
    met)])] for the rows every report has."""
    tables = [rows_by_key(report) for report in reports]
    keys = [key for key in tables[0] if all(key in table for table in tables[1:])]
    summary = []
    for key in keys:
        rows = [table[key] for table in tables]
        first = rows[0]
        ratios = {}
        for name in first.get("ratios", {}):
            values = [row["ratios"].get(name) for row in rows]
            ratios[name] = (median_or_none(values), values)
        targets = []
        for index, target in enumerate(first.get("targets", [])):
            values = [row["targets"][index]["value"] if index < len(row["targets"]) else None
                      for row in rows]
            value = median_or_none(values)
            targets.append((target["target"], value, values, judge(target["target"], value)))
        summary.append((key, first["label"], tuple(first["shape"]), first["dtype"], ratios,
                        targets))
    return summary


def shown(value):
    return "-" if value is None else f"{value:.3g}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="`python -m bncpu --json` files")
    parser.add_argument("--all", action="store_true", help="print every row, not only misses")
    args = parser.parse_args(argv)
    reports = load(args.reports)
    summary = summarize(reports)
    met = missed = 0
    behind_torch = []
    print(f"{len(reports)} reports: " + ", ".join(
        f"{report.get('started', '?')} ({report.get('elapsed_s', 0):.0f} s)" for report in reports))
    for key, label, shape, dtype, ratios, targets in summary:
        case, threads = key
        for target, value, values, ok in targets:
            if ok is True:
                met += 1
            elif ok is False:
                missed += 1
        torch_ratio = ratios.get("torch", (None, []))[0]
        if torch_ratio is not None and torch_ratio < 1:
            behind_torch.append((threads, shape, dtype, label, ratios["torch"]))
        misses = [t for t in targets if t[3] is False]
        if args.all or misses:
            cells = "  ".join(f"{name} {shown(med)}" for name, (med, _) in ratios.items()
                              if name != "reference")
            print(f"{threads}t {str(shape):18s} {dtype:8s} {label:30s} {cells}")
            for target, value, values, ok in targets:
                if args.all or ok is False:
                    state = {True: "ok", False: "MISS", None: "?"}[ok]
                    print(f"      {target:18s} {state:4s} median {shown(value)}  "
                          f"({', '.join(shown(v) for v in values)})")
    print(f"\ntargets on the medians: {met} met, {missed} missed")
    print(f"rows behind torch on the median ({len(behind_torch)}):")
    for threads, shape, dtype, label, (median, values) in behind_torch:
        print(f"  {threads}t {shape} {dtype} {label}: {median:.3f}x "
              f"({', '.join(shown(v) for v in values)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
