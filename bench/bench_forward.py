"""Training-step throughput of hierarchos vs a Hugging Face GPT-2 of equal parameter count.

Measures forward+backward (no optimizer) tokens/s of `HierarchosLM` + `lm_loss` and of
`GPT2LMHeadModel` (built from a config, SDPA attention, dropout 0) on the same device, at
each --seq-lens T with batch = --tokens-per-step // T for both, for the reasoning configs
"minimal" (h_cycles=1, max_h_steps=1, max_l_steps=0: ModelConfig's default) and "default" (the seeds' 2,5,5),
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
import ctypes
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hierarchos.config import (DEFAULT_WIRING, MINIMAL_DEPTH, SEED_DEPTH, TIME_MIX_WIRINGS, ModelConfig,  # noqa: E402
                               tiny_config)
from hierarchos.model.lm import HierarchosLM  # noqa: E402
from hierarchos.model.rwkv import compile_blocks, uncompile_blocks  # noqa: E402
from hierarchos.ops.wkv_chunk_grad_triton import set_recompute_states  # noqa: E402
from hierarchos.model.losses import lm_loss  # noqa: E402
from hierarchos.ops import wkv as wkv_ops  # noqa: E402
from hierarchos.train.cuda_graph import GraphedWindow  # noqa: E402
from gpt2_baseline import build_gpt2, fit_gpt2, gpt2_count  # noqa: E402

SIZES = {  # hierarchos shapes; GPT-2 is fitted to each
    "tiny": dict(vocab_size=4096, context_dim=128, h_hidden=128, l_hidden=128, h_layers=2, l_layers=2),
    "25m": dict(vocab_size=16384, context_dim=448, h_hidden=448, l_hidden=448, h_layers=3, l_layers=3),
    "125m": dict(vocab_size=50257, context_dim=768, h_hidden=768, l_hidden=768, h_layers=4, l_layers=4),
    # bench_train_loop's shape: the `train` command at ~30M with the byte tokenizer (260 ids)
    "30m-byte": dict(vocab_size=260, context_dim=512, h_hidden=512, l_hidden=512, h_layers=3, l_layers=3),
}
CONFIGS = {"minimal": MINIMAL_DEPTH,  # ModelConfig's default depth
           "mid": dict(h_cycles=2, max_h_steps=2, max_l_steps=2),
           "default": SEED_DEPTH}  # the seeds' (2,5,5): the issue targets quote it by this name
BLOCKS = {  # the manager's and worker's block types (issue rows for the seeds' other cells)
    "rwkv7": {}, "attention": dict(h_block="attention", l_block="attention"),
    "attention-window": dict(h_block="attention", l_block="attention"),  # window_size from --window-size
    "wkv4": dict(time_mix="wkv4")}
REASONING = ("h_cycles", "max_h_steps", "max_l_steps", "h_stride", "h_halt_thresh", "grad_steps")
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense TFLOP/s
TOL_CHUNKED, TOL_TF32 = 1e-4, 1e-3
TOL_FLA = 5e-3  # fla's Triton dots run in TF32: 1.8e-3 worst (da) at T=200 on an H200 (bench_wkv, BENCHMARKS.md)
COMPILE_FAILED: set[str] = set()  # models whose compile failed once run eager afterwards


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
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS growth is this row's
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    return _proc_kib("VmRSS") * 1024


def mem_peak(dev, base):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)  # absolute: weights + grads + activations
    return _proc_kib("VmHWM") * 1024 - base


def first_line(exc):
    """'Type: first line' of the innermost cause (torch.compile wraps the real error)."""
    while (inner := exc.__cause__ or getattr(exc, "inner_exception", None)) is not None:
        exc = inner
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]


@contextlib.contextmanager
def deadline(seconds):
    """Raise TimeoutError after `seconds` (0: no limit); bounds a first compiled step."""
    def expire(*_):
        raise TimeoutError(f"first step exceeded {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, expire) if seconds else None
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if old is not None:
            signal.signal(signal.SIGALRM, old)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------- models
def hier_cfg(size, config, use_rosa=True, block="rwkv7", window=256, wiring=DEFAULT_WIRING):
    extra = dict(BLOCKS[block], **({"window_size": window} if block == "attention-window" else {}))
    if block == "rwkv7":  # the RWKV-7 time mix's wiring (attention blocks have none)
        extra.update(TIME_MIX_WIRINGS[wiring])
    return ModelConfig(**SIZES[size], **CONFIGS[config], use_rosa=use_rosa, **extra).validate()


def loss_fn(model, x, y):
    if isinstance(model, HierarchosLM) or isinstance(getattr(model, "_orig_mod", None), HierarchosLM):
        out = model(x)
        return lm_loss(out, y, model.cfg.z_loss_weight)[0], out
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()), None


def make_optimizer_step(model):
    """What a training loop does after the backward, for both models: clip the gradient norm to 1
    and step the optimizer (hierarchos: the trainer's own, fused AdamW + LazyRowAdam for the
    lookup tables; GPT-2: fused AdamW). No host read: the clip's norm stays on the device."""
    if isinstance(model, HierarchosLM):
        from hierarchos.train.schedule import build_optimizer
        optimizer = build_optimizer(model, 1e-4, 0.01)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.95),
                                      fused=next(model.parameters()).is_cuda or None)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
    return step


