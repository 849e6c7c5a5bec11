#!/usr/bin/env bash
# One device-tool call: install the carried wheels (fla-core, einops), check the CUDA paths,
# then time forward+backward against GPT-2. Usage (device tool, carry .whl):
#   bash bench/gpu_run.sh SIZE [extra bench_forward.py flags]
set -uo pipefail
size=${1:-125m}; shift || true
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
if [ -n "${WITH_PYTEST:-}" ] && python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -p no:cacheprovider tests/test_wkv.py 2>&1 | tee "$out/pytest_wkv_gpu.log"
fi
python3 bench/bench_forward.py --device cuda --size "$size" --json "$out/forward_cuda_$size.json" "$@" 2>&1 \
  | tee "$out/bench_forward_$size.log"
