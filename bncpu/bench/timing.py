"""How a case is timed: its implementations round-robin, medians of samples.

``measure`` times the implementations of a case round-robin (bncpu, torch, floor,
bncpu, ...) so that a noisy neighbour on a small machine hits all of them alike, and the
NumPy reference apart afterwards; a sample loops a call until it lasts a set time.
"""
import dataclasses
import gc
import time

try:
    import resource
except ImportError:   # Windows
    resource = None

import numpy as np


class Unavailable(Exception):
    """An implementation that cannot run this case: not installed, no CPU kernel, no
    primitive."""


# The implementations timed apart from the round-robin: the reference, whose calls on
# large inputs take tenths of a second and churn through temporaries.
TIMED_APART = ("reference",)


@dataclasses.dataclass
class Timing:
    """Per-call times (seconds) of one implementation on one case, or why there are none;
    ``note`` says which variant ran when there is a choice (oneDNN's layout)."""
    samples: list = dataclasses.field(default_factory=list)
    calls_per_sample: int = 1
    status: str = "ok"       # "ok", "n/a: <reason>" or "error: <message>"
    note: str = None
    faults: int = 0          # minor page faults during the samples (Linux, macOS)

    @property
    def faults_per_call(self):
        calls = len(self.samples) * self.calls_per_sample
        return self.faults / calls if calls else None

    @property
    def median(self):
        return float(np.median(self.samples)) if self.status == "ok" and self.samples else None


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to time one case: at least ``min_rounds`` round-robin rounds, then more
    until ``seconds`` have passed (at most ``max_rounds``); but never more than
    ``max_seconds`` once 3 rounds are in (a busy machine can make every call 10x
    slower than its calibration, and the report must still end). A sample loops the call
    until it lasts ``sample_seconds``. Implementations timed apart (the reference) then
    get up to ``apart_samples`` samples, at most ``apart_seconds`` in all, and when a
    single call takes longer than ``once_seconds`` its calibration call is its only
    sample."""
    seconds: float
    max_seconds: float
    sample_seconds: float
    min_rounds: int
    max_rounds: int
    apart_samples: int
    apart_seconds: float
    once_seconds: float


# min_rounds: with 7 samples (and the reference's calls between them) the report's
# (32, 64, 56, 56) backward once read 0.93x torch where a two-way round-robin read 2.8x;
# 11 rounds without the reference agree with benchmarks/two_way.py (docs/speed.md).
FULL = Budget(seconds=0.5, max_seconds=6.0, sample_seconds=0.004, min_rounds=11,
              max_rounds=101, apart_samples=7, apart_seconds=0.5, once_seconds=0.5)
QUICK = Budget(seconds=0.3, max_seconds=3.0, sample_seconds=0.003, min_rounds=9,
               max_rounds=61, apart_samples=5, apart_seconds=0.3, once_seconds=0.3)


def describe(error):
    """A Timing status for an implementation that could not run: 'n/a: ...' when it does
    not exist here (not installed, no CPU kernel), 'error: ...' when it failed."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (Unavailable, NotImplementedError)):
        if "CPU" in message and "backend" in message:
            message = "no CPU kernel in torch"
        return f"n/a: {message}"
    return f"error: {type(error).__name__}: {message}"


# What a sample is timed with: wall-clock time, or (``use_cpu_clock``, one thread only)
# the calling thread's CPU time, which a busy machine's other processes do not inflate.
clock = time.perf_counter


def use_cpu_clock(enabled):
    """Time samples with the calling thread's CPU time (True) or the wall clock (False).
    Only meaningful at 1 thread, where every implementation runs on the calling thread."""
    global clock
    clock = time.thread_time if enabled else time.perf_counter


def _time_call(call):
    start = clock()
    call()
    return clock() - start


def _minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _sample(timing, call):
    """One sample of ``call`` into ``timing``: its time per call and its page faults.

    A short call (several per sample) is called once untimed first: its inputs and
    results fit in the caches, and without that call its time would depend on what the
    previous implementation left there (the floor's or oneDNN's buffers)."""
    if timing.calls_per_sample > 1:
        call()
    faults = _minor_faults()
    begin = clock()
    for _ in range(timing.calls_per_sample):
        call()
    timing.samples.append((clock() - begin) / timing.calls_per_sample)
    timing.faults += _minor_faults() - faults


def measure(calls, budget):
    """Time ``calls`` ({name: callable or Exception}); {name: Timing}.

    The implementations not in ``TIMED_APART`` run round-robin, a sample of each per
    round, so that a noisy neighbour hits all of them alike; those timed apart follow,
    back to back, so that their long calls (and the memory they churn) do not sit between
    the others' samples."""
    timings = {name: Timing() for name in calls}
    runnable = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name, call in calls.items():
            if isinstance(call, Exception):
                timings[name].status = describe(call)
                continue
            timings[name].note = getattr(call, "layout", None)
            try:
                # The first call pays one-time costs (first touch of fresh memory, thread
                # start-up); unless it was already too long, the fastest of the next three
                # calibrates (one call, on a busy machine, was off by up to 10x).
                per_call = _time_call(call)
                if per_call <= budget.once_seconds:
                    per_call = min(_time_call(call) for _ in range(3 if per_call < 0.1 else 1))
            except Exception as error:
                timings[name].status = describe(error)
                continue
            runnable[name] = call
            if per_call > budget.once_seconds:
                timings[name].samples.append(per_call)
            timings[name].calls_per_sample = max(1, int(budget.sample_seconds
                                                        / max(per_call, 1e-7)))
        rotation = [name for name in runnable if name not in TIMED_APART]
        start = time.perf_counter()
        for rounds in range(1, budget.max_rounds + 1):
            for name in rotation:
                _sample(timings[name], runnable[name])
            elapsed = time.perf_counter() - start
            if rounds >= budget.min_rounds and elapsed >= budget.seconds:
                break
            if rounds >= 3 and elapsed >= budget.max_seconds:
                break
        for name in runnable:
            if name not in TIMED_APART:
                continue
            timing, start = timings[name], time.perf_counter()
            while (len(timing.samples) < budget.apart_samples
                   and time.perf_counter() - start < budget.apart_seconds):
                _sample(timing, runnable[name])
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def format_seconds(seconds):
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"
