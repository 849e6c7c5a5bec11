"""Sudoku generator speed and difficulty (issue 21): puzzles/s and the difficulty distribution per setting.

For each setting (hill-climbing steps, minimum difficulty) it generates --count 9x9 puzzles with
`hierarchos.puzzles.sudoku.generate` on --workers processes and reports wall time, puzzles/s,
givens per puzzle and the difficulty percentiles (mean guesses over 8 symmetric copies, see
`orbit_difficulty`), next to two famous hard puzzles for scale. The first row, `raw`, is plain
random minimal puzzles with no filter: the share that singles alone finish is what the default
filter throws away. The machine is shared: the load average is recorded with the numbers.
A table on stdout, JSON to --out.

    python bench/bench_sudoku_generator.py --count 200 --workers 2 --out bench/records/sudoku_generator.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hierarchos.cli import script_entry  # noqa: E402
from hierarchos.io import atomic_write_text  # noqa: E402
from hierarchos.puzzles import sudoku  # noqa: E402

FAMOUS = {  # typed in by hand; tests/test_sudoku_data.py checks them against their known solutions
    "inkala_2012": "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4..",
    "ai_escargot": "1....7.9..3..2...8..96..5....53..9...1..8...26....4...3......1..4......7..7...3..",
}


def grid(text: str) -> np.ndarray:
    return np.array([0 if ch == "." else int(ch) for ch in text], dtype=np.uint8)


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers, once it is shut down):
    unlike wall time, it hardly depends on how many other jobs share the cores."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def setting(text: str) -> tuple[str, int, float]:
    """'NAME:CLIMB:MIN' e.g. 'default:20:1'."""
    name, climb, floor = text.split(":")
    return name, int(climb), float(floor)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="puzzles per setting (default 200)")
    parser.add_argument("--workers", type=int, default=2, help="generator processes (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", type=setting,
                        default=[("raw", 0, 0.0), ("need-search", 0, 1.0), ("climb-10", 10, 1.0),
                                 ("default (climb-20)", 20, 1.0), ("climb-40", 40, 1.0)],
                        help="NAME:CLIMB_STEPS:MIN_DIFFICULTY ...")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()

    famous = {name: sudoku.orbit_difficulty(grid(text)) for name, text in FAMOUS.items()}
    rows = []
    for name, climb, floor in args.settings:
        load_before = os.getloadavg()[0]
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        puzzles = sudoku.generate(args.count, size=9, seed=args.seed, min_difficulty=floor,
                                  climb_steps=climb, workers=args.workers, split="test")
        seconds = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_before
        difficulty = puzzles.difficulty.astype(np.float64)
        rows.append({
            "setting": name, "climb_steps": climb, "min_difficulty": floor, "count": len(puzzles),
            "seconds": round(seconds, 2), "puzzles_per_s": round(len(puzzles) / seconds, 2),
            "cpu_seconds_per_puzzle": round(cpu / len(puzzles), 4),
            "attempts_per_puzzle": round(puzzles.meta["attempts"] / len(puzzles), 2),
            "givens_mean": round(float((puzzles.inputs > 0).sum(1).mean()), 2),
            "need_search": round(float((difficulty > 0).mean()), 3),
            "difficulty_percentiles": {str(q): round(float(np.percentile(difficulty, q)), 2)
                                       for q in (10, 25, 50, 75, 90, 99)},
            "difficulty_mean": round(float(difficulty.mean()), 2),
            "difficulty_at_least": {str(t): round(float((difficulty >= t).mean()), 3) for t in (5, 10, 20, 50, 100)},
            "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        })
        r = rows[-1]
        print(f"{name:>20}: {r['puzzles_per_s']:7.2f} puzzles/s ({r['seconds']:.1f}s, load {r['load_average_after']}),"
              f" {r['cpu_seconds_per_puzzle']:.3f} CPU s/puzzle,"
              f" need search {r['need_search']:.0%}, difficulty p10/p25/p50/p75/p90 "
              f"{'/'.join(str(r['difficulty_percentiles'][q]) for q in ('10', '25', '50', '75', '90'))},"
              f" >=20: {r['difficulty_at_least']['20']:.0%}, givens {r['givens_mean']}", flush=True)
    print("famous puzzles, same measure: " + ", ".join(f"{k} {v:g}" for k, v in famous.items()))
    result = {"bench": "sudoku_generator", "workers": args.workers, "seed": args.seed, "cpus": os.cpu_count(),
              "python": platform.python_version(), "difficulty_unit": "mean guesses over 8 symmetric copies "
              "(naked + hidden singles propagation, MRV branching, search exhausted to prove uniqueness)",
              "famous": famous, "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    script_entry(main)
