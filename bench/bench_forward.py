"""Training-step throughput of hierarchos vs a Hugging Face GPT-2 of equal parameter count.

Measures forward+backward (no optimizer) tokens/s of `HierarchosLM` + `lm_loss` and of
`GPT2LMHeadModel` (built from a config, SDPA attention, dropout 0) on the same device, at
each --seq-lens T with batch = --tokens-per-step // T for both, for the reasoning configs
"minimal" (h_cycles=1, max_h_steps=1, max_l_steps=0) and "default" (ModelConfig defaults),
plus a use_rosa=False row (--no-rosa-for) so ROSA's CPU automaton cost is visible.
GPT-2's n_layer/n_embd are chosen so its parameter count (embeddings and wpe included,
same vocab, n_positions = max T) is within 5% of hierarchos' count WITHOUT DeepEmbed
tables (DESIGN.md 3.1: they are only indexed); both counts are printed.
Per row: median step time over --steps after --warmup steps (synchronized host clock),
time to first step (includes torch.compile), peak memory (CUDA: max_memory_allocated;
CPU: peak-RSS delta from /proc/self/status), FLOPs/step from torch's FlopCounterMode
(Triton kernels such as fla's WKV are not counted), MFU on known GPUs, ratio to GPT-2.
On CUDA a float32 parity preamble (--check) compares the WKV paths with the reference
scan and a tiny model's parallel forward with its step-by-step form; any FAIL -> exit 1.

CPU smoke:  PYTHONPATH=. python bench/bench_forward.py --device cpu --size tiny --seq-lens 256 1024 --steps 2 --warmup 1
GPU:        PYTHONPATH=. python bench/bench_forward.py --device cuda --size 125m --seq-lens 1024 8192 --compile \
                --json $OUT/forward_cuda.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hierarchos.config import ModelConfig, tiny_config  # noqa: E402
from hierarchos.model.lm import HierarchosLM  # noqa: E402
from hierarchos.model.losses import lm_loss  # noqa: E402
from hierarchos.ops import wkv as wkv_ops  # noqa: E402

SIZES = {  # hierarchos shapes; GPT-2 is fitted to each
    "tiny": dict(vocab_size=4096, context_dim=128, h_hidden=128, l_hidden=128, h_layers=2, l_layers=2),
    "25m": dict(vocab_size=16384, context_dim=448, h_hidden=448, l_hidden=448, h_layers=3, l_layers=3),
    "125m": dict(vocab_size=50257, context_dim=768, h_hidden=768, l_hidden=768, h_layers=4, l_layers=4),
}
CONFIGS = {"minimal": dict(h_cycles=1, max_h_steps=1, max_l_steps=0), "default": {}}
REASONING = ("h_cycles", "max_h_steps", "max_l_steps", "h_stride", "h_halt_thresh", "grad_steps")
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense TFLOP/s
TOL_CHUNKED, TOL_TF32 = 1e-4, 1e-3


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- machine / memory
def machine_info(dev):
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    import transformers
    info = dict(cpu=cpu, cpu_count=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), device=dev.type,
                wkv_impls=list(wkv_ops.available_impls(dev)), wkv_env=os.environ.get(wkv_ops.ENV_IMPL, ""))
    if dev.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                    gpu_mem_gib=round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1))
    return info


def _proc_kib(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


def mem_reset(dev):
    """Reset the peak; return the baseline (bytes)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _proc_kib("VmRSS") * 1024


def mem_peak(dev, base):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)  # absolute: weights + grads + activations
    return _proc_kib("VmHWM") * 1024 - base


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------- models
def gpt2_count(V, P, L, d):
    return V * d + P * d + L * (12 * d * d + 13 * d) + 2 * d


