"""ROSA hints on the training loop's critical path: computed in line (before each window) against one
window ahead on a worker thread (hierarchos/train/rosa_ahead.py), for the pure-Python and the C++
automaton.

The trainer's windows are B streams x T tokens; each stream's automaton rebuilds every `rosa_window`
tokens once it holds twice that many, so every (rosa_window / T)-th window pays a rebuild: the
periodic slow window that the `stall` suite of bench/gpu.sh found on the GPU (every 8th window of
`train` at B=32, T=512, window 4,096, at ~1/3 of the median rate). Here the device's step is stood in
for by a sleep of --step-ms (a CUDA wait releases the GIL the same way); "wait" is the time the loop
spends in getting a window's hints, i.e. what the hints add to the step. The tokens are this
repository's own text as bytes.

    PYTHONPATH=. python bench/bench_rosa_hints.py --batch 32 --seq-len 512 --rosa-window 4096 --windows 24 \\
        --step-ms 100 --json bench/results/rosa_hints.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hierarchos.model import rosa as rosa_mod  # noqa: E402
from hierarchos.train.batches import TokenStreams  # noqa: E402
from hierarchos.train.rosa_ahead import WindowHints  # noqa: E402
from hierarchos.train.trainer import HINTS_AHEAD  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def corpus_streams(batch: int, seq_len: int, windows: int) -> TokenStreams:
    """B streams of windows x T (+1) byte tokens from the repository's .py and .md files, repeated."""
    text = b"".join(p.read_bytes() for p in sorted(ROOT.rglob("*.py")) + sorted(ROOT.glob("*.md"))
                    if ".git" not in p.parts)
    need = batch * (windows * seq_len + 1)
    data = np.frombuffer(text * (need // len(text) + 1), dtype=np.uint8)[:need].astype(np.int64)
    return TokenStreams(torch.from_numpy(data.reshape(batch, -1)), chunk=seq_len)


def run(backend: str, mode: str, streams: TokenStreams, window: int, step_s: float) -> dict:
    os.environ["HIERARCHOS_ROSA"] = backend
    hints = WindowHints(streams, window, 256, carry=True)
    waits, n = [], len(streams)
    try:
        for i in range(n):
            upcoming = [(0, j) for j in range(i + 1, min(i + 1 + HINTS_AHEAD, n))] if mode == "ahead" else []
            start = time.perf_counter()
            hints.get(0, i, upcoming)
            waits.append(time.perf_counter() - start)
            time.sleep(step_s)  # the device's step: the GIL is free, as in a CUDA wait
    finally:
        hints.close()
        os.environ.pop("HIERARCHOS_ROSA", None)
    steady = waits[1:]  # the first window has nothing ahead of it in either mode
    return {"backend": backend, "mode": mode, "windows": n, "mean_wait_ms": 1e3 * statistics.mean(steady),
            "median_wait_ms": 1e3 * statistics.median(steady), "max_wait_ms": 1e3 * max(steady),
            "loop_s": sum(waits) + n * step_s, "ideal_loop_s": n * step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rosa-window", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--step-ms", type=float, default=100.0, help="the device's time per window (a sleep)")
    ap.add_argument("--backends", nargs="+", default=["python", "cpp"], choices=("python", "cpp"))
    ap.add_argument("--json", default="bench/results/rosa_hints.json")
    args = ap.parse_args()
    if "cpp" in args.backends and rosa_mod._kernels is None:
        raise SystemExit("bench_rosa_hints: the C++ kernel is not built (python kernels/build.py), "
                         "or pass --backends python")
    streams = corpus_streams(args.batch, args.seq_len, args.windows)
    rows = [run(b, m, streams, args.rosa_window, args.step_ms / 1e3)
            for b in args.backends for m in ("inline", "ahead")]
    print(f"ROSA hints, B={args.batch} T={args.seq_len} window={args.rosa_window}, {args.windows} windows, "
          f"device step {args.step_ms:g} ms (sleep); torch threads {torch.get_num_threads()}")
    print(f"| automaton | hints | mean wait ms | median ms | max ms | loop s | loop / ideal |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['mode']} | {r['mean_wait_ms']:.2f} | {r['median_wait_ms']:.2f} | "
              f"{r['max_wait_ms']:.2f} | {r['loop_s']:.2f} | {r['loop_s'] / r['ideal_loop_s']:.3f} |")
    out = {"args": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                           "cores": os.cpu_count(), "python": platform.python_version(),
                                           "torch": torch.__version__}, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
