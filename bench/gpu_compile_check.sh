#!/usr/bin/env bash
# One device-tool call: does automatic torch.compile of the RWKV blocks work and pay on CUDA?
#   1. GPU-marked tests (CUDA parity, inductor-compiled blocks == eager),
#   2. `train` on the bundled corpus with the default architecture, eager vs --compile (compiled
#      blocks): time to the first logged step and tokens/s from metrics.jsonl (the recorded run,
#      bench/records/train_compile_h200_summary.txt, was made when --compile was the CUDA default
#      and --no-compile its opt-out: the same two configurations),
#   3. (host CPU, 2 threads) bench_generate.py --formats on the 125m size: fp32 vs each quantized format.
# Usage (device tool, carry .whl): bash bench/gpu_compile_check.sh [MAX_STEPS]
set -uo pipefail
steps=${1:-40}
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
python3 -c "import torch, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'datasets', datasets.__version__)" 2>&1 | tee -a "$out/gpu.txt"

timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log" | tail -n 5

for mode in no-compile compile; do
  flag=""; [ "$mode" = compile ] && flag="--compile"
  start=$(date +%s.%N)
  timeout 300 python3 hierarchos_cli.py train --epochs 20 --max-steps "$steps" --max_length 512 --batch_size 16 \
    --starting-lr 4e-4 --warmup-steps 10 --log-every 5 $flag --out-dir "/tmp/run_$mode" 2>&1 | tr '\r' '\n' \
    | grep -v '^ *$' > "$out/train_$mode.log"
  end=$(date +%s.%N)
  cp "/tmp/run_$mode/metrics.jsonl" "$out/train_${mode}_metrics.jsonl" 2>/dev/null
  python3 - "$out/train_${mode}_metrics.jsonl" "$mode" "$start" "$end" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
mode, start, end = sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
if not rows:
    print(f"{mode}: no metrics (see train_{mode}.log)"); sys.exit()
first = rows[0]["time"] - start
steady = [r["tokens_per_s"] for r in rows[2:]] or [rows[-1]["tokens_per_s"]]
steady.sort()
print(f"{mode}: wall {end - start:.0f} s, first log (step {rows[0]['step']}) after {first:.0f} s, "
      f"median tokens/s after it {steady[len(steady) // 2]:,.0f}, final loss {rows[-1]['loss']:.3f}")
PY
  grep -E "^(compile|model|gpu):" "$out/train_$mode.log"
done 2>&1 | tee "$out/compile_summary.txt"

python3 kernels/build.py > "$out/kernel_build.log" 2>&1 || tail -n 5 "$out/kernel_build.log"
OMP_NUM_THREADS=2 HIERARCHOS_THREADS=2 timeout 240 taskset -c 0,1 python3 bench/bench_generate.py --device cpu \
  --size 125m --contexts 256 --new-tokens 24 --rounds 2 --formats fp32 Q4_0 Q8_0 INT4 Q2_K \
  --json "$out/generate_cpu_125m_formats_devicehost.json" 2>&1 | tee "$out/generate_formats.log" | tail -n 12
