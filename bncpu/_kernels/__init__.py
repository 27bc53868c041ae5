"""Cython kernels, one module per family; bncpu._dispatch picks the instruction-set build."""