# ----------------------------------------------------------------------------- one row
def run_row(row, make_model, T, B, V, dev, args):
    """Build, warm up, time; fill `row` (status instead of raising on OOM/errors/timeouts)."""
    row.update(T=T, batch=B, status="ok")
    base = mem_reset(dev)
    model = fwd = None
    amp = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext)
    gen = torch.Generator().manual_seed(T)
    batches = [torch.randint(0, V, (B, T + 1), generator=gen).to(dev) for _ in range(2)]  # rotated
    times, error = [], None
    try:
        model = make_model().to(dev).train()
        if not isinstance(model, HierarchosLM):
            row["params"] = sum(p.numel() for p in model.parameters())  # the built model's own count
        if args.checkpointing:
            (model.set_gradient_checkpointing(True) if isinstance(model, HierarchosLM)
             else model.gradient_checkpointing_enable())
        fwd, compiled = model, False
        if args.compile == "both" or (args.compile == "gpt2" and not isinstance(model, HierarchosLM)):
            if row["model"] in COMPILE_FAILED:
                row["compile"] = "compile skipped: failed on an earlier row"
            elif isinstance(model, HierarchosLM):
                # the RWKV blocks in place (what `train --compile` does): compiling the whole HRM loop
                # did not finish a first step in 200 s, and in place the CUDA-graph rows compile too
                compile_blocks(model, memory_budget=args.activation_budget)
                compiled, row["compile"] = True, "on (blocks)" + (
                    "" if args.activation_budget is None else f", activation budget {args.activation_budget:g}")
            else:
                fwd, compiled, row["compile"] = torch.compile(model), True, "on"

        optimizer_step = make_optimizer_step(model) if args.optimizer else (lambda: None)

        def eager_step(i):
            x = batches[i % 2]
            with amp():
                loss, out = loss_fn(fwd, x[:, :-1], x[:, 1:])
            loss.backward()
            optimizer_step()
            model.zero_grad(set_to_none=True)
            return out

        step = eager_step
        if row.get("graphs"):  # forward+loss+backward replayed as one CUDA graph (the first step captures)
            window = GraphedWindow(model, lambda out, y: lm_loss(out, y, model.cfg.z_loss_weight), autocast=amp,
                                   capture=dev.type == "cuda", log=log)

            def step(i):
                x = batches[i % 2]
                window(x[:, :-1], x[:, 1:], None)
                optimizer_step()
                model.zero_grad(set_to_none=False)  # in place: the graph writes these .grad tensors
                return None

        t_start = time.perf_counter()
        out, last = None, 0.0
        for i in range(args.warmup + args.steps):
            # the next step costs about the last one; a compiled row's first step is mostly the compile
            next_step = times[-1] if times else (last if i > 1 or not compiled else 0.0)
            if i and time.perf_counter() - t_start + next_step > args.max_seconds_per_row:
                row["status"] = f"timeout ({max(0, i - args.warmup)}/{args.steps} timed steps)"
                break
            sync(dev)
            t0 = time.perf_counter()
            try:
                with deadline(args.max_seconds_per_row if i == 0 and compiled else 0):
                    out = step(i)
            except Exception as exc:  # noqa: BLE001 - torch.compile raises many kinds
                if i or not compiled or isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                row["compile"] = "compile failed: " + first_line(exc)
                row["compile_attempt_s"] = time.perf_counter() - t0
                COMPILE_FAILED.add(row["model"])
                log(f"  {row['model']} {row['config']}: {row['compile']} -> eager")
                torch._dynamo.reset()
                uncompile_blocks(model)
                fwd, compiled = model, False
                t_start = t0 = time.perf_counter()  # the row's budget restarts with the eager model
                out = step(i)
            sync(dev)
            dt = last = time.perf_counter() - t0
            if i == 0:
                row["first_step_ms"] = dt * 1e3
            if i >= args.warmup:
                times.append(dt)
        if out is not None and getattr(out, "aux", None):
            row["aux"] = {k: round(float(v), 3) for k, v in out.aux.items() if k in ("manager_steps", "worker_steps")}
        if times and row["status"] == "ok" and args.flops:
            from torch.utils.flop_counter import FlopCounterMode
            fwd = model  # count on the eager module (compiled graphs hide their ops)
            uncompile_blocks(model)
            with FlopCounterMode(display=False) as counter:
                eager_step(0)
            row["flops_per_step"] = counter.get_total_flops()
    except torch.cuda.OutOfMemoryError:
        error = "oom"
    except Exception as exc:  # noqa: BLE001
        error = "error: " + first_line(exc)
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


