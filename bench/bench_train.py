"""Full training steps (forward, backward, clipping, optimizer) of hierarchos: tokens/s, step time and
peak memory against the reasoning depth (h_cycles, max_h_steps, max_l_steps), with and without
gradient checkpointing, plus a torch.profiler summary of one configuration's step (where the time
goes: top operators by GPU and by CPU time, kernel launches and host synchronisations per step, and
how busy the GPU is). The GPT-2 comparison of the forward+backward step is bench/bench_forward.py.

    PYTHONPATH=. python bench/bench_train.py --device cuda --size 125m --seq-len 1024 --batch 4 \\
        --configs 1,1,0 2,2,2 2,5,5 --json $OUT/train.json
    PYTHONPATH=. python bench/bench_train.py --device cpu --size tiny --seq-len 256 --batch 2 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.bench_forward import SIZES, machine_info  # noqa: E402
from hierarchos.config import ModelConfig  # noqa: E402
from hierarchos.model import HierarchosLM  # noqa: E402
from hierarchos.model.losses import lm_loss  # noqa: E402
from hierarchos.ops import wkv as wkv_ops  # noqa: E402
from hierarchos.train.schedule import build_optimizer  # noqa: E402


def build(size: str, triple: tuple[int, int, int], device) -> HierarchosLM:
    h_cycles, max_h_steps, max_l_steps = triple
    cfg = ModelConfig(**SIZES[size], h_cycles=h_cycles, max_h_steps=max_h_steps, max_l_steps=max_l_steps,
                      h_halt_thresh=1.0).validate()  # 1.0: every pass runs (the worst case, as at init)
    torch.manual_seed(0)
    return HierarchosLM(cfg).to(device)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, optimizer, x, y, amp):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss, _ = lm_loss(model(x), y, model.cfg.z_loss_weight)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def measure(size, triple, checkpointing, args, device) -> dict:
    model = build(size, triple, device)
    model.set_gradient_checkpointing(checkpointing)
    optimizer = build_optimizer(model, 1e-4, 0.01)
    V = model.cfg.vocab_size
    x = torch.randint(0, V, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, V, (args.batch, args.seq_len), device=device)
    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_step(model, optimizer, x, y, amp)
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, x, y, amp)
        sync(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    row = dict(config=",".join(map(str, triple)), checkpointing=checkpointing, step_ms=step * 1e3,
               first_step_ms=first * 1e3, tokens_per_s=args.batch * args.seq_len / step, peak_mem_mib=peak,
               params=model.num_parameters(with_deepembed=False))
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def profile_step(size, triple, args, device) -> dict:
    model = build(size, triple, device)
    optimizer = build_optimizer(model, 1e-4, 0.01)
    V = model.cfg.vocab_size
    x = torch.randint(0, V, (args.batch, args.seq_len), device=device)
    amp = device.type == "cuda"
    for _ in range(2):
        train_step(model, optimizer, x, x, amp)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 2
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, optimizer, x, x, amp)
        sync(device)
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    counts = {e.key: e.count / steps for e in events}
    gpu_busy = None
    if device.type == "cuda":  # device time of every kernel over the wall time (kernels do not overlap much here)
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / steps
        gpu_busy = kernel_us / 1e6 / wall
    sort_gpu = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    summary = dict(config=",".join(map(str, triple)), wall_ms_under_profiler=wall * 1e3, gpu_busy_fraction=gpu_busy,
                   per_step={k: counts.get(k, 0) for k in ("cudaLaunchKernel", "aten::item", "aten::_local_scalar_dense",
                                                           "cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                           "aten::nonzero")},
                   top_gpu=events.table(sort_by=sort_gpu, row_limit=args.rows),
                   top_cpu=events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="125m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=["1,1,0", "2,2,2", "2,5,5"],
                    help="h_cycles,max_h_steps,max_l_steps triples")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--no-checkpointing-rows", action="store_true", help="skip the gradient-checkpointing rows")
    ap.add_argument("--profile-config", default=None, help="triple to profile (default: the first)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    triples = [tuple(int(v) for v in c.split(",")) for c in args.configs]
    info = machine_info(device)
    print(f"bench_train: {' '.join(sys.argv[1:])}\nmachine: {json.dumps(info)}\n"
          f"wkv impl: {wkv_ops.resolve_impl('auto', torch.zeros(1, 64, 1, 16, device=device, requires_grad=True))}", flush=True)
    rows = []
    for triple in triples:
        for checkpointing in (False,) if args.no_checkpointing_rows else (False, True):
            row = measure(args.size, triple, checkpointing, args, device)
            rows.append(row)
            print(f"  {row['config']:>7} ckpt={'on ' if checkpointing else 'off'} {row['tokens_per_s']:9.0f} tok/s "
                  f"{row['step_ms']:8.1f} ms/step  first {row['first_step_ms']:8.0f} ms  "
                  f"peak {row['peak_mem_mib'] or 0:8.0f} MiB", flush=True)
    prof = profile_step(args.size, tuple(int(v) for v in (args.profile_config or args.configs[0]).split(",")),
                        args, device)
    busy = prof["gpu_busy_fraction"]
    print(f"\nprofile of {prof['config']}: {prof['wall_ms_under_profiler']:.1f} ms/step under the profiler, "
          f"GPU busy {'-' if busy is None else f'{busy:.0%}'}, per step: {json.dumps(prof['per_step'])}")
    print(prof["top_gpu"])
    print(prof["top_cpu"])
    print(f"\n| config (h_cycles,max_h_steps,max_l_steps) | checkpointing | tokens/s | ms/step | first step ms | peak MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {'on' if r['checkpointing'] else 'off'} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
              f"{r['first_step_ms']:,.0f} | {r['peak_mem_mib'] or 0:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, args=vars(args), rows=rows, profile=prof), f, indent=2)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
