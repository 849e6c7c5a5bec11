#!/usr/bin/env bash
# One device-tool call (about 200 s on an H200, cold caches) for CUDA graphs of the training window:
#   1. the GPU test of the capture (tests/test_cuda_graph.py::test_capture_on_cuda_matches_eager:
#      three chained windows replayed from a graph == eager, losses, gradients and state);
#   2. bench_forward.py at the 125m size, T=1024 and 8192, minimal config: GPT-2 under torch.compile
#      (bf16, SDPA), hierarchos eager, and hierarchos with forward+backward replayed as a CUDA graph.
# Usage (device tool): bash bench/gpu_graphs.sh   (logs and JSON under $OUT)
set -uo pipefail
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph.py -k cuda 2>&1 | tee "$out/pytest_gpu.log"
timeout 200 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 8192 --configs minimal \
  --no-rosa-for --cuda-graphs minimal --compile gpt2 --steps 3 --warmup 1 --max-seconds-per-row 90 \
  --no-check --no-flops --json "$out/forward_h200_125m_graphs.json" 2>&1 | tee "$out/bench_forward.log"
