#!/usr/bin/env bash
# Does fla-core's chunked RWKV-7 (DPLR) kernel pass our gradient check after all? The run that
# "showed" its backward failing (BENCHMARKS.md, run 1) used a harness that added each implementation's
# gradients onto the previous one's (fixed since). One device-tool call, about 5 minutes (fla's Triton
# JIT takes ~2 minutes cold): bench_wkv's parity (fla vs the float64 scan at T=200 and 1000, all seven
# gradients) and timings (fla vs our sequential kernel at B8 T2048 and B2 T8192), then the fla tests.
# Before the call, put the wheels beside the others (the GPU image has neither package):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl fla-core einops
# Usage (device tool, carry .whl): bash bench/gpu_fla_check.sh
set -uo pipefail
source bench/gpu_env.sh
python3 -c "import fla, einops; print('fla', fla.__version__)" 2>&1 | tee "$out/fla_version.txt"
timeout 400 python3 bench/bench_wkv.py --no-sweep --json "$out/wkv_fla.json" 2>&1 | tee "$out/wkv_fla.log"
timeout 150 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_wkv.py 2>&1 | tee "$out/pytest_fla.log"
