"""Profile token-by-token generation (`model.step`): where the time of one step goes.

Prints the top operators by self CPU time and by CUDA time, and counts host synchronisations
(`aten::item`, `aten::_local_scalar_dense`, cudaStreamSynchronize), which stall a GPU step.

    PYTHONPATH=. python bench/profile_step.py --device cuda --size 125m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.bench_generate import SIZES  # noqa: E402
from hierarchos.model import HierarchosLM  # noqa: E402


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=SIZES, default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = HierarchosLM(SIZES[args.size]()).to(device).eval()
    state = model.init_state(1, device=device)
    token = torch.zeros(1, dtype=torch.long, device=device)
    for _ in range(3):
        out = model.step(token, state)
        state = out.state
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            out = model.step(token, state)
            state = out.state
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    print(f"{args.size} on {device}: {per_step * 1e3:.1f} ms per step under the profiler")
    for name in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaLaunchKernel",
                 "aten::nonzero"):
        print(f"  {name}: {counts.get(name, 0) / args.steps:.1f} per step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
