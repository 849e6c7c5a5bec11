"""Vulkan backend benchmark, next to the CPU kernel in the same run: quantized matmul GB/s of
weight bytes per format, shape and batch, and batch-1 generation tokens/s of a quantized model
with its matmuls on Vulkan (what `chat --device vulkan` runs) against the same model on the
CPU kernel. Prints tables and writes JSON.

Matmul times are the best of a few rounds (bench_kernels.best_time) over several copies of
the weight, together larger than the last-level cache or a GPU's L2 (bench_kernels.Cycle):
cold weights. For Vulkan two numbers: the whole call as the model sees it (x copied in, one
submit, wait, y copied out) and the dispatch alone (device timestamps): the first is bound by
the submit round trip at these sizes, the second by the shader.

    python bench/bench_vulkan.py --json bench/records/vulkan_lavapipe.json
    python bench/bench_vulkan.py --shapes 4096x4096 --batches 1 --size small --new-tokens 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_generate import SIZES, interleaved_generation  # noqa: E402
from bench_kernels import COLD_BYTES, Cycle, best_time, machine_info  # noqa: E402
from hierarchos.model import HierarchosLM  # noqa: E402
from hierarchos.quant import kernel, vulkan  # noqa: E402

# 4096x4096, and the 125m model's projections and head (rows (out) x cols (in))
SHAPES = ["4096x4096", "768x768", "3072x768", "768x3072", "50257x768"]


def matmul_records(args) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        for qtype in args.formats:
            data = kernel.quantize(w, qtype)
            copies = max(2, -(-COLD_BYTES // data.nbytes))
            host = [data.copy() for _ in range(copies)]
            device = [vulkan.upload(data, qtype, cols) for _ in range(copies)]
            for n in args.batches:
                x = rng.standard_normal((n, cols)).astype(np.float32)
                cpu = best_time(Cycle(host, lambda d: kernel.matmul(d, qtype, cols, x)), args.repeats, args.min_time)
                dispatch = []

                def on_device(handle):
                    vulkan.vk_matmul(handle, x)
                    dispatch.append(vulkan.last_dispatch_seconds())

                call = best_time(Cycle(device, on_device), args.repeats, args.min_time)
                kernel_only = min(dispatch) if dispatch and not math.isnan(dispatch[0]) else float("nan")
                for backend, seconds in (("cpu", cpu), ("vulkan_call", call), ("vulkan_dispatch", kernel_only)):
                    records.append(dict(backend=backend, qtype=qtype, rows=rows, cols=cols, batch=n, seconds=seconds,
                                        weight_bytes=data.nbytes, weight_gb_per_s=data.nbytes / seconds / 1e9))
            del device
            print(f"  {shape} {qtype} done", file=sys.stderr, flush=True)
    return records


def generation(args) -> dict:
    """Batch-1 tokens/s of each format, CPU kernel vs Vulkan, timed in alternation."""
    from hierarchos.quant.model import build_quantized_model, place_on_vulkan, quantize_tensors

    torch.manual_seed(0)
    float_model = HierarchosLM(SIZES[args.size]()).eval()
    models, info = {}, {}
    for fmt in args.gen_formats:
        tensors = quantize_tensors(float_model, fmt)
        models[f"{fmt} cpu"] = build_quantized_model(float_model.cfg, tensors)
        on_vulkan = build_quantized_model(float_model.cfg, tensors)
        info[fmt] = {"uploaded_bytes": place_on_vulkan(on_vulkan, "bench_vulkan")}
        models[f"{fmt} vulkan"] = on_vulkan
    rates = interleaved_generation(models, args, torch.device("cpu"))
    return {"size": args.size, "params": float_model.num_parameters(), "formats": info, "tokens_per_s": rates}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(kernel.QTYPES), choices=kernel.QTYPES)
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxCOLS (out x in)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per point; the best is kept")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per round")
    parser.add_argument("--size", choices=SIZES, default="125m", help="model for the generation timing")
    parser.add_argument("--gen-formats", nargs="*", default=["Q4_0", "Q8_0"], choices=kernel.QTYPES,
                        help="formats timed in generation (none: skip it)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the raw records here")
    args = parser.parse_args(argv)
    status = vulkan.vulkan_status()
    if status or kernel.backend_name() != "cpp":
        print(f"bench_vulkan: needs the C++ kernel and a Vulkan device: {status or 'the C++ kernel is not built'}",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = vulkan.device_info()
    print(f"vulkan device: {device['name']} ({device['type']}, Vulkan {device['api_version']}); "
          f"CPU kernel: {kernel.get_isa()}, {kernel.get_threads()} threads", flush=True)
    records = matmul_records(args)
    print(f"\n{'format':6} {'shape':>10} {'N':>2} {'cpu us':>9} {'GB/s':>7} {'vk call us':>10} {'GB/s':>7} "
          f"{'vk dispatch us':>14} {'GB/s':>7}")
    keyed = {(r["backend"], r["qtype"], r["rows"], r["cols"], r["batch"]): r for r in records}
    for (backend, qtype, rows, cols, n), r in keyed.items():
        if backend != "cpu":
            continue
        call, dispatch = keyed[("vulkan_call", qtype, rows, cols, n)], keyed[("vulkan_dispatch", qtype, rows, cols, n)]
        print(f"{qtype:6} {rows:>5}x{cols:<4} {n:>2} {r['seconds'] * 1e6:9.1f} {r['weight_gb_per_s']:7.1f} "
              f"{call['seconds'] * 1e6:10.1f} {call['weight_gb_per_s']:7.1f} {dispatch['seconds'] * 1e6:14.1f} "
              f"{dispatch['weight_gb_per_s']:7.1f}")
    gen = generation(args) if args.gen_formats else {}
    if gen:
        print(f"\ngeneration, {args.size} ({gen['params']:,} parameters), batch 1, best of {args.rounds} alternating "
              f"rounds of {args.new_tokens} tokens:")
        print("| format | backend | tok/s |")
        print("|---|---|---:|")
        for name, rate in gen["tokens_per_s"].items():
            fmt, backend = name.split()
            print(f"| {fmt} | {backend} | {rate:.2f} |")
    result = {"machine": {**machine_info(), "vulkan": device, "kernel_threads": kernel.get_threads(),
                          "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                          "cpu_count": os.cpu_count()},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "matmul": records, "generation": gen, "wall_seconds": time.perf_counter() - started}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)  # atomic: a killed run leaves no half-written record
        print(f"\nwrote {args.json} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
