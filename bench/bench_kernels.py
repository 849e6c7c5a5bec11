"""CPU kernel benchmark: quantized matmul (INT4 / Q4_0 / Q8_0 / Q2_K) per ISA, batch size,
shape and thread count, next to PyTorch's fp32 `F.linear` and this machine's measured memory
read bandwidth. Reports GB/s of weight bytes streamed and GFLOP/s (2 * rows * cols * batch).

Weights are cold: each call reads the next of several copies of the matrix, together several
times larger than the last-level cache, so batch-1 numbers compare with DRAM bandwidth. The
bandwidth is the best of a few multithreaded streaming reads of a 512 MiB buffer
(`hierarchos_kernels.stream_read`). Times are the best of a few repeats (robust to a busy
machine). Default run: a few minutes on 2 cores; flags subset it.

    python bench/bench_kernels.py --json bench/records/kernels_cpu.json
    python bench/bench_kernels.py --formats Q4_0 Q8_0 --shapes 4096x4096 --batches 1 --threads 2

Side by side with ggml (`--ggml-bin PATH/test-backend-ops`, built from ggml's own sources outside
this repository): for each format ggml has (Q4_0, Q8_0, Q2_K) and each batch in --ggml-batches,
ggml's `test-backend-ops perf -o MUL_MAT -b CPU -p REGEX` (its 4096 x 14336 MUL_MAT case, f32
activations, as many threads as the machine has cores) and our matmul on the same shape and thread
count are timed in alternation, `--ggml-rounds` times, best kept for each, so both see the same
load. Our side reuses one weight buffer as ggml's perf mode does (warm, not the cold copies above).
test-backend-ops reports the mean over its runs and always uses every core; bench/ggml_matvec.cpp
(our own driver of ggml's public API, built against the same ggml checkout) reports the best single
run at `--ggml-threads`; ours is compared in the statistic each binary reports.

    python bench/bench_kernels.py --ggml-bin /tmp/ggml/build/bin/test-backend-ops --ggml-only \
        --json bench/records/kernels_vs_ggml.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hierarchos.quant import kernel  # noqa: E402

SHAPES = ["768x768", "768x3072", "3072x768", "2048x2048", "4096x4096"]  # rows (out) x cols (in)
COLD_BYTES = 160 << 20  # copies of a weight matrix cycled through: several times a 32 MiB L3


def best_time(fn, repeats: int, min_seconds: float) -> float:
    """Best per-call time over `repeats` rounds; each round calls fn until min_seconds pass."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def memory_bandwidth(threads: int, repeats: int = 5) -> float:
    buffer = np.ones(512 << 20, dtype=np.uint8)
    kernel.stream_read(buffer, threads)
    best = min(_timed(lambda: kernel.stream_read(buffer, threads)) for _ in range(repeats))
    return buffer.nbytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Cycle:
    """Calls fn on the next of `items` each time: cold weights."""

    def __init__(self, items, fn):
        self.items, self.fn, self.index = items, fn, 0

    def __call__(self):
        self.fn(self.items[self.index])
        self.index = (self.index + 1) % len(self.items)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "backend": kernel.backend_name(),
            "isas": kernel.available_isas(), "cpu_features": kernel.cpu_features(),
            "logical_cpus": os.cpu_count()}


