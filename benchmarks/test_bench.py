"""bncpu side by side with its NumPy reference, PyTorch CPU, oneDNN and the streaming floor.

One pytest-benchmark group per (operation, shape, dtype, threads), e.g.
"batch_norm fwd train (32, 64, 56, 56) float32 2t", holding the implementations
(see bncpu/bench/peers.py for what each one runs and how the floor is made). ``extra_info``
records the bytes an ideal kernel moves, the GB/s that makes at the median time, and the
thread count.

    pytest benchmarks/ --benchmark-json=bench.json
    pytest benchmarks/ --bench-quick --bench-threads 1,2
"""
import pytest

from bncpu.bench import peers, targets, timing

# Above this input size the reference takes tenths of a second per call: a few rounds
# of it say enough.
REFERENCE_PEDANTIC_BYTES = 4 << 20


def test_bench(benchmark, job, threads, latest_inputs, medians):
    case, n_threads, implementation = job
    call = peers.implementation_call(latest_inputs.get(case), implementation, n_threads)
    if not isinstance(call, Exception):
        try:
            call()   # warm-up, and the probe for torch ops without a CPU kernel
        except Exception as error:
            call = error
    if isinstance(call, Exception):
        status = timing.describe(call)
        if status.startswith("n/a"):
            pytest.skip(status)
        raise call

    benchmark.group = f"{case.label} {case.shape} {case.dtype} {n_threads}t"
    benchmark.extra_info.update({
        "implementation": implementation,
        "case": case.id,
        "threads": threads,
        "bytes_moved": case.bytes_moved,
    })
    if implementation == "floor":
        benchmark.extra_info["floor"] = peers.floor_description()
    if getattr(call, "layout", None):
        benchmark.extra_info["layout"] = call.layout
    if implementation == "bncpu":
        benchmark.extra_info["targets"] = [str(target)
                                           for target in targets.targets(case, n_threads)]
    if implementation == "reference" and case.input_bytes >= REFERENCE_PEDANTIC_BYTES:
        benchmark.pedantic(call, rounds=3, iterations=1)
    else:
        benchmark(call)

    if benchmark.stats is not None:   # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["gb_per_s"] = case.bytes_moved / median / 1e9
        medians.setdefault((case, n_threads), {})[implementation] = median