# ----------------------------------------------------------------------------- parity preamble
NAMES = ("r", "log_w", "k", "v", "a", "b")


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


def wkv_case(dev, B=2, T=200, H=4, N=64, seed=0, dtype=torch.float32):
    """Inputs in the model's ranges: log_w in [-0.61, 0], a = -kappa, b = kappa * iclr; an initial
    state and output cotangents (also bench_wkv.py's cases)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    kappa = F.normalize(torch.randn(shape, generator=g), dim=-1)
    x = dict(r=torch.randn(shape, generator=g), log_w=-0.61 * torch.rand(shape, generator=g),
             k=0.5 * torch.randn(shape, generator=g), v=torch.randn(shape, generator=g),
             a=-kappa, b=kappa * torch.rand(shape, generator=g))
    state = 0.5 * torch.randn(B, H, N, N, generator=g)
    w_o, w_s = torch.randn(shape, generator=g), torch.randn(B, H, N, N, generator=g)
    to = dict(device=dev, dtype=dtype)
    return {n: t.to(**to) for n, t in x.items()}, state.to(**to), w_o.to(**to), w_s.to(**to)


def wkv_run(fn, x, state, w_o, w_s, dtype):
    # fresh leaves per run: .to() of a tensor already in `dtype` is the same tensor, and gradients of
    # one implementation would then add onto the previous one's (this made every second
    # implementation of the list fail with relative error 1.0, fla's included)
    leaves = {n: t.detach().to(dtype).clone().requires_grad_() for n, t in x.items()}
    s0 = state.detach().to(dtype).clone().requires_grad_()
    o, s = fn(**leaves, state=s0)
    ((o * w_o.to(o.dtype)).sum() + (s * w_s.to(s.dtype)).sum()).backward()
    return o.detach(), s.detach(), [leaves[n].grad for n in NAMES] + [s0.grad]


def parity_checks(dev):
    """float32, TF32 off: WKV paths vs the float64 reference scan; tiny model parallel vs step."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    checks = []

    def add(name, fn, tol):
        try:
            value, note = fn(), ""
        except Exception as exc:  # noqa: BLE001 - report, do not crash
            value, note = float("nan"), first_line(exc)
        checks.append(dict(name=name, rel_err=value, tol=tol, ok=bool(value <= tol), note=note))
        log(f"  check {name:<40} {value:9.2e}  tol {tol:.0e}  {'PASS' if value <= tol else 'FAIL'} {note}")

    case = wkv_case(dev)
    ref = wkv_run(wkv_ops.wkv7_reference, *case, torch.float64)
    impls = [("chunked", wkv_ops.wkv7_chunked, TOL_CHUNKED)]
    if "triton" in wkv_ops.available_impls(dev):
        impls.append(("triton", wkv_ops.wkv7_triton, TOL_CHUNKED))
        # the chunk-parallel backward as training runs it (TF32 products inside chunks; TF32 is off here)
        impls.append(("triton_chunk_grad", lambda *a, **kw: wkv_ops.wkv7_chunk_grad(*a, **kw, precision="tf32"),
                      TOL_FLA))
    if hasattr(wkv_ops, "wkv7_fla") and "fla" in wkv_ops.available_impls(dev):
        impls.append(("fla", wkv_ops.wkv7_fla, TOL_FLA))
    for name, fn, tol in impls:
        got = {}

        def run(fn=fn, got=got):
            got["r"] = wkv_run(fn, *case, torch.float32)
            return rel(got["r"][0], ref[0])
        add(f"wkv {name} o (B2 T200 H4 N64)", run, tol)
        if "r" in got:
            add(f"wkv {name} final state", lambda: rel(got["r"][1], ref[1]), tol)
            for i, gname in enumerate([*NAMES, "s0"]):
                add(f"wkv {name} grad d{gname}", lambda i=i: rel(got["r"][2][i], ref[2][i]), tol)

    if dev.type == "cuda":
        loss_checks(dev, add)

    def model_parity(amp=False):
        torch.manual_seed(0)
        model = HierarchosLM(tiny_config(l_conv_atol=0.0, h_halt_thresh=1.0, head_size=64, context_dim=64,
                                         h_hidden=64, l_hidden=64)).to(dev).float().eval()
        tokens = torch.randint(0, 7, (2, 48), generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            par = model(tokens).logits
            state, steps = model.init_state(2), []
            for t in range(tokens.shape[1]):
                out = model.step(tokens[:, t], state)
                steps.append(out.logits)
                state = out.state
        return rel(par, torch.stack(steps, 1))
    old = os.environ.pop(wkv_ops.ENV_IMPL, None)
    for impl, _, tol in impls:  # the parallel form uses `impl` (T > 2); the step form the recurrent scan
        os.environ[wkv_ops.ENV_IMPL] = impl
        add(f"tiny model parallel==step (wkv {impl})", model_parity, tol)
        # the blocks' elementwise work in bf16, the recurrence in float32
        if impl in ("triton", "triton_chunk_grad", "fla"):
            add(f"tiny model parallel==step, bf16 autocast (wkv {impl})", lambda: model_parity(amp=True), 3e-2)
    os.environ.pop(wkv_ops.ENV_IMPL)
    if old is not None:
        os.environ[wkv_ops.ENV_IMPL] = old
    return checks


def loss_checks(dev, add):
    """The Triton cross-entropy + z-loss against the PyTorch form (bf16 logits of GPT-2's vocabulary,
    a strided view as the padded head makes), and the padded head against F.linear."""
    from hierarchos.model.losses import cross_entropy_z
    from hierarchos.ops.aligned import padded_linear

    g = torch.Generator().manual_seed(3)
    wide = (4 * torch.randn(2048, 50304, generator=g)).to(dev, torch.bfloat16)
    targets = torch.randint(0, 50257, (2048,), generator=g).to(dev)
    targets[::7] = -100
    got = {}
    for impl in ("triton", "torch"):
        leaf = wide.clone().requires_grad_()
        ce, z = cross_entropy_z(leaf[:, :50257], targets, impl=impl)
        (0.7 * ce + 0.3 * z).backward()
        got[impl] = (ce.detach(), z.detach(), leaf.grad)
    for i, name in enumerate(("ce", "z-loss", "grad")):
        add(f"loss triton {name} (bf16, V=50257)", lambda i=i: rel(got["triton"][i], got["torch"][i]),
            5e-3 if name == "grad" else 1e-5)
    x = torch.randn(512, 768, generator=g).to(dev)
    w = torch.randn(50257, 768, generator=g).to(dev)
    add("padded head == F.linear (float32)", lambda: rel(padded_linear(x, w), F.linear(x, w)), 1e-5)


# ----------------------------------------------------------------------------- main
def hier_counts(cfg):
    with torch.device("meta"):
        m = HierarchosLM(cfg)
    return m.num_parameters(with_deepembed=False), m.num_parameters(with_deepembed=True)


def fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def print_table(info, matching, rows):
    log("\n" + "=" * 118)
    log(f"bench_forward | {info.get('gpu', 'CPU')} | CPU {info['cpu']} x{info['cpu_count']} | torch {info['torch']}"
        f" | transformers {info['transformers']} | wkv {info['wkv_impls'][-1]}")
    log(f"hierarchos {matching['size']}: {matching['hierarchos_params'] / 1e6:.2f}M w/o DeepEmbed "
        f"({matching['hierarchos_params_with_deepembed'] / 1e6:.2f}M with) | GPT-2 n_layer={matching['n_layer']} "
        f"n_embd={matching['n_embd']} n_pos={matching['n_positions']}: {matching['gpt2_params'] / 1e6:.2f}M "
        f"({matching['gpt2_vs_hierarchos'] * 100 - 100:+.1f}%)")
    log(f"{'model':<10} {'config':<28} {'T':>5} {'B':>3} {'params':>8} {'tok/s':>9} {'ms/step':>9} {'1st ms':>8} "
        f"{'peakMiB':>8} {'TFLOP/s':>7} {'MFU':>5} {'ratio':>6}  status")
    for r in rows:
        log(f"{r['model']:<10} {r['config']:<28} {r['T']:>5} {r['batch']:>3} {r['params'] / 1e6:>7.2f}M "
            f"{fmt(r.get('tokens_per_s'), '9.0f'):>9} {fmt(r.get('step_ms'), '9.1f'):>9} "
            f"{fmt(r.get('first_step_ms'), '8.0f'):>8} {fmt(r.get('peak_mem_mib'), '8.0f'):>8} "
            f"{fmt(r.get('tflops'), '7.3f'):>7} {fmt(r.get('mfu'), '5.1%'):>5} {fmt(r.get('ratio'), '6.3f'):>6}  "
            f"{r['status']}{'' if r.get('compile') in (None, 'on') else ' [' + r['compile'] + ']'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=SIZES, default="125m")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=["minimal", "default"])
    ap.add_argument("--no-rosa-for", nargs="*", choices=CONFIGS, default=["minimal"],
                    help="configs that also get a use_rosa=False row")
    ap.add_argument("--blocks", nargs="+", choices=BLOCKS, default=["rwkv7"],
                    help="block types of the hierarchos rows (attention-window: sliding window of --window-size)")
    ap.add_argument("--window-size", type=int, default=256)
    ap.add_argument("--wirings", nargs="+", choices=TIME_MIX_WIRINGS, default=[DEFAULT_WIRING],
                    help=f"RWKV-7 time-mix wirings, one row each (default {DEFAULT_WIRING}; rows of another wiring "
                         "are named config~wiring)")
    ap.add_argument("--tokens-per-step", type=int, help="default 16384 on CUDA, 2048 on CPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--compile", nargs="?", const="both", default="none", choices=("none", "gpt2", "both"),
                    help="torch.compile GPT-2 and (both) hierarchos; a failed or over-long compile falls back to eager")
    ap.add_argument("--wkv-impls", nargs="+", default=["auto"], choices=wkv_ops.IMPLS,
                    help="hierarchos rows for each WKV implementation (auto: what training picks)")
    ap.add_argument("--optimizer", action="store_true",
                    help="time full training steps: clip + optimizer step after the backward (both models)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both models")
    ap.add_argument("--activation-budget", type=float, metavar="F",
                    help="hierarchos' compiled blocks keep about this fraction of their saved activations, and "
                         "below 1 the recurrence recomputes its chunk states and the memory its chunks (train's "
                         "--activation-budget; needs --compile both)")
    ap.add_argument("--wkv-states", nargs="+", choices=("held", "recomputed"), default=["held"],
                    help="one hierarchos row each: the chunk-parallel WKV backward's chunk start states held from "
                         "the forward, or recomputed in the backward (what an activation budget below 1 turns on: "
                         "with --activation-budget below 1 every row recomputes)")
    ap.add_argument("--cuda-graphs", nargs="*", choices=CONFIGS, default=[], metavar="CONFIG",
                    help="configs that also get a row with forward+backward replayed as a CUDA graph")
    ap.add_argument("--skip-eager", action="store_true",
                    help="configs in --cuda-graphs get only their graphs row (e.g. to time compiled blocks + graphs, "
                         "the trainer's CUDA default, without compiling an eager row too)")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    ap.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-seconds-per-row", type=float, default=120.0)
    ap.add_argument("--json", help="default bench/results/forward_<device>.json")
    args = ap.parse_args()
    if args.activation_budget is not None and (args.compile != "both" or not 0 < args.activation_budget <= 1):
        ap.error("--activation-budget needs --compile both and a value in (0, 1]")
    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    tps = args.tokens_per_step or (16384 if dev.type == "cuda" else 2048)
    info = machine_info(dev)
    log(f"bench_forward: {' '.join(sys.argv[1:])}\nmachine: {json.dumps(info)}")
    checks = parity_checks(dev) if (args.check if args.check is not None else dev.type == "cuda") else []
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)

    V, P = SIZES[args.size]["vocab_size"], max(max(args.seq_lens), 1024)
    n_hier, n_hier_de = hier_counts(hier_cfg(args.size, args.configs[0]))
    L, d = fit_gpt2(n_hier, V, P, SIZES[args.size]["context_dim"])
    n_gpt = gpt2_count(V, P, L, d)
    matching = dict(size=args.size, hierarchos=SIZES[args.size], hierarchos_params=n_hier,
                    hierarchos_params_with_deepembed=n_hier_de, n_layer=L, n_embd=d, n_head=max(1, d // 64),
                    n_positions=P, gpt2_params=n_gpt, gpt2_vs_hierarchos=n_gpt / n_hier)
    log(f"matching: {json.dumps(matching)}")
    peak = next((v for k, v in PEAK_BF16.items() if k in info.get("gpu", "")), None)

    rows = []
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"forward_{dev.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def save():  # after every row: a run killed by its caller's time limit keeps the rows it finished
        with open(path + ".tmp", "w") as f:
            json.dump(dict(machine=info, argv=sys.argv[1:], args=vars(args), tokens_per_step=tps, matching=matching,
                           checks=checks, rows=rows), f, indent=2, default=str)
        os.replace(path + ".tmp", path)

    for T in args.seq_lens:
        B = max(1, tps // T)
        jobs = [(dict(model="gpt2", config=f"L{L}-d{d}", params=n_gpt), lambda: build_gpt2(V, P, L, d))]
        for c, block, wiring in [(c, b, w) for b in args.blocks for c in args.configs
                                 for w in (args.wirings if b == "rwkv7" else [DEFAULT_WIRING])]:
            name = c if block == "rwkv7" else f"{c}/{block}" + (f"{args.window_size}" if block.endswith("window") else "")
            name += "" if wiring == DEFAULT_WIRING else f"~{wiring}"
            for rosa in (True, False) if c in args.no_rosa_for else (True,):
                cfg = hier_cfg(args.size, c, rosa, block, args.window_size, wiring)
                n, n_de = hier_counts(cfg)
                for impl, states in [(i, st) for i in (args.wkv_impls if block == "rwkv7" else ["auto"])
                                     for st in args.wkv_states]:  # (the other blocks have no WKV-7)
                    tag = ("" if impl == "auto" else f"@{impl}") + ("" if states == "held" else "~recompute")
                    jobs.append((dict(model="hierarchos", config=name + ("" if rosa else "-norosa") + tag, params=n,
                                      params_with_deepembed=n_de, reasoning={k: getattr(cfg, k) for k in REASONING},
                                      blocks=block, wkv=impl, wkv_states=states,
                                      wiring=wiring if block == "rwkv7" else None),
                                 lambda cfg=cfg: HierarchosLM(cfg)))
                    if rosa and c in args.cuda_graphs:
                        jobs.append((dict(jobs[-1][0], config=name + "+graphs" + tag, graphs=True), jobs[-1][1]))
                        if args.skip_eager:  # the graphs row only
                            del jobs[-2]
        gpt_tps = None
        for row, make in jobs:
            log(f"-- {row['model']} {row['config']} T={T} B={B} ...")
            os.environ.pop(wkv_ops.ENV_IMPL, None)
            if row.get("wkv", "auto") != "auto":  # this row's WKV implementation (the model asks for 'auto')
                os.environ[wkv_ops.ENV_IMPL] = row["wkv"]
            set_recompute_states(row.get("wkv_states") == "recomputed")  # (an activation budget may turn it on)
            run_row(row, make, T, B, V, dev, args)
            os.environ.pop(wkv_ops.ENV_IMPL, None)
            gpt_tps = row.get("tokens_per_s") if row["model"] == "gpt2" else gpt_tps
            if row.get("tokens_per_s") and gpt_tps:
                row["ratio"] = row["tokens_per_s"] / gpt_tps
            if peak and row.get("tflops"):
                row["mfu"] = row["tflops"] * 1e12 / peak
            log(f"   {row['status']}: {fmt(row.get('tokens_per_s'), '.0f')} tok/s, "
                f"{fmt(row.get('step_ms'), '.1f')} ms/step, first {fmt(row.get('first_step_ms'), '.0f')} ms, "
                f"peak {row['peak_mem_mib']:.0f} MiB {row.get('aux', '')}")
            rows.append(row)
            save()

    save()
    if checks:
        log("\nparity (float32, TF32 off): " + " | ".join(
            f"{c['name']}: {c['rel_err']:.1e} {'PASS' if c['ok'] else 'FAIL'}" for c in checks))
    print_table(info, matching, rows)
    log(f"json: {path}")
    failed = [c["name"] for c in checks if not c["ok"]]
    if failed:
        log(f"PARITY FAIL: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
