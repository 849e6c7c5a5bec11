"""Puzzle dataset files: one safetensors file per split, metadata JSON in its header, written atomically.

Puzzle dataset format (format_version 1)
----------------------------------------
A split (e.g. ``train.safetensors``, ``test.safetensors``) is a single safetensors file
holding exactly four tensors, all with the same first dimension N (N >= 1), C = n*n cells:

==============  ===========  =======  ===============================================
name            shape        dtype    meaning
==============  ===========  =======  ===============================================
``inputs``      (N, C)       uint8    the puzzle, row-major cells: 0 = blank, 1..n = given digit
``solutions``   (N, C)       uint8    its unique solution, 1..n; agrees with every given of ``inputs``
``puzzle_ids``  (N,)         int32    base puzzle identifier: 1..P for training puzzles (augmented
                                      copies keep their base puzzle's id), 0 = "no identifier"
                                      (test sets use 0: a model may not learn a test puzzle's id)
``difficulty``  (N,)         float32  the solver's search effort on that puzzle (guesses needed to
                                      solve it and prove the solution unique with naked + hidden
                                      singles propagation; 0 = propagation alone solves it),
                                      see ``hierarchos.puzzles.sudoku.solve``
==============  ===========  =======  ===============================================

The header's ``__metadata__`` has one key, ``hierarchos_puzzles``, whose value is a JSON
object with at least ``{"task": "sudoku", "size": n, "split": "train"|"test",
"seed": int, "format_version": 1}`` (n = 9 or 4), plus whatever the writer adds
(``min_difficulty``, ``climb_steps``, ``augment``, ``base_puzzles``, ``generator``, ...).

Mazes (``"task": "maze"``, n = 6..64, 30 for Maze-Hard) use the same four tensors with cell
tokens instead of digits: inputs 0 = open, 1 = wall, 2 = start, 3 = goal; solutions are the
inputs with the cells of the unique shortest start-to-goal path (start and goal excluded)
set to 4; difficulty = that path's length in steps; the metadata adds
``"tokens": {"open": 0, "wall": 1, "start": 2, "goal": 3, "path": 4}``.

A file is written to a temp file beside its final path and renamed into place, so a reader
sees the previous file or the new one, never a partial one. ``load_puzzles`` checks the
header, names, dtypes, shapes, value ranges, that every solution is a valid grid and that
it agrees with its puzzle's givens (mazes: that it marks the unique shortest path; Sudoku
uniqueness is proved when generating, not re-proved on load); any problem is one ``HierarchosError`` line naming the
file and the fix. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HierarchosError

FORMAT_VERSION = 1
META_KEY = "hierarchos_puzzles"
SIZES = (4, 9)  # Sudoku sides
TASKS = ("sudoku", "maze")
MAZE_SIZES = (6, 64)  # smallest and largest maze side (hierarchos.puzzles.maze.MIN_SIZE, MAX_SIZE)
SPLITS = ("train", "test")
# tensor name -> (dtype, rank)
TENSORS = {
    "inputs": (np.uint8, 2),
    "solutions": (np.uint8, 2),
    "puzzle_ids": (np.int32, 1),
    "difficulty": (np.float32, 1),
}
REGENERATE = "regenerate it with `hierarchos puzzle generate`"


@dataclass
class PuzzleSet:
    """N puzzles of one size with their unique solutions, base-puzzle ids and difficulty."""

    inputs: np.ndarray      # (N, n*n) uint8, 0 = blank, 1..n = given
    solutions: np.ndarray   # (N, n*n) uint8, 1..n
    puzzle_ids: np.ndarray  # (N,) int32, 1..P for training puzzles, 0 = no identifier
    difficulty: np.ndarray  # (N,) float32, solver guesses (0 = singles alone solve it)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def size(self) -> int:
        """n: the side of the grid (9 for 9x9 Sudoku, 4 for 4x4)."""
        return int(round(self.inputs.shape[1] ** 0.5))

    @property
    def task(self) -> str:
        """'sudoku' or 'maze' (the metadata's task)."""
        return str(self.meta.get("task", "sudoku"))

    @property
    def num_tokens(self) -> int:
        """Distinct cell values a model reads or writes: 0..n for Sudoku (0 = blank, inputs only),
        0..4 for mazes (open, wall, start, goal, path)."""
        return 5 if self.task == "maze" else self.size + 1

    @property
    def num_puzzle_ids(self) -> int:
        """P: the largest puzzle id (the number of rows a per-puzzle embedding table needs, plus row 0)."""
        return int(self.puzzle_ids.max()) if len(self) else 0


def grids_valid(grids: np.ndarray, size: int) -> np.ndarray:
    """(N,) bool: each row of `grids` (N, n*n) is a complete, valid Sudoku solution."""
    box = int(round(size ** 0.5))
    g = np.asarray(grids).reshape(-1, size, size).astype(np.int64)
    if g.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    ok = (g >= 1).all(axis=(1, 2)) & (g <= size).all(axis=(1, 2))
    target = (1 << (size + 1)) - 2  # bits 1..n set
    bits = np.left_shift(1, np.clip(g, 0, size))  # (N, n, n)
    boxes = g.reshape(-1, box, box, box, box).transpose(0, 1, 3, 2, 4).reshape(-1, size, size)
    box_bits = np.left_shift(1, np.clip(boxes, 0, size))
    for units in (bits, bits.transpose(0, 2, 1), box_bits):
        # each unit a permutation of 1..n <=> its n bits OR to all n and there are n cells
        ok &= (np.bitwise_or.reduce(units, axis=2) == target).all(axis=1)
    return ok


def validate(puzzles: PuzzleSet, where: str) -> None:
    """Raise a one-line HierarchosError (prefixed with `where`) unless `puzzles` is well formed."""
    def fail(what: str) -> None:
        raise HierarchosError(f"{where}: {what}; {REGENERATE}")

    for name, (dtype, rank) in TENSORS.items():
        array = getattr(puzzles, name)
        if not isinstance(array, np.ndarray):
            fail(f"'{name}' is {type(array).__name__}, expected a numpy array")
        if array.dtype != dtype or array.ndim != rank:
            fail(f"'{name}' is {array.dtype} with shape {array.shape}, expected {np.dtype(dtype)} of rank {rank}")
    count, cells = puzzles.inputs.shape
    if count < 1:
        fail("holds no puzzles")
    meta = puzzles.meta
    if not isinstance(meta, dict):
        fail("metadata is not a JSON object")
    task = meta.get("task")
    if task not in TASKS:
        fail(f"task is {task!r}, expected one of {', '.join(TASKS)}")
    size = int(round(cells ** 0.5))
    sizes = SIZES if task == "sudoku" else range(MAZE_SIZES[0], MAZE_SIZES[1] + 1)
    if size not in sizes or size * size != cells:
        fail(f"'inputs' has {cells} cells per puzzle, expected " + (
            "81 (9x9) or 16 (4x4)" if task == "sudoku" else f"n*n with n in {MAZE_SIZES[0]}..{MAZE_SIZES[1]}"))
    for name in ("solutions", "puzzle_ids", "difficulty"):
        array = getattr(puzzles, name)
        expected = (count, cells) if name == "solutions" else (count,)
        if array.shape != expected:
            fail(f"'{name}' has shape {array.shape}, expected {expected} to match 'inputs' {puzzles.inputs.shape}")
    if meta.get("format_version") != FORMAT_VERSION:
        fail(f"format_version is {meta.get('format_version')!r}, this hierarchos reads {FORMAT_VERSION}")
    if meta.get("size") != size:
        fail(f"metadata says size {meta.get('size')!r} but the grids are {size}x{size}")
    if meta.get("split") not in SPLITS:
        fail(f"split is {meta.get('split')!r}, expected one of {', '.join(SPLITS)}")
    if (puzzles.puzzle_ids < 0).any():
        fail("'puzzle_ids' holds a negative id")
    if not np.isfinite(puzzles.difficulty).all() or (puzzles.difficulty < 0).any():
        fail("'difficulty' holds a negative or non-finite value")
    if task == "maze":
        from .maze import check  # imported here: maze imports this module

        check(puzzles.inputs, puzzles.solutions, where, REGENERATE)
        return
    if int(puzzles.inputs.max()) > size:
        fail(f"'inputs' holds a digit above {size}")
    valid = grids_valid(puzzles.solutions, size)
    if not valid.all():
        fail(f"solution of puzzle {int(np.argmin(valid))} is not a valid {size}x{size} Sudoku grid")
    givens = puzzles.inputs > 0
    disagree = (givens & (puzzles.inputs != puzzles.solutions)).any(axis=1)
    if disagree.any():
        fail(f"puzzle {int(np.argmax(disagree))} has a given that differs from its solution")


def augmenter(task: str):
    """The task's `augment(inputs, solutions, rng)`: Sudoku symmetries, or maze rotations/reflections."""
    if task == "maze":
        from .maze import augment
    elif task == "sudoku":
        from .sudoku import augment
    else:
        raise HierarchosError(f"no augmentation for task {task!r}; tasks: {', '.join(TASKS)}")
    return augment


def save_puzzles(path: str | os.PathLike, puzzles: PuzzleSet) -> None:
    """Write `puzzles` as one safetensors file at `path`, atomically (temp file + rename)."""
    from safetensors.numpy import save

    from ..io import atomic_write_bytes  # imported here: hierarchos.io loads torch, the generator need not

    validate(puzzles, str(path))
    tensors = {name: np.ascontiguousarray(getattr(puzzles, name)) for name in TENSORS}
    data = save(tensors, metadata={META_KEY: json.dumps(puzzles.meta, sort_keys=True)})
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:  # read-only or full disk, a directory in the way: one line, old file kept
        raise HierarchosError(f"{path}: cannot write the puzzle file ({exc.strerror or exc}); "
                              "free space or choose another directory") from None


def load_puzzles(path: str | os.PathLike) -> PuzzleSet:
    """Read and validate a puzzle file; any problem is one HierarchosError line naming the path."""
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        hint = "it is a directory, pass train.safetensors or test.safetensors inside it" if file.is_dir() else (
            "generate one with `hierarchos puzzle generate --out DIR`")
        raise HierarchosError(f"{file}: puzzle file not found ({hint})")
    try:
        with safe_open(str(file), framework="np") as handle:
            names = set(handle.keys())
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in names & set(TENSORS)}
    except Exception as exc:  # safetensors raises its own error types for bad headers and sizes
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HierarchosError(f"{file}: not a readable puzzle file, truncated or corrupt ({reason}); "
                              f"{REGENERATE}") from None
    missing = sorted(set(TENSORS) - names)
    unexpected = sorted(names - set(TENSORS))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected)}"] if unexpected else [])
        raise HierarchosError(f"{file}: not a puzzle file ({'; '.join(parts)}); {REGENERATE}")
    if META_KEY not in header:
        raise HierarchosError(f"{file}: no '{META_KEY}' metadata in its header, not a puzzle file; {REGENERATE}")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise HierarchosError(f"{file}: puzzle metadata is not valid JSON ({exc.msg}); {REGENERATE}") from None
    puzzles = PuzzleSet(meta=meta, **tensors)
    validate(puzzles, str(file))
    return puzzles


def expand_with_augmentations(puzzles: PuzzleSet, copies: int, augment, rng: np.random.Generator) -> PuzzleSet:
    """Each puzzle followed by `copies` copies of it transformed by `augment(inputs, solutions, rng)`
    (same puzzle_id and difficulty): the `--augment K` of `puzzle generate`, for any task."""
    if copies < 0:
        raise HierarchosError(f"augmented copies must be 0 or more, got {copies}")
    repeat = copies + 1
    inputs = np.repeat(puzzles.inputs, repeat, axis=0)
    solutions = np.repeat(puzzles.solutions, repeat, axis=0)
    copy_rows = np.flatnonzero(np.arange(len(inputs)) % repeat != 0)
    if copies:
        inputs[copy_rows], solutions[copy_rows] = augment(inputs[copy_rows], solutions[copy_rows], rng)
    meta = dict(puzzles.meta, augment=copies, base_puzzles=len(puzzles))
    return PuzzleSet(inputs, solutions, np.repeat(puzzles.puzzle_ids, repeat),
                     np.repeat(puzzles.difficulty, repeat), meta)
