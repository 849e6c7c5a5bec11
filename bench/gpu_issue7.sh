#!/usr/bin/env bash
# One device-tool call for the GPU training-speed issue, after the Triton WKV-7 kernel:
#   1. bench_train.py: full training steps (optimizer included) at the 125m size, T=1024, for
#      (h_cycles, max_h_steps, max_l_steps) = (1,1,0), (2,2,2), (2,5,5), gradient checkpointing off/on
#      (tokens/s, step time, peak memory), and a torch.profiler summary of the (1,1,0) step;
#   2. bench_forward.py: forward+backward vs Hugging Face GPT-2 under torch.compile (bf16, SDPA) of
#      equal parameter count, T=1024 and 8192, configs minimal / mid (2,2,2) / default.
# Usage (device tool): bash bench/gpu_issue7.sh   (output and JSON under $OUT)
set -uo pipefail
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
timeout 190 python3 bench/bench_train.py --device cuda --size 125m --seq-len 1024 --batch 4 \
  --configs 1,1,0 2,2,2 2,5,5 --steps 2 --json "$out/train_h200_125m.json" 2>&1 | grep -v "^USDT" \
  | tee "$out/bench_train.log" | tail -n 12
timeout 300 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 8192 \
  --configs minimal mid default --no-rosa-for --compile gpt2 --steps 3 --warmup 1 --max-seconds-per-row 40 \
  --no-check --no-flops --json "$out/forward_h200_125m_compiled.json" 2>&1 | tee "$out/bench_forward.log" | tail -n 14
