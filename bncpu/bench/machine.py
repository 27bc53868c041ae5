"""The machine a report runs on: thread counts, the C library's malloc, the CPU model, the
OpenMP wait policy, and how much of the CPUs other processes used during the run."""
import ctypes
import os
import platform
import time

import bncpu

try:
    import torch
except ImportError:
    torch = None


def parse_thread_counts(text):
    """'2' or '1,2' -> [2] or [1, 2]; ValueError for anything else."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"expected thread counts like 2 or 1,2; got {text!r}")
    return counts


def set_threads(n_threads):
    """Run bncpu and torch with the same team size."""
    bncpu.set_num_threads(n_threads)
    if torch is not None:
        torch.set_num_threads(n_threads)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wait_policy():
    """The OpenMP wait policy in effect, from the environment libgomp read at start-up."""
    settings = [f"{name}={os.environ[name]}" for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
                if os.environ.get(name)]
    return ", ".join(settings) or "default (workers spin ~300,000 iterations, then sleep)"


def reuse_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse: returns True when it agreed.

    By default glibc maps each large block (above a threshold that moves with the history
    of frees, up to 32 MB) fresh from the kernel and hands it back when freed, so a call
    that allocates a large result may pay a page fault per 4 KiB, or not, depending on
    which cases ran before. Fixed, high thresholds give every implementation the steady
    state of a long-running program, and timings that do not depend on case order.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # from glibc's malloc.h
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))


def cpu_snapshot():
    """(wall seconds, CPU-seconds the whole machine has run, CPU-seconds this process has
    run), for ``others_share``; the machine's figure is None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(field) for field in stat.readline().split()[1:9]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy,
        # steal being time the hypervisor gave to other guests.
        machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = None
    return time.perf_counter(), machine, time.process_time()


def others_share(before, after):
    """Fraction of the machine's CPU capacity other processes used between two snapshots:
    the noise a run suffered (None when unknown)."""
    if before[1] is None or after[1] is None:
        return None
    capacity = (after[0] - before[0]) * (os.cpu_count() or 1)
    others = (after[1] - before[1]) - (after[2] - before[2])
    return min(1.0, max(0.0, others / capacity)) if capacity > 0 else None
