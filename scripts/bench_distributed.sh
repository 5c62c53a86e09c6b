#!/usr/bin/env bash
# The distributed path against in-process (issue 3's configurations: slem with drafter-spm4k, same with
# drafter-bpe8k; greedy, 6 prompts x 128 tokens, one torch thread per process and in process), once as
# the kernel schedules the processes and once with the verifier and the drafter pinned to a core each
# (docs/bench/cpu-distributed{,-pinned}.{txt,json}). About 10 minutes. Run on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
Z=${ZOO:-../shared/zoo}
PY=.venv/bin/python
run() {  # $1: name, then extra flags
  local name=$1; shift
  $PY -m crossdraft.cli bench --target "$Z/target-bpe8k" --drafters "$Z/drafter-spm4k" "$Z/drafter-bpe8k" \
    --algorithms same,slem --num-prompts 6 --max-new-tokens 128 --no-hf --threads 1 --distributed \
    --json-out "docs/bench/$name.json" "$@" | tee "docs/bench/$name.txt"
}
run cpu-distributed
run cpu-distributed-pinned --pin-cpus
