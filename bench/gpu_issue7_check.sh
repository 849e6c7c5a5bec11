#!/usr/bin/env bash
# A short device-tool call (about 6 minutes on an H200) after a change to the GPU step: the GPU-marked
# tests; bench_forward's float32 parity preamble (Triton WKV, Triton loss, padded head, parallel==step
# also under bf16 autocast) with the 125m minimal rows at T=1024 (compiled GPT-2; hierarchos with
# compiled blocks, alone and under a CUDA graph); then profile_forward of the eager step, to see
# where the time went after the change.
# Usage (device tool, carry .whl): bash bench/gpu_issue7_check.sh
set -uo pipefail
source bench/gpu_env.sh
timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log"
timeout 220 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 --configs minimal --no-rosa-for \
  --cuda-graphs minimal --compile both --steps 3 --warmup 1 --max-seconds-per-row 100 --check --no-flops \
  --json "$out/forward_check.json" 2>&1 | tee "$out/bench_forward_check.log"
timeout 60 python3 bench/profile_forward.py --size 125m --seq-len 1024 --batch 16 --models hierarchos:minimal \
  --json "$out/profile_1024.json" 2>&1 | tee "$out/profile_1024.log"
