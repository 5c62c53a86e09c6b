#!/usr/bin/env bash
# Create .venv in the repository root and install crossdraft with its test dependencies.
# torch is pinned to the CPU build (2.13.0) here; the package itself asks only for a range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# crossdraft's CPU kernel (crossdraft/kernels), built once per machine with its C++ compiler; without one the
# runner uses torch's kernels (slower for decoding) and this says why
.venv/bin/python -m crossdraft.kernels || true
echo "crossdraft installed in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
