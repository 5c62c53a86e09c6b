#!/usr/bin/env bash
# Regenerate the Python bindings of the wire contract: proto/crossdraft/v1/*.proto ->
# crossdraft/v1/*_pb2.py, *_pb2.pyi, *_pb2_grpc.py (committed; tests/test_proto.py checks they match).
# Usage: bash scripts/gen_proto.sh [OUT_DIR]   (default: the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-.}
mkdir -p "$OUT/crossdraft/v1"
"$PY" -m grpc_tools.protoc -Iproto --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" proto/crossdraft/v1/*.proto
