#!/usr/bin/env bash
# One device-tool call for the training and chat issues on a single GPU:
#   1. the GPU-marked tests (CUDA parity checks),
#   2. a few minutes of `train` on the bundled corpus with the default architecture (eager),
#   3. the same for a few steps under torch.compile (does it work, and does it pay),
#   4. `chat --device cuda` on the trained model (scripted: --prompt and piped stdin),
#   5. bench_generate.py on CUDA (small and 125m sizes, 1k / 8k / 32k tokens of context).
# Everything goes to $OUT (logs, metrics.jsonl, JSON). Usage (device tool):
#   bash bench/gpu_train_chat.sh [EPOCHS]      (carry .whl; SKIP_GENERATE=1 skips step 5)
set -uo pipefail
epochs=${1:-20}
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"

if python3 -c "import pytest" 2>/dev/null; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/pytest_gpu.log"
fi

run=/tmp/run_eager
timeout 260 python3 hierarchos_cli.py train --epochs "$epochs" --max_length 512 --batch_size 16 \
  --starting-lr 1e-3 --warmup-steps 20 --log-every 5 --out-dir "$run" 2>&1 | tr '\r' '\n' | grep -v '^ *$' \
  | tee "$out/train_eager.log" | grep -vE "it/s|win/s" | tail -n 40
cp "$run/metrics.jsonl" "$out/train_eager_metrics.jsonl" 2>/dev/null

timeout 200 python3 hierarchos_cli.py train --epochs 2 --max-steps 20 --max_length 512 --batch_size 16 \
  --starting-lr 1e-3 --log-every 5 --compile --out-dir /tmp/run_compiled 2>&1 | tr '\r' '\n' | grep -v '^ *$' \
  | tee "$out/train_compiled.log" | grep -vE "it/s|win/s" | tail -n 20
cp /tmp/run_compiled/metrics.jsonl "$out/train_compiled_metrics.jsonl" 2>/dev/null

{
  echo "== chat --prompt"; timeout 60 python3 hierarchos_cli.py chat --model-path "$run" --device cuda \
    --prompt "ROMEO:" --temperature 0 --max-new-tokens 60
  echo; echo "== chat, piped stdin with slash commands"
  printf 'Who says: Is this a dagger?\n/status\n/memory\n' | timeout 60 python3 hierarchos_cli.py chat \
    --model-path "$run" --device cuda --max-new-tokens 40 --seed 1
} 2>&1 | tee "$out/chat_cuda.log"

[ -n "${SKIP_GENERATE:-}" ] && exit 0
for size in small 125m; do
  timeout 150 python3 bench/bench_generate.py --device cuda --size "$size" --contexts 1024 8192 32768 \
    --new-tokens 64 --json "$out/generate_cuda_$size.json" 2>&1 | tee "$out/generate_cuda_$size.log"
done
