"""The speed report (``python -m bncpu``) and what the benchmark suite (benchmarks/) shares
with it, one module per concern:

``cases``    the operations (from bncpu/_registry.py) and shapes timed, and their inputs
``peers``    what each implementation runs: bncpu, its twin, PyTorch, oneDNN, the floor
``onednn``   the ctypes harness over oneDNN's C API
``timing``   round-robin sampling and medians
``targets``  the ratios ("x faster than") and the goals they are judged against
``machine``  thread counts, malloc, the CPU, other processes' share of it
``report``   the command line and the table
"""
from bncpu.bench.report import main

__all__ = ["main"]
