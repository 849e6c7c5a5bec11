"""`puzzle generate`: write a Sudoku (or maze) train/test pair (train.safetensors, test.safetensors) into a directory.

Deterministic for a seed (whatever --workers), no download; the files follow the format in
`hierarchos.puzzles.dataset`. Wired into `hierarchos puzzle` by the puzzle command module.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import HierarchosError

HELP = "generate hard Sudoku puzzles (unique solutions, need search) or mazes as train/test puzzle files"
TRAIN_FILE = "train.safetensors"
TEST_FILE = "test.safetensors"


def _count(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _difficulty(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of guesses (0 or more), got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of guesses (0 or more), got {text!r}")
    return value


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "--out-dir", "--out_dir", dest="out", required=True, metavar="DIR",
                   help=f"directory to write {TRAIN_FILE} and {TEST_FILE} into (created; files replaced atomically)")
    p.add_argument("--train", type=_count(1, "a positive number of puzzles"), default=1000, metavar="N",
                   help="distinct training puzzles, ids 1..N (default 1000)")
    p.add_argument("--test", type=_count(1, "a positive number of puzzles"), default=1000, metavar="N",
                   help="distinct test puzzles, none equivalent to a training puzzle under the symmetries "
                        "(default 1000)")
    p.add_argument("--seed", type=_count(0, "a non-negative integer seed"), default=0, metavar="S",
                   help="the same seed gives the same files (default 0)")
    p.add_argument("--task", choices=("sudoku", "maze"), default="sudoku",
                   help="sudoku, or maze (n x n, unique shortest start-to-goal path) (default sudoku)")
    p.add_argument("--size", type=_count(1, "a grid side such as 9"), default=None, metavar="N",
                   help="Sudoku: 9 (9x9) or 4 (4x4, 2x2 boxes, tiny tests), default 9; maze: side 6..64, default 30")
    p.add_argument("--min-difficulty", "--min_difficulty", type=_difficulty, default=None, metavar="X",
                   help="Sudoku: keep puzzles whose solver effort (mean guesses with singles propagation) is at "
                        "least X, default 1 for 9x9 (the puzzle needs search), 0 for 4x4; maze: shortest path of "
                        "at least X steps, default 110 at 30x30 (scaled by area)")
    p.add_argument("--climb-steps", "--climb_steps", type=_count(0, "a number of steps (0 or more)"), default=None,
                   metavar="K", help="hill-climbing moves that harden each puzzle (keeping its solution); 0 = plain "
                                     "random minimal puzzles, more = harder and slower "
                                     "(default: 20 for 9x9, 0 for 4x4)")
    p.add_argument("--augment", type=_count(0, "a number of copies (0 or more)"), default=0, metavar="K",
                   help="also write K augmented copies of each training puzzle (same puzzle_id) (default 0)")
    p.add_argument("--workers", type=_count(1, "a positive number of processes"), default=1, metavar="N",
                   help="Sudoku generator processes; the output does not depend on it (default 1; mazes use one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _quartiles(difficulty: np.ndarray) -> str:
    q = np.percentile(difficulty, [25, 50, 75])
    return f"{q[0]:g}/{q[1]:g}/{q[2]:g} (max {difficulty.max():g})"


def run_generate(args: argparse.Namespace) -> int:
    from ..puzzles import maze, sudoku
    from ..puzzles.dataset import SIZES, save_puzzles

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise HierarchosError(f"{out}: exists and is not a directory; pass a directory to --out")
    task = getattr(args, "task", "sudoku")
    size = args.size if args.size is not None else (9 if task == "sudoku" else 30)
    if task == "sudoku" and size not in SIZES:
        raise HierarchosError(f"--size {size}: Sudoku comes as 9 (9x9) or 4 (4x4); pass --size 9 or --size 4")
    if task == "maze" and not maze.MIN_SIZE <= size <= maze.MAX_SIZE:
        raise HierarchosError(f"--size {size}: mazes are {maze.MIN_SIZE}..{maze.MAX_SIZE} cells a side; "
                              "pass e.g. --size 30")
    started = time.perf_counter()
    if task == "maze":
        train, test = maze.make_splits(args.train, args.test, size=size, seed=args.seed,
                                       min_difficulty=args.min_difficulty, progress=not args.no_progress)
    else:
        train, test = sudoku.make_splits(args.train, args.test, size=size, seed=args.seed,
                                         min_difficulty=args.min_difficulty, workers=args.workers,
                                         progress=not args.no_progress, climb_steps=args.climb_steps)
    elapsed = time.perf_counter() - started
    rate = (len(train) + len(test)) / max(elapsed, 1e-9)
    meta = {"generation_seconds": round(elapsed, 3), "workers": args.workers}
    train.meta.update(meta)
    test.meta.update(meta)
    expand = maze.expand_with_augmentations if task == "maze" else sudoku.expand_with_augmentations
    written = expand(train, args.augment, args.seed) if args.augment else train
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HierarchosError(f"{out}: cannot create the output directory ({exc.strerror}); "
                              "choose another --out") from None
    save_puzzles(out / TEST_FILE, test)
    save_puzzles(out / TRAIN_FILE, written)
    rows = f" ({len(written)} rows with {args.augment} augmented copies each)" if args.augment else ""
    unit = "path steps" if task == "maze" else "guesses"
    print(f"wrote {out}: {len(train)} train{rows} + {len(test)} test {size}x{size} {task} puzzles, "
          f"difficulty quartiles ({unit}) train {_quartiles(train.difficulty)}, test {_quartiles(test.difficulty)}; "
          f"{elapsed:.1f}s ({rate:.1f} puzzles/s, {args.workers} worker{'s' if args.workers > 1 else ''})",
          file=sys.stdout)
    return 0