def run(args) -> dict:
    rng = np.random.default_rng(0)
    isas = args.isas or kernel.available_isas()
    records, bandwidth = [], {}
    for threads in args.threads:
        bandwidth[threads] = memory_bandwidth(threads)
        print(f"memory read bandwidth, {threads} thread(s): {bandwidth[threads]:.1f} GB/s", flush=True)
    for shape in args.shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        xs = {n: rng.standard_normal((n, cols)).astype(np.float32) for n in args.batches}
        # PyTorch fp32 reference, cold weights as well
        w_t = torch.from_numpy(w)
        torch_copies = [w_t.clone() for _ in range(max(2, -(-COLD_BYTES // w_t.nbytes)))]
        for threads in args.threads:
            torch.set_num_threads(threads)
            for n in args.batches:
                x_t = torch.from_numpy(xs[n])
                with torch.no_grad():
                    seconds = best_time(Cycle(torch_copies, lambda m: torch.nn.functional.linear(x_t, m)),
                                        args.repeats, args.min_time)
                records.append(dict(kind="torch_fp32", qtype="F32", isa="torch", rows=rows, cols=cols, batch=n,
                                    threads=threads, seconds=seconds, weight_bytes=w_t.nbytes))
        for qtype in args.formats:
            data = kernel.quantize(w, qtype)
            copies = [data.copy() for _ in range(max(2, -(-COLD_BYTES // data.nbytes)))]
            for isa in isas:
                kernel.set_isa(isa)
                for threads in args.threads:
                    kernel.set_threads(threads)
                    for n in args.batches:
                        x = xs[n]
                        seconds = best_time(Cycle(copies, lambda d: kernel.matmul(d, qtype, cols, x)),
                                            args.repeats if isa != "scalar" else 1, args.min_time)
                        records.append(dict(kind="kernel", qtype=qtype, isa=isa, rows=rows, cols=cols, batch=n,
                                            threads=threads, seconds=seconds, weight_bytes=data.nbytes))
                print(f"  {shape} {qtype} {isa} done", file=sys.stderr, flush=True)
    for record in records:
        record["weight_gb_per_s"] = record["weight_bytes"] / record["seconds"] / 1e9
        record["gflop_per_s"] = 2 * record["rows"] * record["cols"] * record["batch"] / record["seconds"] / 1e9
        record["bandwidth_fraction"] = record["weight_gb_per_s"] / bandwidth[record["threads"]]
    kernel.set_isa(kernel.available_isas()[-1])
    kernel.set_threads(0)
    return {"machine": machine_info(), "memory_read_gb_per_s": {str(k): v for k, v in bandwidth.items()},
            "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "records": records}


GGML_TYPES = {"Q4_0": "q4_0", "Q8_0": "q8_0", "Q2_K": "q2_K"}  # ours -> ggml's type names (INT4 is ours only)
GGML_SHAPE = (4096, 14336)  # the (m = rows, k = cols) of test-backend-ops' MUL_MAT perf cases
GGML_LINE = re.compile(r"MUL_MAT\(type_a=(\w+),type_b=f32,m=(\d+),n=(\d+),k=(\d+),[^)]*\):\s+(\d+) runs -\s+([\d.]+) us/run")


def ggml_time(binary: Path, qtype: str, batch: int, threads: int) -> tuple[float, bool]:
    """ggml's seconds per MUL_MAT for one case from one run of `binary`, and whether that is the best
    single run (bench/ggml_matvec.cpp) rather than test-backend-ops' mean over its runs."""
    rows, cols = GGML_SHAPE
    pattern = f"type_a={GGML_TYPES[qtype]},type_b=f32,m={rows},n={batch},k={cols},"
    done = subprocess.run([str(binary), "perf", "-o", "MUL_MAT", "-b", "CPU", "-p", re.escape(pattern)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HK_GGML_THREADS": str(threads)})
    for line in done.stdout.splitlines():
        found = GGML_LINE.search(line)
        if found and found.group(1) == GGML_TYPES[qtype] and int(found.group(3)) == batch:
            return float(found.group(6)) * 1e-6, "(best" in line
    raise SystemExit(f"bench_kernels: no MUL_MAT {pattern} line in {binary}'s output (rc {done.returncode}):\n"
                     f"{done.stdout[-2000:]}{done.stderr[-2000:]}")


def time_ours(fn, min_seconds: float) -> tuple[float, float]:
    """(best single call, mean per call) over calls for at least min_seconds."""
    fn()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while True:
        begin = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - begin)
        calls += 1
        if time.perf_counter() - start >= min_seconds:
            return best, (time.perf_counter() - start) / calls


def ggml_version(binary: Path) -> dict:
    """The ggml commit: from a GGML_COMMIT file (the hash, written beside sources unpacked with
    `git archive`) or a git checkout above the binary."""
    info = {"binary": str(binary)}
    for parent in binary.resolve().parents:
        if (parent / "GGML_COMMIT").exists():
            info["commit"] = (parent / "GGML_COMMIT").read_text().strip()
            break
        if (parent / ".git").exists():
            info["commit"] = subprocess.run(["git", "-C", str(parent), "rev-parse", "HEAD"], capture_output=True,
                                            text=True).stdout.strip()
            break
    return info


def run_ggml(args) -> dict:
    """Ours vs each ggml binary, interleaved per round; the best of `--ggml-rounds` for each side.
    The ratio is against the fastest ggml binary (e.g. its OpenMP and its own-threadpool builds)."""
    rows, cols = GGML_SHAPE
    threads = args.ggml_threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    kernel.set_threads(threads)
    records = []
    for qtype in [q for q in args.formats if q in GGML_TYPES]:
        data = kernel.quantize(w, qtype)
        for n in args.ggml_batches:
            x = rng.standard_normal((n, cols)).astype(np.float32)
            ours = {"best": float("inf"), "mean": float("inf")}
            theirs = {str(b): float("inf") for b in args.ggml_bin}
            statistic = {}
            for _ in range(args.ggml_rounds):
                for binary in args.ggml_bin:
                    seconds, is_best = ggml_time(binary, qtype, n, threads)
                    theirs[str(binary)] = min(theirs[str(binary)], seconds)
                    statistic[str(binary)] = "best" if is_best else "mean"
                best, mean = time_ours(lambda: kernel.matmul(data, qtype, cols, x), args.ggml_min_time)
                ours = {"best": min(ours["best"], best), "mean": min(ours["mean"], mean)}
            # each binary against ours in the statistic it reports (best single run, or mean of its runs)
            speedups = {b: theirs[b] / ours[statistic[b]] for b in theirs}
            records.append(dict(qtype=qtype, rows=rows, cols=cols, batch=n, threads=threads, isa=kernel.get_isa(),
                                ours_best_seconds=ours["best"], ours_mean_seconds=ours["mean"],
                                ggml_seconds_per_binary=theirs, ggml_statistic=statistic,
                                speedup_per_binary=speedups, speedup=min(speedups.values()),
                                weight_bytes=data.nbytes))
            print(f"  {qtype} N={n}: ours best {ours['best'] * 1e6:8.1f} / mean {ours['mean'] * 1e6:8.1f} us, ggml " +
                  ", ".join(f"{t * 1e6:8.1f} ({statistic[b]})" for b, t in theirs.items()) +
                  f" us, {min(speedups.values()):.2f}x", file=sys.stderr, flush=True)
    kernel.set_threads(0)
    return {"ggml": [ggml_version(b) for b in args.ggml_bin], "rounds": args.ggml_rounds, "threads": threads,
            "load_average_end": os.getloadavg(), "records": records}


def print_ggml_table(result: dict) -> None:
    commits = sorted({g.get("commit", "commit unknown") for g in result["ggml"]})
    binaries = [g["binary"] for g in result["ggml"]]
    print(f"\nside by side with ggml ({', '.join(commits)}), same run, {result['threads']} thread(s), best of "
          f"{result['rounds']} alternating rounds, warm weights; ggml binaries: "
          + ", ".join(f"({i + 1}) {b}" for i, b in enumerate(binaries)))
    print("| format | rows x cols | N | thr | ours µs best / mean | " +
          " | ".join(f"ggml ({i + 1}) µs" for i in range(len(binaries))) + " | ours vs ggml, worst of the binaries |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(binaries) + "---:|")
    for r in result["records"]:
        per = " | ".join(f"{r['ggml_seconds_per_binary'][b] * 1e6:,.0f} ({r['ggml_statistic'][b]})" for b in binaries)
        print(f"| {r['qtype']} | {r['rows']}x{r['cols']} | {r['batch']} | {r['threads']} | "
              f"{r['ours_best_seconds'] * 1e6:,.0f} / {r['ours_mean_seconds'] * 1e6:,.0f} | {per} | {r['speedup']:.2f}x |")
    load = result["load_average_end"]
    print(f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def print_table(result: dict) -> None:
    records = result["records"]
    torch_time = {(r["rows"], r["cols"], r["batch"], r["threads"]): r["seconds"]
                  for r in records if r["kind"] == "torch_fp32"}
    print(f"\n{'format':6} {'isa':13} {'thr':>3} {'shape':>9} {'N':>3} {'us/call':>9} {'GB/s':>6} {'%bw':>5} "
          f"{'GFLOP/s':>8} {'torch us':>9} {'vs torch':>8}")
    for r in records:
        key = (r["rows"], r["cols"], r["batch"], r["threads"])
        speedup = torch_time[key] / r["seconds"]
        print(f"{r['qtype']:6} {r['isa']:13} {r['threads']:>3} {r['rows']}x{r['cols']:<4} {r['batch']:>3} "
              f"{r['seconds'] * 1e6:9.1f} {r['weight_gb_per_s']:6.1f} {100 * r['bandwidth_fraction']:5.0f} "
              f"{r['gflop_per_s']:8.1f} {torch_time[key] * 1e6:9.1f} {speedup:7.2f}x")
    target = [r for r in records if r["kind"] == "kernel" and r["qtype"] in ("Q4_0", "Q8_0") and r["batch"] == 1
              and r["threads"] == 2 and (r["rows"], r["cols"]) == (4096, 4096)]
    if target:
        print("\ntarget (issue 5): batch-1 matvec >= 80% of measured bandwidth, Q4_0 and Q8_0 at 4096x4096, 2 threads:")
        for r in target:
            print(f"  {r['qtype']} {r['isa']:13} {100 * r['bandwidth_fraction']:.0f}%")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(kernel.QTYPES), choices=kernel.QTYPES)
    parser.add_argument("--isas", nargs="+", default=None, help="default: every ISA this CPU runs")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxCOLS (out x in)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="rounds per point; the best is kept")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per round")
    parser.add_argument("--json", type=Path, default=None, help="write the raw records here")
    parser.add_argument("--ggml-bin", type=Path, nargs="+", default=None,
                        help="ggml's test-backend-ops binary (or several builds of it): also time ggml's MUL_MAT "
                             "next to ours (see above)")
    parser.add_argument("--ggml-only", action="store_true", help="with --ggml-bin: skip the per-ISA sweep")
    parser.add_argument("--ggml-batches", nargs="+", type=int, default=[1],
                        help="batch sizes for the ggml comparison (ggml's perf cases: 1 2 3 4 5 8 512)")
    parser.add_argument("--ggml-threads", type=int, default=0,
                        help="threads on both sides (default: every core, as test-backend-ops always uses; other "
                             "counts need bench/ggml_matvec.cpp, which honours it)")
    parser.add_argument("--ggml-rounds", type=int, default=5, help="alternating rounds; the best of each side is kept")
    parser.add_argument("--ggml-min-time", type=float, default=1.0,
                        help="seconds per round on our side (ggml's perf runs about a second per case)")
    args = parser.parse_args(argv)
    for binary in args.ggml_bin or []:
        if not binary.is_file():
            parser.error(f"--ggml-bin {binary}: no such file (build ggml's test-backend-ops first)")
    if args.ggml_threads and args.ggml_threads != os.cpu_count() and any(
            b.name.startswith("test-backend-ops") for b in args.ggml_bin or []):
        parser.error("test-backend-ops always runs on every core: --ggml-threads other than that needs "
                     "bench/ggml_matvec.cpp")
    if args.ggml_only and args.ggml_bin is None:
        parser.error("--ggml-only needs --ggml-bin")
    if kernel.backend_name() != "cpp":
        print("bench_kernels: the C++ kernel is not built (bash setup.sh); refusing to time the numpy reference",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = {"machine": machine_info()} if args.ggml_only else run(args)
    if args.ggml_bin is not None:
        result["vs_ggml"] = run_ggml(args)
    result["wall_seconds"] = time.perf_counter() - started
    if not args.ggml_only:
        print_table(result)
    if "vs_ggml" in result:
        print_ggml_table(result["vs_ggml"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"\nwrote {args.json} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
