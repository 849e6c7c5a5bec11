#!/usr/bin/env bash
# The issue-7 table in one device-tool call (about 8 minutes on an H200, cold caches):
#   1. bench_forward at 125m: float32 parity preamble, then compiled GPT-2 against hierarchos in the
#      minimal, mid (2,2,2) and default configurations (minimal and default also under a CUDA graph), T=1024 and 8192,
#      with FLOPs (MFU) and time to first step;
#   2. the training loop on the bundled corpus: eager twice (run-to-run noise on a GPU) and with the
#      CUDA graphs `train` now uses by default;
#   3. bench_forward at 25m, the same rows without the parity preamble.
# Usage (device tool, carry .whl for `datasets`): bash bench/gpu_issue7_final.sh [MAX_STEPS]
set -uo pipefail
steps=${1:-20}
source bench/gpu_env.sh
rows="--configs minimal mid default --no-rosa-for --cuda-graphs minimal default --compile gpt2 --steps 3 --warmup 1"
timeout 300 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 8192 $rows \
  --max-seconds-per-row 100 --check --json "$out/forward_h200_125m_final.json" 2>&1 | tee "$out/forward_125m.log"
for mode in eager eager2 graphs; do
  flag="--no-cuda-graphs"; [ "$mode" = graphs ] && flag=""
  timeout 45 python3 hierarchos_cli.py train --epochs 20 --max-steps "$steps" --max_length 512 --batch_size 16 \
    --starting-lr 4e-4 --warmup-steps 10 --log-every 5 $flag --out-dir "/tmp/run_$mode" 2>&1 | tr '\r' '\n' \
    | grep -v '^ *$' | tail -n 40 > "$out/train_$mode.log"
  cp "/tmp/run_$mode/metrics.jsonl" "$out/train_${mode}_metrics.jsonl" 2>/dev/null
done
python3 bench/compare_train_runs.py "$out" eager eager2 graphs | tee "$out/train_summary.txt"
timeout 130 python3 bench/bench_forward.py --device cuda --size 25m --seq-lens 1024 8192 $rows \
  --max-seconds-per-row 60 --no-check --json "$out/forward_h200_25m_final.json" 2>&1 | tee "$out/forward_25m.log"
