"""WKV-7 kernels on CUDA: parity against the float64 scan, then forward+backward timings.

(1) Parity: our Triton kernel (and fla's chunked kernel when fla-core imports: chunk 16, chunk 64
under the model's decay bound, and bf16 operands) in float32 vs `wkv7_reference` in float64 on
fresh random inputs (fresh leaves per implementation) in the model's ranges, B=2 H=4 N=64 at T=200
and T=1000, then with frozen tokens and with the state carried between two calls: relative errors
of o, the final state and all seven gradients, PASS under --tol (--fla-tol for fla).
(2) Timing (CUDA events, warm-up, median of --reps): forward+backward, and forward alone under
no_grad, at --shapes (default B=8 T=2048 and B=2 T=8192, H=12 N=64), for the Triton kernel (a sweep of launch
configs, column sums by parts or atomics, at the first shape), the chunked PyTorch path (chunk 32 and 64) and fla if present;
beside them two floors: the bytes a fused fwd+bwd must move over the measured copy bandwidth,
and its FLOPs over the measured float32 (no TF32) matmul rate. First-call time (Triton JIT) is
reported apart from the steady time. --chunk-forward adds the chunk-parallel prefill kernel
(`wkv_chunk_triton`, forward only): checked against the scan on outputs and state, timed as a no-grad
forward beside the others.

GPU:  PYTHONPATH=. python3 bench/bench_wkv.py --json $OUT/wkv.json | tee $OUT/wkv.log
CPU smoke (interpreter, tiny):  TRITON_INTERPRET=1 PYTHONPATH=. python bench/bench_wkv.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.bench_forward import wkv_case  # noqa: E402
from hierarchos.ops import wkv as wkv_ops  # noqa: E402
from hierarchos.ops.wkv_chunk_grad_triton import wkv7_chunk_grad  # noqa: E402
from hierarchos.ops.wkv_chunk_triton import wkv7_chunk_forward  # noqa: E402
from hierarchos.ops.wkv_triton import CHUNK, wkv7_triton  # noqa: E402

NAMES = ("r", "log_w", "k", "v", "a", "b")


def log(*a):
    print(*a, flush=True)


def make_case(B, T, H, N, seed, device, dtype=torch.float32, frozen=0.0, slow=0.0):
    """Inputs in the model's ranges (bench_forward's cases), an initial state, output cotangents;
    with `frozen` > 0 that share of tokens follows the model's frozen-token rule (log_w = k = b = 0); with
    `slow` > 0 that share of key channels decays a thousand times slower (log_w / 1000: a state that
    remembers ~thousands of tokens, where an error made in one chunk fades slowest)."""
    x, state, d_o, d_s = wkv_case(device, B, T, H, N, seed, dtype)
    if slow:
        g = torch.Generator().manual_seed(seed + 2)
        scale = torch.where(torch.rand(N, generator=g) < slow, 1e-3, 1.0).to(device=device, dtype=dtype)
        x = {n: t * scale if n == "log_w" else t for n, t in x.items()}
    if frozen:
        g = torch.Generator().manual_seed(seed + 1)
        live = (torch.rand(B, T, 1, 1, generator=g) >= frozen).to(device=device, dtype=dtype)
        x = {n: t * live if n in ("log_w", "k", "b") else t for n, t in x.items()}
    return x, state, d_o, d_s


def carried(fn, split):
    """fn run on tokens [0, split) and then [split, T) with the state carried between the calls:
    the parity of this function checks state carry-in, carry-out and the gradient through the carry."""
    def run(r, log_w, k, v, a, b, state):
        first = fn(*(t[:, :split] for t in (r, log_w, k, v, a, b)), state=state)
        second = fn(*(t[:, split:] for t in (r, log_w, k, v, a, b)), state=first[1])
        return torch.cat([first[0], second[0]], dim=1), second[1]
    return run


def chunk_grad_tf32(*a, state):
    """The chunk-parallel backward as `wkv7` runs it where TF32 is allowed (this script turns TF32 off)."""
    return wkv7_chunk_grad(*a, state=state, precision="tf32")


def forward_only(name: str) -> bool:
    """The chunk-parallel prefill kernel has no backward: checked and timed as a no-grad forward."""
    return name.startswith("triton_chunk") and not name.startswith("triton_chunk_grad")


def fwd_bwd(fn, x, state, d_o, d_s, dtype, grads=True):
    if not grads:
        with torch.no_grad():
            o, s = fn(*(t.to(dtype) for t in x.values()), state=state.to(dtype))
        return o, s, None
    # fresh leaves for every implementation (clone): gradients never add onto another run's
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (*x.values(), state)]
    o, s = fn(*leaves[:6], state=leaves[6])
    grads = torch.autograd.grad([o, s], leaves, [d_o.to(o.dtype), d_s.to(s.dtype)])
    return o.detach(), s.detach(), grads


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


def parity(impls, device, seq_lens, tol, smoke, frozen=0.0, split=None, slow=0.0):
    """Each impl (float32) vs the float64 scan on fresh inputs; `tol` a number or {impl: number}.
    `split`: run each impl as two calls with the state carried (see `carried`); `frozen`, `slow`: see
    `make_case`."""
    rows = []
    for T in seq_lens:
        seed = random.SystemRandom().randrange(2**31)
        B, H, N = (1, 1, 16) if smoke else (2, 4, 64)
        case = make_case(B, T, H, N, seed, device, frozen=frozen, slow=slow)
        ref = fwd_bwd(wkv_ops.wkv7_reference, *case, torch.float64)
        for name, fn in impls.items():
            limit = tol.get(name, tol.get(name.split(" ")[0], tol["*"])) if isinstance(tol, dict) else tol
            label = (name + (f" carry@{split}" if split else "") + (f" frozen{frozen:g}" if frozen else "")
                     + (f" slow{slow:g}" if slow else ""))
            try:
                got = fwd_bwd(carried(fn, split) if split else fn, *case, torch.float32, not forward_only(name))
            except Exception as exc:  # noqa: BLE001 - report and go on
                rows.append(dict(impl=name, case=label, T=T, seed=seed, what="run", rel_err=float("nan"),
                                 ok=False, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
                log(f"  parity {label:<24} T{T}: FAILED to run: {rows[-1]['note']}")
                continue
            errs = {"o": rel(got[0], ref[0]), "state": rel(got[1], ref[1])}
            errs.update({f"d{n}": rel(g, gr) for n, g, gr in zip((*NAMES, "state0"), got[2] or (), ref[2])})
            for what, e in errs.items():
                rows.append(dict(impl=name, case=label, T=T, seed=seed, what=what, rel_err=e, tol=limit,
                                 ok=bool(e < limit)))
            worst = max(errs.values())
            log(f"  parity {label:<24} B{B} T{T} H{H} N{N} seed={seed}: worst {worst:.2e} "
                f"({max(errs, key=errs.get)})  {'PASS' if worst < limit else 'FAIL'} (tol {limit:g})  "
                + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    return rows


def cuda_time(fn, reps, warmup):
    """Median milliseconds of fn() over reps, CUDA events around each call, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def measure_ceilings(device):
    """Copy bandwidth (bytes read + written) and float32 (no TF32) matmul rate, measured here."""
    x = torch.empty(2**29, device=device)           # 2 GiB float32, far past the L2
    y = torch.empty_like(x)
    ms, _, _ = cuda_time(lambda: y.copy_(x), 10, 3)
    bandwidth = 2 * x.numel() * 4 / (ms * 1e-3)
    del x, y
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    m = torch.randn(8192, 8192, device=device)
    ms, _, _ = cuda_time(lambda: m @ m, 5, 2)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return bandwidth, 2 * 8192**3 / (ms * 1e-3)


