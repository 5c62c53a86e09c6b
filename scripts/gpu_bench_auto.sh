#!/usr/bin/env bash
# `auto` against every fixed algorithm and draft length on CUDA (bf16), greedy and at temperature 1,
# in one go on a GPU machine lent for a few minutes (no network there): the machine's own python3
# (torch, transformers preinstalled), the repository on PYTHONPATH, a copy of the zoo at $ZOO.
#   ZOO=.gpu/zoo OUT=/tmp/out bash scripts/gpu_bench_auto.sh
# The same runs as scripts/bench_auto.sh (CPU); each has its own time limit.
set -u
cd "$(dirname "$0")/.."
ZOO=${ZOO:-../shared/zoo}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
run() {  # name, limit in seconds, bench flags
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$OUT/log.txt"
  timeout "$limit" $PY -m crossdraft.cli bench --device cuda --dtype bfloat16 --target "$ZOO/target-bpe8k" \
    --drafters $(ls -d "$ZOO"/drafter-* | tr "\n" " ") \
    --prompts-file "$ZOO/dev-prompts.jsonl" --sweep-draft-tokens adaptive,2,3,4,6 --num-prompts 6 \
    --max-new-tokens 128 --no-hf --json-out "$OUT/$name.json" --debug "$@" 2>>"$OUT/log.txt" | tee "$OUT/$name.txt"
}
# ONLY=greedy or ONLY=t1 runs one of the two
if [ "${ONLY:-}" != t1 ]; then run cuda_auto_greedy_bf16 ${LIMIT:-200} --algorithms same,tli,slem,auto; fi
if [ "${ONLY:-}" != greedy ]; then run cuda_auto_t1_bf16 ${LIMIT:-200} --algorithms same,tli,slem,slrs,auto --temperature 1.0; fi
