#!/usr/bin/env bash
# `auto` against every fixed algorithm and draft length, on each drafter of the zoo, greedy and at
# temperature 1 (docs/bench/cpu-auto-*.{txt,json}), 2 torch threads as in the main table of docs/benchmarks.md.
# About 11 minutes on 2 cores. Run on a quiet machine; `chrt -f 10` (root) keeps other work from skewing
# the timings. RUN=N writes cpu-auto-*-runN.* instead, for scripts/auto_summary.py to pool several runs;
# ONLY=greedy or ONLY=t1 runs one of the two.
set -euo pipefail
cd "$(dirname "$0")/.."
Z=${ZOO:-../shared/zoo}
PY=.venv/bin/python
run() {  # $1: name, then bench flags
  local name=$1; shift
  $PY -m crossdraft.cli bench --target "$Z/target-bpe8k" \
    --drafters "$Z/drafter-bpe2k" "$Z/drafter-spm4k" "$Z/drafter-bpe6k-alt" "$Z/drafter-bpe8k" \
    --sweep-draft-tokens adaptive,2,3,4,6 --num-prompts 6 --max-new-tokens 128 --no-hf --threads 2 \
    --json-out "docs/bench/$name${RUN:+-run$RUN}.json" "$@" | tee "docs/bench/$name${RUN:+-run$RUN}.txt"
}
[ "${ONLY:-}" = t1 ] || run cpu-auto-greedy --algorithms same,tli,slem,auto
# Sampled runs draw different texts per seed, and acceptance depends on the text: SEED=N gives another
# sample (the greedy run does not depend on it), so pooling runs of several seeds averages over texts.
[ "${ONLY:-}" = greedy ] || run cpu-auto-t1 --algorithms same,tli,slem,slrs,auto --temperature 1.0 --seed "${SEED:-0}"