def fused_floor(B, T, H, N, bandwidth, flops_rate):
    """Fewest bytes and FLOPs of a fused fwd+bwd: fwd reads 6 inputs, writes o; bwd reads the 6
    inputs and do, writes 6 gradients (20 tensors of B*T*H*N floats; states are small). FLOPs per
    token and head: forward ~ 8 N^2 (S a, the rank-2 update, S r), backward ~ 8 N^2 again for the
    recompute plus ~ 22 N^2 for the adjoint step, ~ 38 N^2 in all."""
    elems = B * T * H * N
    bytes_moved = 20 * elems * 4
    flops = 38 * B * T * H * N * N
    return bytes_moved / bandwidth * 1e3, flops / flops_rate * 1e3, bytes_moved, flops


def timing(impls, device, shape, reps, warmup, with_fwd=True):
    B, T, H, N = shape
    case = make_case(B, T, H, N, 1234, device)
    x, state, d_o, d_s = case
    leaves = [t.clone().requires_grad_() for t in (*x.values(), state)]
    out = []
    for name, fn in impls.items():
        def step(fn=fn):
            o, s = fn(*leaves[:6], state=leaves[6])
            torch.autograd.grad([o, s], leaves, [d_o, d_s])

        def forward(fn=fn):
            with torch.no_grad():
                fn(*leaves[:6], state=leaves[6])
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            first = forward if forward_only(name) else step
            first()
            torch.cuda.synchronize()
            first_ms = (time.perf_counter() - t0) * 1e3
            med, lo, hi = (float("nan"),) * 3 if forward_only(name) else cuda_time(step, reps, warmup)
            peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20  # above the inputs: the call's own
            fwd_first = time.perf_counter()
            forward()
            torch.cuda.synchronize()
            fwd_first = (time.perf_counter() - fwd_first) * 1e3
            fwd_med = cuda_time(forward, reps, warmup)[0] if with_fwd else float("nan")
        except Exception as exc:  # noqa: BLE001
            log(f"  {name:<28} B{B} T{T}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:150]}")
            out.append(dict(impl=name, shape=shape, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        row = dict(impl=name, shape=shape, fwd_bwd_ms=med, fwd_bwd_min_ms=lo, fwd_bwd_max_ms=hi,
                   first_call_ms=first_ms, first_nograd_fwd_ms=fwd_first, fwd_nograd_ms=fwd_med, peak_mib=peak_mib)
        out.append(row)
        log(f"  {name:<28} B{B} T{T}: fwd+bwd {med:8.3f} ms (min {lo:.3f} max {hi:.3f})  "
            f"fwd(no grad) {fwd_med:8.3f} ms  first call {first_ms:9.1f} ms (+{fwd_first:.0f} ms no-grad fwd)  "
            f"peak +{peak_mib:,.0f} MiB")
    return out


def save(result, path):
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)


def fla_variants():
    """fla's chunked DPLR kernel as wkv7 runs it (chunk 16), with the model's decay bound asserted
    (log_w >= -0.61: chunk 64 on its tensor-core scheme), and fed bf16 operands (state float32).
    Cold, each variant costs minutes of Triton JIT + autotune (a first device call ran out of time
    in 'fla c64'), so --fla-variants picks; 'fla' is what wkv7 runs."""
    def bf16(*a, state):
        return wkv_ops.wkv7_fla(*a, state=state, lower_bound=wkv_ops.LOG_W_MIN, operands=torch.bfloat16)
    return {"fla": wkv_ops.wkv7_fla,
            "fla c64": lambda *a, state: wkv_ops.wkv7_fla(*a, state=state, lower_bound=wkv_ops.LOG_W_MIN),
            "fla c64 bf16": bf16}   # bf16 operands: expect ~1e-2, reported, not a candidate


def triton_config(rows, warps, prefetch=True, sums="parts", chunk=CHUNK, scratch="keep"):
    return lambda *a, state: wkv7_triton(*a, state=state, rows=rows, num_warps=warps, prefetch=prefetch,
                                         column_sums=sums, chunk=chunk, scratch=scratch)


def chunk_forward_configs() -> dict:
    """The chunk-parallel prefill kernel's variants (no-grad forward only): the default (16-token chunks,
    16 rows a program, 4 warps), then one knob moved at a time -- 32 rows, 32-token chunks, 2 or 8 warps
    -- and TF32 products (not a candidate: timed, not checked). An H100's first sweep (BENCHMARKS.md)
    found the default fastest at batch 1; each variant costs a cold Triton compile of 1-7 s."""
    def config(chunk=16, rows=16, warps=4, precision="ieee"):
        return lambda *a, state: wkv7_chunk_forward(*a, state=state, chunk=chunk, rows=rows, precision=precision,
                                                    num_warps=warps)
    return {"triton_chunk (default)": config(),
            "triton_chunk r32": config(rows=32), "triton_chunk c32": config(chunk=32),
            "triton_chunk warps=2": config(warps=2), "triton_chunk warps=8": config(warps=8),
            "triton_chunk tf32": config(precision="tf32")}


def chunk_grad_configs() -> dict:
    """The chunk-parallel backward's variants (`wkv7_chunk_grad`): chunks of 16 or 32 tokens, the products
    inside a chunk in TF32 (what `wkv7` runs where TF32 is allowed) or float32 ("ieee": 5-10x slower on an
    H100), 8 warps for the per-chunk gradients, the forward forced either way (default: by the call's
    (batch, head) pairs), the scans across chunks in float32 (where a name has no "scan="), 3xTF32 or TF32,
    and the start states made again in the backward instead of held ("recompute": what it saves is held
    between a step's forward and backward across its layer calls, so a single call's peak does not show it;
    `bench_forward.py --wkv-states` does); "triton_chunk_grad (default, TF32)" beside them is `wkv7`'s choice
    (TF32 scans up to 1,024 chunks)."""
    def config(chunk=16, precision="tf32", forward=None, warps=4, scan="ieee", recompute=False):
        return lambda *a, state: wkv7_chunk_grad(*a, state=state, chunk=chunk, precision=precision, forward=forward,
                                                 grad_warps=warps, scan_precision=scan, recompute_states=recompute)

    def name(c, p, f, w, scan, recompute=False):
        return (f"chunk_grad c{c} {p}{' fwd=' + f if f else ''}{f' warps={w}' if w != 4 else ''}"
                f"{' scan=' + scan if scan != 'ieee' else ''}{' recompute' if recompute else ''}")
    return {name(*v): config(*v) for v in [(16, "tf32", None, 4, "ieee"), (32, "tf32", None, 4, "ieee"),
                                            (16, "tf32", None, 8, "ieee"), (16, "tf32", "chunk", 4, "ieee"),
                                            (16, "tf32", "sequential", 4, "ieee"), (16, "ieee", None, 4, "ieee"),
                                            (16, "tf32", None, 4, "tf32x3"), (16, "tf32", None, 4, "tf32"),
                                            (16, "tf32", "chunk", 4, "tf32"), (16, "tf32", "sequential", 4, "tf32"),
                                            (16, "tf32", None, 4, "tf32", True), (16, "tf32", "chunk", 4, "tf32", True)]}


def sweep_configs(kind: str) -> dict:
    """The Triton configs a sweep times: "launch" (rows a program, warps, prefetch, column sums),
    "chunk" (the default launch, checkpoint spacing 8/16/32, the scratch's cache hints), "rows"
    (16 to 64 rows a program, more warps) or "small" (1 to 8 rows a program, one warp: a prefill at
    batch 1 has 12 (batch, head) pairs, so the occupancy rule's smallest block leaves most SMs idle)."""
    if kind == "chunk-grad":
        return chunk_grad_configs()
    if kind == "chunk":
        return {f"triton chunk={c} scratch={h}": triton_config(None, None, True, None, c, h)
                for c in (8, 16, 32) for h in ("none", "keep")}
    if kind == "small":
        return {f"triton rows={r} warps=1 atomic": triton_config(r, 1, True, "atomic") for r in (1, 2, 4, 8)}
    if kind == "rows":  # larger row blocks, up to a whole state a program (no column sums across programs)
        return {f"triton rows={r} warps={w} atomic": triton_config(r, w, True, "atomic")
                for r, w in [(16, 1), (16, 2), (32, 2), (32, 4), (64, 4), (64, 8)]}
    return {f"triton rows={r} warps={w}{'' if p else ' noprefetch'}{'' if c == 'parts' else ' ' + c}":
            triton_config(r, w, p, c)
            for r, w, p, c in [(16, 2, True, "parts"), (16, 2, False, "parts"), (4, 1, True, "parts"),
                               (8, 1, True, "parts"), (8, 2, True, "parts"), (16, 1, True, "parts"),
                               (32, 2, True, "parts"), (8, 1, True, "atomic"), (16, 1, True, "atomic"),
                               (4, 1, True, "atomic"), (32, 2, True, "atomic")]}   # rows=64 spills registers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--fla-tol", type=float, default=5e-3,
                    help="fla's Triton dots may run in TF32 (METHOD: tf32 lands near 3e-4 on one product)")
    ap.add_argument("--no-sweep", action="store_true", help="time only the default Triton config")
    ap.add_argument("--sweep", choices=["launch", "chunk", "rows", "small", "chunk-grad"], default="launch",
                    help="launch: rows/warps/prefetch/column sums at the first shape (the best three at the "
                         "others); chunk: checkpoint spacing and scratch cache hints at every shape; rows: "
                         "row blocks up to a whole state a program, at every shape; small: 1 to 8 rows a "
                         "program, at every shape; chunk-grad: the chunk-parallel backward's chunk, precision "
                         "and forward, at every shape")
    ap.add_argument("--fla-variants", nargs="*", default=["fla"], choices=["fla", "fla c64", "fla c64 bf16"],
                    help="fla's variants to check and time (each costs minutes of cold Triton JIT + autotune)")
    ap.add_argument("--no-chunked", action="store_true", help="do not time the chunked PyTorch path")
    ap.add_argument("--scan-lens", type=int, nargs="+", default=[4096], metavar="T",
                    help="lengths at which the chunk-grad sweep's scan-precision variants are also checked, with "
                         "the model's decays and with a quarter of the channels a thousand times slower")
    ap.add_argument("--chunk-forward", action="store_true",
                    help="check and time the chunk-parallel prefill kernel (no-grad forward) at every shape")
    ap.add_argument("--variants", nargs="+", metavar="TEXT",
                    help="time only the sweep's variants whose names contain one of these texts")
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter: tiny parity only")
    ap.add_argument("--shapes", nargs="+", default=["8,2048,12,64", "2,8192,12,64"], metavar="B,T,H,N",
                    help="timed shapes (the sweep runs at the first; 16,1024,12,64 is the 125m model's at T=1024)")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False   # the chunked path's matmuls in true float32
    info = dict(torch=torch.__version__, python=platform.python_version(), argv=sys.argv)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    log(f"# {info}")
    impls = {"triton": wkv7_triton, "triton_chunk_grad": chunk_grad_tf32}
    if args.chunk_forward:
        impls["triton_chunk"] = wkv7_chunk_forward
    if device == "cuda" and "fla" in wkv_ops.available_impls("cuda"):
        impls.update({n: f for n, f in fla_variants().items() if n in args.fla_variants})
    tol = {"*": args.tol, "fla": args.fla_tol, "triton_chunk_grad": args.fla_tol}
    result = dict(info=info)

    log("## parity (float32 vs float64 reference; fresh leaves per implementation)")
    cases = [dict(seq_lens=[7, 40] if args.smoke else [200, 1000])]
    if not args.smoke:  # frozen tokens, and the state carried between two calls (split off a chunk edge)
        cases += [dict(seq_lens=[333], frozen=0.3), dict(seq_lens=[333], split=77),
                  dict(seq_lens=[1000], frozen=0.2, split=500), dict(seq_lens=[4096])]
    result["parity"] = [row for case in cases for row in parity(impls, device, tol=tol, smoke=args.smoke, **case)]
    sweep = sweep_configs(args.sweep)
    if args.variants:
        sweep = {n: f for n, f in sweep.items() if any(v in n for v in args.variants)}
    if not args.smoke and not args.no_sweep:  # every launch config that gets timed is checked too (T=200)
        sweep_tol = {"*": args.tol, **{n: args.fla_tol for n in sweep if " tf32" in n}}
        result["parity"] += parity(sweep, device, [200], sweep_tol, args.smoke)
        long_scans = {n: f for n, f in sweep.items() if "scan=" in n}  # does a scan's error compound?
        if long_scans:
            result["parity"] += parity(long_scans, device, args.scan_lens, sweep_tol, args.smoke)
            result["parity"] += parity(long_scans, device, args.scan_lens, sweep_tol, args.smoke, slow=0.25)
    verdicts = {}
    for row in result["parity"]:
        verdicts.setdefault(row["impl"], []).append(row)
    for name, rows in verdicts.items():
        bad = [r for r in rows if not r["ok"]]
        worst = max((r["rel_err"] for r in rows), default=float("nan"))
        log(f"  {name} parity: {'PASS' if not bad else f'FAIL ({len(bad)} values)'} worst {worst:.2e} "
            f"over {len(rows)} values (tol {rows[0].get('tol', args.tol):g})")
    result["verdict"] = {name: all(r["ok"] for r in rows) for name, rows in verdicts.items()}
    save(result, args.json)  # again after every timed shape: a run cut off by a timeout keeps what it has
    n_fail = sum(not r["ok"] for r in result["parity"] if r["impl"].startswith("triton"))
    log(f"  triton parity: {'PASS' if n_fail == 0 else f'FAIL ({n_fail} values over {args.tol})'}")
    if args.smoke:
        return 0 if n_fail == 0 else 1

    bandwidth, flops_rate = measure_ceilings(device)
    result["ceilings"] = dict(copy_bandwidth_Bps=bandwidth, fp32_matmul_flops=flops_rate)
    log(f"## ceilings: copy {bandwidth / 1e12:.2f} TB/s (read+write), fp32 matmul {flops_rate / 1e12:.1f} TFLOP/s")

    shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes]
    result["timing"] = []
    for i, shape in enumerate(shapes):
        log(f"## fwd+bwd B{shape[0]} T{shape[1]} H{shape[2]} N{shape[3]}")
        floor_b, floor_f, nbytes, nflops = fused_floor(*shape, bandwidth, flops_rate)
        log(f"  floors: bytes {nbytes / 1e9:.2f} GB -> {floor_b:.3f} ms; FLOPs {nflops / 1e9:.1f} G -> {floor_f:.3f} ms")
        result.setdefault("floors", []).append(dict(shape=shape, bytes=nbytes, flops=nflops,
                                                    bytes_ms=floor_b, flops_ms=floor_f))
        if (i == 0 or args.sweep != "launch") and not args.no_sweep:
            rows = timing(sweep, device, shape, args.reps, args.warmup)
        else:
            best = [r for r in result["timing"] if "fwd_bwd_ms" in r and r["impl"] in sweep]
            best = sorted(best, key=lambda r: r["fwd_bwd_ms"])[:3]
            picks = {r["impl"]: sweep[r["impl"]] for r in best} if best else {}
            rows = timing(picks, device, shape, max(5, args.reps // 2), args.warmup)
        reps = args.reps if shape[1] <= 2048 else max(3, args.reps // 4)
        others = {"triton (default)": wkv7_triton, "triton_chunk_grad (default, TF32)": chunk_grad_tf32}
        if not args.no_chunked:
            others.update({"chunked 32": lambda *a, state: wkv_ops.wkv7_chunked(*a, state=state, chunk_size=32),
                           "chunked 64": lambda *a, state: wkv_ops.wkv7_chunked(*a, state=state, chunk_size=64)})
        others.update({n: f for n, f in impls.items() if n.startswith("fla")})
        if args.chunk_forward:
            others.update(chunk_forward_configs())
        rows += timing(others, device, shape, reps, min(args.warmup, 2))
        result["timing"] += rows
        save(result, args.json)

    log("\n## summary (ms, median; fwd+bwd per layer call)")
    log("| impl | shape B,T,H,N | fwd+bwd ms (nan: forward only) | no-grad fwd ms | first call ms | peak MiB above inputs |")
    log("|---|---|---:|---:|---:|---:|")
    for r in result["timing"]:
        if "fwd_bwd_ms" in r:
            log(f"| {r['impl']} | {','.join(map(str, r['shape']))} | {r['fwd_bwd_ms']:.3f} | "
                f"{r['fwd_nograd_ms']:.3f} | {r['first_call_ms']:.0f} | {r['peak_mib']:,.0f} |")
    for f in result["floors"]:
        log(f"| floor: bytes / copy bandwidth | {','.join(map(str, f['shape']))} | {f['bytes_ms']:.3f} | | |")
        log(f"| floor: FLOPs / fp32 matmul rate | {','.join(map(str, f['shape']))} | {f['flops_ms']:.3f} | | |")
    log(f"triton parity: {'PASS' if n_fail == 0 else 'FAIL'}")
    save(result, args.json)
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
