#!/usr/bin/env bash
# The next device-tool call for the GPU training-speed issue (about 9 minutes on an H200, cold caches):
#   1. GPU-marked tests (the CUDA-graph capture == eager, the Triton kernel, compiled blocks);
#   2. the full training loop through CUDA graphs: `train` on the bundled corpus (default architecture,
#      --max_length 512 --batch_size 16), eager vs --cuda-graphs: losses side by side and tokens/s;
#   3. bench_forward at T=1024 (minimal): compiled GPT-2, hierarchos with compiled blocks, and compiled
#      blocks under a CUDA graph (the GPU-bound case: does fusion pay once launches are gone?);
#   4. bench_forward at T=8192: the compiled GPT-2 with a row budget long enough for its compile.
# Usage (device tool, carry .whl for `datasets`): bash bench/gpu_issue7_next.sh [MAX_STEPS]
set -uo pipefail
steps=${1:-40}
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log"

for mode in eager graphs; do
  flag=""; [ "$mode" = graphs ] && flag="--cuda-graphs"
  timeout 150 python3 hierarchos_cli.py train --epochs 20 --max-steps "$steps" --max_length 512 --batch_size 16 \
    --starting-lr 4e-4 --warmup-steps 10 --log-every 5 $flag --out-dir "/tmp/run_$mode" 2>&1 | tr '\r' '\n' \
    | grep -v '^ *$' > "$out/train_$mode.log"
  cp "/tmp/run_$mode/metrics.jsonl" "$out/train_${mode}_metrics.jsonl" 2>/dev/null
done
python3 - "$out" <<'PY' | tee "$out/train_summary.txt"
import json, os, statistics, sys
out = sys.argv[1]
runs = {}
for mode in ("eager", "graphs"):
    path = os.path.join(out, f"train_{mode}_metrics.jsonl")
    runs[mode] = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
for mode, rows in runs.items():
    rate = statistics.median(r["tokens_per_s"] for r in rows[1:]) if len(rows) > 1 else None
    print(mode, "steps", [r["step"] for r in rows], "median tokens/s after the first log", rate)
for a, b in zip(runs["eager"], runs["graphs"]):
    print(f"step {a['step']}: loss eager {a['loss']:.5f} graphs {b['loss']:.5f}")
PY

timeout 150 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 --configs minimal --no-rosa-for \
  --cuda-graphs minimal --compile both --steps 3 --warmup 1 --max-seconds-per-row 120 --no-check --no-flops \
  --json "$out/forward_h200_125m_compiled_graphs.json" 2>&1 | tee "$out/bench_forward_1024.log"
timeout 200 python3 bench/bench_forward.py --device cuda --size 125m --seq-lens 8192 --configs minimal --no-rosa-for \
  --cuda-graphs minimal --compile gpt2 --steps 3 --warmup 1 --max-seconds-per-row 180 --no-check --no-flops \
  --json "$out/forward_h200_125m_8192_compiled_gpt2.json" 2>&1 | tee "$out/bench_forward_8192.log"
