#!/usr/bin/env bash
# One device-tool call (kind nvidia-h200-x2 or larger): DDP scaling of `train` on the bundled corpus.
# The same command runs under torchrun with 1 and with N processes (the per-GPU batch is fixed, so the
# global batch grows with N); tokens/s summed over ranks, from rank 0's metrics.jsonl, gives the scaling
# efficiency. Usage (device tool, carry .whl):  bash bench/gpu_ddp.sh [N] [STEPS]
# Eager in both runs (--no-cuda-graphs): one process would otherwise replay CUDA graphs, which DDP
# does not, and the ratio would mix the two.
set -uo pipefail
n=${1:-2}; steps=${2:-40}
source bench/gpu_env.sh  # $out, carried wheels, PYTHONPATH, $out/gpu.txt
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for procs in 1 "$n"; do
  timeout 240 torchrun --standalone --nproc_per_node="$procs" hierarchos_cli.py train --epochs 100 \
    --max-steps "$steps" --max_length 512 --batch_size 16 --starting-lr 4e-4 --warmup-steps 10 --log-every 5 \
    --val-fraction 0 --save-every 0 --no-cuda-graphs --out-dir "/tmp/ddp$procs" > "$out/ddp_$procs.log" 2>&1
  echo "torchrun --nproc_per_node=$procs: rc $?"
  cp "/tmp/ddp$procs/metrics.jsonl" "$out/ddp_${procs}_metrics.jsonl" 2>/dev/null
done
python3 - "$out" "$n" 16 512 <<'PY' | tee "$out/ddp_summary.txt"
# Two rates per run: wall-clock over steps 10..last from the metrics' timestamps (checkpoints and
# evaluation included: the robust one), and the median of rank 0's per-window tokens/s x ranks.
import json, statistics, sys
out, n, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
wall = {}
for procs in (1, n):
    try:
        rows = [json.loads(line) for line in open(f"{out}/ddp_{procs}_metrics.jsonl")]
    except OSError:
        print(f"{procs} GPU(s): no metrics"); continue
    t = {r["step"]: r["time"] for r in rows}
    first, last = min(s for s in t if s >= 10), max(t)
    wall[procs] = (last - first) * batch * seq * procs / (t[last] - t[first])
    median = statistics.median(r["tokens_per_s"] for r in rows if r["step"] > 10) * procs
    print(f"{procs} GPU(s): {wall[procs]:,.0f} tokens/s wall-clock (steps {first}-{last}), "
          f"{median:,.0f} tokens/s median per-window, final loss {rows[-1]['loss']:.3f}")
if 1 in wall and n in wall:
    print(f"speed-up {wall[n] / wall[1]:.2f}x on {n} GPUs (wall-clock), scaling efficiency {wall[n] / wall[1] / n:.1%}")
PY
