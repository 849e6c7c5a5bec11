#!/usr/bin/env bash
# The rows gpu_issue7_final.sh lost to bench_forward's old row-budget rule (it took the compile of a
# compiled GPT-2's first step as the cost of every later step and stopped the row): the compiled
# GPT-2 at 125m T=8192 beside hierarchos minimal (eager, CUDA graph), and the whole 25m table.
# Usage (device tool, carry .whl): bash bench/gpu_issue7_rest.sh
set -uo pipefail
source bench/gpu_env.sh
timeout 150 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 8192 --configs minimal --no-rosa-for \
  --cuda-graphs minimal --compile gpt2 --steps 3 --warmup 1 --max-seconds-per-row 120 --no-check \
  --json "$out/forward_h200_125m_8192_final.json" 2>&1 | tee "$out/forward_125m_8192.log"
timeout 200 python3 bench/bench_forward.py --device cuda --size 25m --seq-lens 1024 8192 --configs minimal mid default \
  --no-rosa-for --cuda-graphs minimal default --compile gpt2 --steps 3 --warmup 1 --max-seconds-per-row 80 --no-check \
  --json "$out/forward_h200_25m_final.json" 2>&1 | tee "$out/forward_25m.log"
