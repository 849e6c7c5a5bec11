#!/usr/bin/env bash
# One device-tool call (under 10 minutes on an H200) that decides the next optimisation of the GPU
# training step, most important first:
#   1. profile_forward: device time by kernel kind of one 125m forward+backward (hierarchos minimal
#      at T=1024 B=16 and T=8192 B=2, the eager GPT-2 at T=1024 B=16 beside it);
#   2. bench_forward at T=1024: compiled GPT-2, hierarchos with compiled blocks, and compiled blocks
#      under a CUDA graph (does fusion pay once the launches are gone?);
#   3. the full training loop through CUDA graphs: `train` on the bundled corpus, eager vs --cuda-graphs,
#      losses side by side;
#   4. the GPU-marked tests.
# Usage (device tool, carry .whl for `datasets`): bash bench/gpu_issue7_probe.sh [MAX_STEPS]
set -uo pipefail
steps=${1:-20}
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
timeout 60 python3 bench/profile_forward.py --size 125m --seq-len 1024 --batch 16 --models hierarchos:minimal gpt2 \
  --json "$out/profile_1024.json" 2>&1 | tee "$out/profile_1024.log"
timeout 45 python3 bench/profile_forward.py --size 125m --seq-len 8192 --batch 2 --models hierarchos:minimal \
  --json "$out/profile_8192.json" 2>&1 | tee "$out/profile_8192.log"
timeout 210 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 --configs minimal --no-rosa-for \
  --cuda-graphs minimal --compile both --steps 3 --warmup 1 --max-seconds-per-row 100 --no-check --no-flops \
  --json "$out/forward_h200_125m_compiled_graphs.json" 2>&1 | tee "$out/bench_forward_1024.log"
for mode in eager graphs; do
  flag=""; [ "$mode" = graphs ] && flag="--cuda-graphs"
  timeout 80 python3 hierarchos_cli.py train --epochs 20 --max-steps "$steps" --max_length 512 --batch_size 16 \
    --starting-lr 4e-4 --warmup-steps 10 --log-every 5 $flag --out-dir "/tmp/run_$mode" 2>&1 | tr '\r' '\n' \
    | grep -v '^ *$' > "$out/train_$mode.log"
  cp "/tmp/run_$mode/metrics.jsonl" "$out/train_${mode}_metrics.jsonl" 2>/dev/null
done
python3 bench/compare_train_runs.py "$out" eager graphs | tee "$out/train_summary.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log"