def fit_gpt2(target, V, P, prefer_d):
    """(n_layer, n_embd) with the count closest to target; n_embd = prefer_d if within 5%."""
    def best_L(d):
        L = max(1, round((target - gpt2_count(V, P, 0, d)) / (12 * d * d + 13 * d)))
        return L, abs(gpt2_count(V, P, L, d) - target) / target
    L, err = best_L(prefer_d)
    if err <= 0.05:
        return L, prefer_d
    d = min(range(64, 2049, 64), key=lambda d: best_L(d)[1])
    return best_L(d)[0], d


def build_gpt2(V, P, L, d):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=d, n_layer=L, n_head=max(1, d // 64), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False,
                     attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


def hier_cfg(size, config, use_rosa=True):
    return ModelConfig(**SIZES[size], **CONFIGS[config], use_rosa=use_rosa).validate()


def loss_fn(model, x, y):
    if isinstance(model, HierarchosLM) or isinstance(getattr(model, "_orig_mod", None), HierarchosLM):
        out = model(x)
        return lm_loss(out, y, model.cfg.z_loss_weight)[0], out
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), None


# ----------------------------------------------------------------------------- one row
def run_row(row, make_model, T, B, V, dev, args):
    """Build, warm up, time; fill `row` (status instead of raising on OOM/errors/timeouts)."""
    row.update(T=T, batch=B, status="ok")
    base = mem_reset(dev)
    model = fwd = None
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext)
    gen = torch.Generator().manual_seed(T)
    batches = [torch.randint(0, V, (B, T + 1), generator=gen).to(dev) for _ in range(2)]  # rotated
    times, error = [], None
    try:
        model = make_model().to(dev).train()
        if args.checkpointing:
            (model.set_gradient_checkpointing(True) if isinstance(model, HierarchosLM)
             else model.gradient_checkpointing_enable())
        fwd = model
        if args.compile:
            fwd = torch.compile(model)
            row["compile"] = "on"

        def step(i):
            x = batches[i % 2]
            with amp():
                loss, out = loss_fn(fwd, x[:, :-1], x[:, 1:])
            loss.backward()
            model.zero_grad(set_to_none=True)
            return out

        t_start = time.perf_counter()
        out = None
        for i in range(args.warmup + args.steps):
            if i and time.perf_counter() - t_start + (times[-1] if times else first) > args.max_seconds_per_row:
                row["status"] = f"timeout ({max(0, i - args.warmup)}/{args.steps} timed steps)"
                break
            sync(dev)
            t0 = time.perf_counter()
            try:
                out = step(i)
            except Exception as exc:  # noqa: BLE001 - torch.compile raises many kinds
                if i or fwd is model or isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                row["compile"] = "compile failed: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                log(f"  {row['model']} {row['config']}: {row['compile']} -> eager")
                torch._dynamo.reset()
                fwd = model
                out = step(i)
            sync(dev)
            dt = time.perf_counter() - t0
            if i == 0:
                first = row["first_step_ms"] = dt * 1e3
            if i >= args.warmup:
                times.append(dt)
        if out is not None and getattr(out, "aux", None):
            row["aux"] = {k: round(float(v), 3) for k, v in out.aux.items() if k in ("manager_steps", "worker_steps")}
        if times and row["status"] == "ok" and args.flops:
            from torch.utils.flop_counter import FlopCounterMode
            fwd = model  # count on the eager module (compiled graphs hide their ops)
            with FlopCounterMode(display=False) as counter:
                step(0)
            row["flops_per_step"] = counter.get_total_flops()
    except torch.cuda.OutOfMemoryError:
        error = "oom"
    except Exception as exc:  # noqa: BLE001
        error = "error: " + (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    if error:
        row["status"] = error
    row["peak_mem_mib"] = round(mem_peak(dev, base) / 2**20, 1)
    if times:
        med = statistics.median(times)
        row.update(step_ms=med * 1e3, tokens_per_s=B * T / med, timed_steps=len(times),
                   step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3)
        if row.get("flops_per_step"):
            row["tflops"] = row["flops_per_step"] / med / 1e12
    del model, fwd, batches
    mem_reset(dev)
    return row
