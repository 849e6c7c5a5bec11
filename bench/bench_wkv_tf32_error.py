"""How far the chunk-parallel WKV-7 backward's TF32 error goes at long lengths, on the CPU.

Runs `wkv7_chunk_grad` (forward, all seven gradients) under Triton's interpreter with every `tl.dot` whose
input precision is TF32 fed inputs rounded to TF32's 10 mantissa bits (truncated: the pessimistic rounding,
or to nearest even), against autograd of the float64 token scan, with the scans across chunks in float32
and in TF32 side by side. The question it answers: does one chunk's TF32 rounding compound from chunk to
chunk over a long sequence (it would show as an error growing with T), with the model's decays and with a
share of the key channels decaying 1000x slower (`bench_wkv.make_case(slow=...)`: long memory)?

Emulation, not the device: the interpreter's products accumulate in float32 as tensor cores do, but the
device's own rounding of TF32 inputs and its summation order differ. `bench_wkv.py --sweep chunk-grad
--scan-lens ...` measures the same on a GPU. Minutes a length (the float64 scan loops over tokens):

    python bench/bench_wkv_tf32_error.py --lens 1024 4096 16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_wkv import NAMES, fwd_bwd, make_case, rel  # noqa: E402
from hierarchos.ops import wkv as wkv_ops  # noqa: E402
from hierarchos.ops.wkv_chunk_grad_triton import wkv7_chunk_grad  # noqa: E402


def round_to_tf32(x: np.ndarray, rounding: str) -> np.ndarray:
    """float32 values kept to TF32's 10 mantissa bits: truncated, or rounded to nearest even."""
    if x.dtype != np.float32:
        return x
    bits = x.view(np.uint32).astype(np.uint64)
    if rounding == "nearest":
        bits = bits + 0x0FFF + ((bits >> 13) & 1)
    return (bits & 0xFFFFE000).astype(np.uint32).view(np.float32)


def emulate_tf32_dots(rounding: str) -> None:
    """Make the interpreter round the inputs of every TF32 `tl.dot` (it computes them in float32)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if str(input_precision).rsplit(".", 1)[-1].upper() == "TF32":
            a = interpreter.TensorHandle(round_to_tf32(a.data, rounding), a.dtype.scalar)
            b = interpreter.TensorHandle(round_to_tf32(b.data, rounding), b.dtype.scalar)
        return plain(self, a, b, d, input_precision, max_num_imprecise_acc)
    builder.create_dot = create_dot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--rounding", choices=["truncate", "nearest"], default="truncate")
    ap.add_argument("--slow", type=float, default=0.25, help="share of key channels decaying 1000x slower")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args()
    emulate_tf32_dots(args.rounding)
    rows = []
    print(f"| T | scans | worst | o | state | dr | dlog_w | dk | dv | da | db | dstate0 | s |\n|{'---|' * 13}")
    for T in args.lens:
        case = make_case(args.batch, T, args.heads, 64, args.seed, "cpu", slow=args.slow)
        start = time.perf_counter()
        ref = fwd_bwd(wkv_ops.wkv7_reference, *case, torch.float64)
        for scan in ("ieee", "tf32"):
            def run(*x, state, scan=scan):
                return wkv7_chunk_grad(*x, state=state, precision="tf32", scan_precision=scan, forward="chunk")
            got = fwd_bwd(run, *case, torch.float32, True)
            errs = {"o": rel(got[0], ref[0]), "state": rel(got[1], ref[1])}
            errs.update({f"d{n}": rel(g, w) for n, g, w in zip((*NAMES, "state0"), got[2], ref[2])})
            rows.append(dict(T=T, scans=scan, worst=max(errs.values()), errors=errs,
                             seconds=time.perf_counter() - start))
            print(f"| {T} | {scan} | {rows[-1]['worst']:.2e} | " + " | ".join(f"{e:.1e}" for e in errs.values())
                  + f" | {rows[-1]['seconds']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(argv=sys.argv, torch=torch.__version__, rounding=args.rounding, slow=args.slow,
                           batch=args.batch, heads=args.heads, seed=args.seed, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
