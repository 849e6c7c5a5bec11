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
import contextlib
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
from hierarchos.train.cuda_graph import GraphedWindow  # noqa: E402
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


def train_step(model, optimizer, x, y, amp, window=None):
    """One optimizer step; with `window` (a GraphedWindow) the forward+backward is its replay."""
    if window is None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = lm_loss(model(x), y, model.cfg.z_loss_weight)
        loss.backward()
    else:
        loss, _, _ = window(x, y, None)
    with window.hide_unreached_grads() if window is not None else contextlib.nullcontext():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=window is None)  # a captured backward writes into the same .grad tensors
    return loss


def graphed_window(model, amp, capture=None):
    return GraphedWindow(model, lambda out, y: lm_loss(out, y, model.cfg.z_loss_weight),
                         autocast=lambda: torch.autocast("cuda" if amp else "cpu", dtype=torch.bfloat16, enabled=amp),
                         capture=capture, log=lambda line: print("  " + line, flush=True))


def graph_parity(size, triple, args, device) -> dict:
    """The captured window against eager execution: same weights, same two batches (state carried),
    loss and every gradient after each; relative error = max |a - b| / max |b| over all gradients."""
    amp = device.type == "cuda"
    V = SIZES[size]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, V, (args.batch, args.seq_len), generator=g).to(device),
                torch.randint(0, V, (args.batch, args.seq_len), generator=g).to(device)) for _ in range(2)]
    results = {}
    for mode in ("eager", "graph"):
        model = build(size, triple, device)
        window = graphed_window(model, amp) if mode == "graph" else None
        state, losses, grads = None, [], []
        for x, y in batches:
            if window is None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(x, state)
                    loss, _ = lm_loss(out, y, model.cfg.z_loss_weight)
                loss.backward()
                state = out.state.detach()
            else:
                loss, _, state = window(x, y, state)
            losses.append(float(loss.detach()))
            grads.append([p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None])
        results[mode] = (losses, grads, window.capture if window is not None else None)
        del model, window
    (eager_losses, eager_grads, _), (graph_losses, graph_grads, captured) = results["eager"], results["graph"]
    worst = 0.0
    for a_list, b_list in zip(graph_grads, eager_grads):
        for a, b in zip(a_list, b_list):
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)))
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(graph_losses, eager_losses))
    ok = len(graph_grads[0]) == len(eager_grads[0]) and loss_err < 1e-2 and worst < 5e-2
    return dict(config=",".join(map(str, triple)), captured=captured, eager_losses=eager_losses,
                graph_losses=graph_losses, loss_rel_err=loss_err, grad_rel_err=worst, ok=ok)


def measure(size, triple, checkpointing, args, device, graphs=False) -> dict:
    model = build(size, triple, device)
    model.set_gradient_checkpointing(checkpointing)
    optimizer = build_optimizer(model, 1e-4, 0.01)
    amp = device.type == "cuda"
    window = graphed_window(model, amp) if graphs else None
    V = model.cfg.vocab_size
    x = torch.randint(0, V, (args.batch, args.seq_len), device=device)
    y = torch.randint(0, V, (args.batch, args.seq_len), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_step(model, optimizer, x, y, amp, window)
    sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, x, y, amp, window)
        sync(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    row = dict(config=",".join(map(str, triple)), checkpointing=checkpointing, graphs=graphs, step_ms=step * 1e3,
               first_step_ms=first * 1e3, tokens_per_s=args.batch * args.seq_len / step, peak_mem_mib=peak,
               params=model.num_parameters(with_deepembed=False))
    del model, optimizer, window
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
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time each config with forward+backward replayed as a CUDA graph, after a "
                         "graph-vs-eager parity check of the first config")
    ap.add_argument("--no-profile", action="store_true", help="skip the torch.profiler summary")
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
    parity = None
    if args.cuda_graphs:
        parity = graph_parity(args.size, triples[0], args, device)
        print(f"graph parity ({parity['config']}, captured={parity['captured']}): loss rel err "
              f"{parity['loss_rel_err']:.1e}, gradient rel err {parity['grad_rel_err']:.1e} -> "
              f"{'PASS' if parity['ok'] else 'FAIL'}", flush=True)
    rows = []
    for triple in triples:
        variants = [(False, False)] if args.no_checkpointing_rows else [(False, False), (True, False)]
        if args.cuda_graphs and parity["ok"]:
            variants.append((False, True))
        for checkpointing, graphs in variants:
            row = measure(args.size, triple, checkpointing, args, device, graphs)
            rows.append(row)
            print(f"  {row['config']:>7} ckpt={'on ' if checkpointing else 'off'} graphs={'on ' if graphs else 'off'} "
                  f"{row['tokens_per_s']:9.0f} tok/s {row['step_ms']:8.1f} ms/step  first {row['first_step_ms']:8.0f} ms  "
                  f"peak {row['peak_mem_mib'] or 0:8.0f} MiB", flush=True)
    prof = None
    if not args.no_profile:
        prof = profile_step(args.size, tuple(int(v) for v in (args.profile_config or args.configs[0]).split(",")),
                            args, device)
        busy = prof["gpu_busy_fraction"]
        print(f"\nprofile of {prof['config']}: {prof['wall_ms_under_profiler']:.1f} ms/step under the profiler, "
              f"GPU busy {'-' if busy is None else f'{busy:.0%}'}, per step: {json.dumps(prof['per_step'])}")
        print(prof["top_gpu"])
        print(prof["top_cpu"])
    print("\n| config (h_cycles,max_h_steps,max_l_steps) | checkpointing | CUDA graph | tokens/s | ms/step | "
          "first step ms | peak MiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {'on' if r['checkpointing'] else 'off'} | {'on' if r['graphs'] else 'off'} | "
              f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['first_step_ms']:,.0f} | {r['peak_mem_mib'] or 0:,.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, args=vars(args), rows=rows, profile=prof, graph_parity=parity), f, indent=2)
        print(f"json: {args.json}")
    if parity is not None and not parity["ok"]:
        print("GRAPH PARITY FAIL", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
