"""The one-token step's matrix-vector launches at the 125m model's shapes: `matvecs_triton` under
each launch configuration against cuBLAS (one `F.linear` a product, as the eager step runs them) and
against the card's read bandwidth, every launch replayed from a CUDA graph (as the generation step
runs them: launch latency is the graph's, not Python's).

Groups (one layer step of a 125m block): the time mix's receptance, key and value (three 768 x 768);
the channel mix's gate and up (two 3072 x 768), and the same with the activation and the DeepEmbed gate
in one launch (`swiglu_triton`); the output (768 x 768) and the channel mix's down
(768 x 3072) projections, one product a launch; the low-rank paths' down sides (x @ down, (768, r) each,
with their activations) and up sides ((r, 768) each). Each configuration's outputs are checked
against the float64 products first (a configuration that disagrees is reported and not timed).

    PYTHONPATH=. python bench/bench_step_matvecs.py --json bench/results/step_matvecs.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_generate import CONFIGS, SIZES  # noqa: E402  (bench/ is the script's folder)
from hierarchos.config import DEFAULT_WIRING, TIME_MIX_WIRINGS  # noqa: E402
from hierarchos.model import HierarchosLM  # noqa: E402
from hierarchos.ops import matvec_triton as mv  # noqa: E402


def read_bandwidth(device) -> float:
    """GB/s of a 1 GiB float32 sum (reads only), best of 5."""
    x = torch.ones(1 << 28, device=device)
    x.sum()
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def graphed_us(fn, repeats: int = 50, replays: int = 20) -> float:
    """Microseconds a call of `fn` takes, `repeats` calls captured in one CUDA graph, best of `replays` replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    best = float("inf")
    for _ in range(replays):
        torch.cuda.synchronize()
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best / repeats * 1e6


def groups(block, device) -> dict:
    """name -> (xs, weights, acts, transposed) of one layer step of `block`."""
    tm, cm = block.time_mix, block.channel_mix
    C = tm.dim
    g = torch.Generator(device="cpu").manual_seed(0)
    x = lambda k: torch.randn(1, k, generator=g).to(device)  # noqa: E731
    paths = [(tm.decay_down, tm.decay_up, "tanh"), (tm.iclr_down, tm.iclr_up, "none")]
    if hasattr(tm, "gate_down"):
        paths.append((tm.gate_down, tm.gate_up, "sigmoid"))
    if tm.value_residual:
        paths.append((tm.value_residual_down, tm.value_residual_up, "none"))
    every = [True] * len(paths)
    return {
        "receptance, key, value": ([x(C) for _ in range(3)], [tm.receptance.weight, tm.key.weight, tm.value.weight],
                                   ["none"] * 3, [False] * 3),
        "gate, up (channel mix)": ([x(C) for _ in range(2)], [cm.gate.weight, cm.up.weight], ["none"] * 2, [False] * 2),
        "swiglu: gate, up and silu (one launch)": ([x(C), x(cm.up.out_features)], [cm.gate.weight, cm.up.weight],
                                                   None, None),
        "output (one product)": ([x(C)], [tm.output.weight], ["none"], [False]),
        "down (channel mix, one product)": ([x(cm.down.in_features)], [cm.down.weight], ["none"], [False]),
        "low-rank downs": ([x(C) for _ in paths], [d for d, _, _ in paths], [a for _, _, a in paths], every),
        "low-rank ups": ([x(d.shape[1]) for d, _, _ in paths], [u for _, u, _ in paths], ["none"] * len(paths), every),
    }


