#!/usr/bin/env bash
# CI: the serial build (BNCPU_NO_OPENMP=1, for compilers without OpenMP) still compiles
# and computes the same bits. Builds a temporary copy of the checkout in place and runs
# tests/test_digest.py there: every function's outputs on a fixed set of inputs must
# equal the recorded digests. Works on a fresh Debian machine as root (creates a virtual
# environment with the build and test requirements when the current python lacks them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import Cython, numpy, setuptools, pytest" >/dev/null 2>&1; then
    "$PYTHON" -m venv "$WORK/venv"
    "$WORK/venv/bin/pip" install -q cython numpy setuptools pytest
    PYTHON="$WORK/venv/bin/python"
fi

mkdir -p "$WORK/src"
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/bncpu" "$ROOT/include" "$ROOT/tests" \
    "$WORK/src/"
find "$WORK/src" \( -name '*.so' -o -name '*.c' -path '*/bncpu/*' -o -name '__pycache__' \) \
    -prune -exec rm -rf {} +
cd "$WORK/src"
BNCPU_NO_OPENMP=1 "$PYTHON" setup.py build_ext --inplace -j2 >"$WORK/build.log" 2>&1 \
    || { tail -50 "$WORK/build.log"; exit 1; }
if grep -q -- '-fopenmp' "$WORK/build.log"; then
    echo "serial build: -fopenmp was passed to the compiler" >&2
    exit 1
fi
"$PYTHON" -c "import bncpu; assert not bncpu.openmp_enabled(), 'OpenMP is on'; \
print('serial build:', bncpu.isa(), 'threads', bncpu.get_num_threads())"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_digest.py
