#!/usr/bin/env bash
# The CUDA benchmark in one go, for a GPU machine lent for a few minutes (no network there).
# Runs the engine with the machine's own python3 (torch, transformers, grpcio preinstalled), the
# repository on PYTHONPATH, and a copy of the zoo at $ZOO. Writes tables and JSON to $OUT.
#   ZOO=.gpu/zoo OUT=/tmp/out bash scripts/gpu_bench.sh
# Each step has its own time limit, so one failure or hang still leaves the others' results.
set -u
cd "$(dirname "$0")/.."
ZOO=${ZOO:-../shared/zoo}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEV=${DEV:-cuda}
T="$ZOO/target-bpe8k"
DRAFTERS=$(ls -d "$ZOO"/drafter-* | tr '\n' ' ')
P="$ZOO/dev-prompts.jsonl"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"

echo "== smoke: every algorithm, 24 tokens, bf16 and fp32, greedy, --compare against the target alone" | tee "$OUT/smoke.txt"
for dt in bfloat16 float32; do
  for pair in "same drafter-bpe8k" "tli drafter-bpe2k" "slem drafter-spm4k"; do
    set -- $pair
    timeout 120 $PY -m crossdraft.cli generate --device $DEV --dtype $dt --target "$T" --drafter "$ZOO/$2" \
      --algorithm "$1" "def fibonacci(n):" --max-new-tokens 24 --compare --json --debug 2>&1 \
      | tail -3 | tee -a "$OUT/smoke.txt"
  done
done

bench() {  # name, extra args
  local name=$1; shift
  echo "== bench $name" | tee -a "$OUT/log.txt"
  timeout 240 $PY -m crossdraft.cli bench --device $DEV --target "$T" --drafters $DRAFTERS --prompts-file "$P" \
    --json-out "$OUT/$name.json" --debug ${BENCH_ARGS:-} "$@" 2>>"$OUT/log.txt" | tee "$OUT/$name.txt"
}
bench cuda_greedy_bf16 --dtype bfloat16
bench cuda_greedy_fp32 --dtype float32
bench cuda_t1_bf16 --dtype bfloat16 --temperature 1 --no-hf