def swiglu_rows(name, xs, weights, bandwidth, args) -> list[dict]:
    """The channel mix's gate, up and activation in one launch (`swiglu_triton`) under each configuration,
    against cuBLAS's two products and the eager activation; xs = (x, the DeepEmbed gate)."""
    (x, deep_gate), (w_gate, w_up) = xs, weights
    nbytes = (w_gate.numel() + w_up.numel() + x.numel() + 2 * deep_gate.numel()) * 4
    roof_us = nbytes / bandwidth / 1e3
    want = mv.swiglu_reference(x.double(), w_gate.double(), w_up.double(), deep_gate.double())
    out = x.new_empty(1, w_gate.shape[0])
    cublas = graphed_us(lambda: F.silu(F.linear(x, w_gate)) * F.linear(x, w_up) * deep_gate)
    print(f"\n{name}: {nbytes / 1e6:.2f} MB, roofline {roof_us:.2f} us, cuBLAS (two products, the activation and "
          f"the gate eager) {cublas:.2f} us", flush=True)
    rows = []
    configs = [mv.SWIGLU_CONFIG] + [c for c in itertools.product(args.block_out, args.block_in, args.warps)
                                    if c != mv.SWIGLU_CONFIG and c[0] <= 16]
    for config in configs:
        mv._swiglu_launch(x, w_gate, w_up, deep_gate, out, config)
        torch.cuda.synchronize()
        if not torch.allclose(out.double(), want, rtol=1e-4, atol=1e-4):
            print(f"  {config}: WRONG RESULTS (not timed)", flush=True)
            rows.append({"group": name, "config": list(config), "correct": False})
            continue
        us = graphed_us(lambda: mv._swiglu_launch(x, w_gate, w_up, deep_gate, out, config))
        default = config == mv.SWIGLU_CONFIG
        rows.append({"group": name, "config": list(config), "default": default, "correct": True, "us": us,
                     "gb_per_s": nbytes / us / 1e3, "fraction_of_roofline": roof_us / us, "cublas_us": cublas,
                     "vs_cublas": cublas / us, "bytes": nbytes})
        print(f"  {'default ' if default else ''}{config}: {us:7.2f} us  {nbytes / us / 1e3:7.0f} GB/s"
              f"  {roof_us / us:5.1%} of roofline  {cublas / us:5.2f}x cuBLAS", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="125m")
    ap.add_argument("--block-out", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--block-in", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--json", default="bench/results/step_matvecs.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = dataclasses.replace(SIZES[args.size](), **CONFIGS["minimal"], **TIME_MIX_WIRINGS[DEFAULT_WIRING]).validate()
    model = HierarchosLM(cfg).to(device).eval()
    block = model.reasoner.manager.blocks[0]
    bandwidth = read_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: read bandwidth {bandwidth:.0f} GB/s (1 GiB float32 sum)", flush=True)
    rows = []
    with torch.no_grad():
        for name, (xs, weights, acts, transposed) in groups(block, device).items():
            if name.startswith("swiglu"):
                rows += swiglu_rows(name, xs, weights, bandwidth, args)
                continue
            nbytes = sum(w.numel() * 4 for w in weights) + sum(x.numel() * 4 for x in xs)
            roof_us = nbytes / bandwidth / 1e3
            codes = [mv.ACTIVATIONS.index(a) for a in acts]
            want = mv.matvecs_reference([x.double() for x in xs], [w.double() for w in weights], acts, transposed)
            outs = [x.new_empty(1, mv._weight_of(w, t).shape[0]) for x, w, t in zip(xs, weights, transposed)]
            fns = [mv.ACTIVATION_FNS[a] for a in acts]
            linears = [(x, w.t() if t else w, f) for x, w, t, f in zip(xs, weights, transposed, fns)]
            cublas = graphed_us(lambda: [f(F.linear(x, w)) for x, w, f in linears])
            default = mv.launch_config([o.shape[1] for o in outs], [x.shape[1] for x in xs], transposed)
            configs = [default] + [c for c in itertools.product(args.block_out, args.block_in, args.warps) if c != default]
            print(f"\n{name}: {len(xs)} products, {nbytes / 1e6:.2f} MB, roofline {roof_us:.2f} us, cuBLAS "
                  f"(one launch a product, activations eager) {cublas:.2f} us", flush=True)
            for config in configs:
                try:
                    mv._launch(xs, weights, outs, codes, transposed, config)
                    torch.cuda.synchronize()
                    ok = all(torch.allclose(o.double(), w_, rtol=1e-4, atol=1e-4) for o, w_ in zip(outs, want))
                except Exception as exc:  # a configuration Triton cannot build
                    print(f"  {config}: failed to run ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
                    continue
                if not ok:
                    print(f"  {config}: WRONG RESULTS (not timed)", flush=True)
                    rows.append({"group": name, "config": config, "correct": False})
                    continue
                us = graphed_us(lambda: mv._launch(xs, weights, outs, codes, transposed, config))
                rows.append({"group": name, "config": list(config), "default": config == default, "correct": True,
                             "us": us, "gb_per_s": nbytes / us / 1e3, "fraction_of_roofline": roof_us / us,
                             "cublas_us": cublas, "vs_cublas": cublas / us, "bytes": nbytes})
                print(f"  {'default ' if config == default else ''}{config}: {us:7.2f} us  {nbytes / us / 1e3:7.0f} GB/s"
                      f"  {roof_us / us:5.1%} of roofline  {cublas / us:5.2f}x cuBLAS", flush=True)
    print("\n| group | default us | best config | best us | best GB/s | % of roofline | vs cuBLAS |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name in dict.fromkeys(r["group"] for r in rows):
        timed = [r for r in rows if r["group"] == name and r.get("correct")]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["us"])
        default = next((r for r in timed if r["default"]), None)
        print(f"| {name} | {default['us'] if default else float('nan'):.2f} | {tuple(best['config'])} | {best['us']:.2f} | "
              f"{best['gb_per_s']:.0f} | {best['fraction_of_roofline']:.1%} | {best['vs_cublas']:.2f}x |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "read_gb_per_s": bandwidth, "rows": rows}, indent=1))
    print(f"json: {args.json}")


if __name__ == "__main__":
    main()
