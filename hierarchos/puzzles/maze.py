"""Mazes: a deterministic generator of n x n mazes whose shortest start-to-goal path is long and unique.

A maze is a perfect maze carved on a lattice of rooms (randomised depth-first search) with some
walls knocked through, so there are loops and the *shortest* path is the question; start and
goal are placed so that path is at least `min_difficulty` steps and the only shortest one.
Difficulty = the shortest path's length in steps. Cells, row-major uint8: see TOKENS.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np

from ..errors import HierarchosError
from . import dataset
from .dataset import FORMAT_VERSION, PuzzleSet

# Cell tokens of inputs and solutions; solutions mark the path's cells (not start/goal) with PATH.
OPEN, WALL, START, GOAL, PATH = 0, 1, 2, 3, 4
TOKENS = {"open": OPEN, "wall": WALL, "start": START, "goal": GOAL, "path": PATH}
MIN_SIZE, MAX_SIZE = 6, 64
MAX_ATTEMPTS = 200
GENERATOR = "dfs-loops-v1"


def default_min_difficulty(size: int) -> float:
    """Maze-Hard's rule for 30x30 (shortest path over 110 steps), scaled by area for other sizes."""
    return float(round(110 * size * size / 900))


def _neighbours(size: int) -> list[tuple[int, ...]]:
    result = []
    for cell in range(size * size):
        r, c = divmod(cell, size)
        result.append(tuple(r2 * size + c2 for r2, c2 in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                            if 0 <= r2 < size and 0 <= c2 < size))
    return result


def shortest_paths(grid: list[int] | np.ndarray, size: int, start: int):
    """BFS from `start` over non-wall cells: (distance list, -1 = unreachable; number of shortest
    paths to each cell, capped at 2; one predecessor on a shortest path per cell)."""
    cells = np.asarray(grid).tolist() if isinstance(grid, np.ndarray) else grid
    neighbours = _neighbours_cached(size)
    dist = [-1] * (size * size)
    ways = [0] * (size * size)
    parent = [-1] * (size * size)
    dist[start], ways[start] = 0, 1
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for nxt in neighbours[cell]:
            if cells[nxt] == WALL:
                continue
            if dist[nxt] < 0:
                dist[nxt], ways[nxt], parent[nxt] = dist[cell] + 1, ways[cell], cell
                queue.append(nxt)
            elif dist[nxt] == dist[cell] + 1:
                ways[nxt] = min(2, ways[nxt] + ways[cell])
    return dist, ways, parent


_NEIGHBOURS: dict[int, list] = {}


def _neighbours_cached(size: int):
    if size not in _NEIGHBOURS:
        _NEIGHBOURS[size] = _neighbours(size)
    return _NEIGHBOURS[size]


def _carve(size: int, rng: random.Random) -> list[int]:
    """A perfect maze: rooms at even (row, col), passages by randomised DFS, then loops."""
    grid = [WALL] * (size * size)
    rooms = [(r, c) for r in range(0, size - 1, 2) for c in range(0, size - 1, 2)]
    start = rng.choice(rooms)
    grid[start[0] * size + start[1]] = OPEN
    stack, seen = [start], {start}
    while stack:
        r, c = stack[-1]
        options = [(r + dr, c + dc) for dr, dc in ((-2, 0), (2, 0), (0, -2), (0, 2))
                   if 0 <= r + dr < size - 1 and 0 <= c + dc < size - 1 and (r + dr, c + dc) not in seen]
        if not options:
            stack.pop()
            continue
        nr, nc = rng.choice(options)
        grid[((r + nr) // 2) * size + (c + nc) // 2] = OPEN
        grid[nr * size + nc] = OPEN
        seen.add((nr, nc))
        stack.append((nr, nc))
    # Knock through a few walls between rooms: loops make the shortest path a real question.
    walls = [r * size + c for r in range(size - 1) for c in range(size - 1)
             if grid[r * size + c] == WALL and (r % 2) != (c % 2)]
    for cell in rng.sample(walls, min(len(walls), rng.randint(len(walls) // 20, len(walls) // 8))):
        grid[cell] = OPEN
    return grid


def _make_maze(size: int, rng: random.Random, min_length: float):
    """(inputs, solution, path length) or None when no start/goal pair passes in a few tries."""
    grid = _carve(size, rng)
    rooms = [cell for cell in range(size * size) if grid[cell] == OPEN]
    for _ in range(8):
        start = rng.choice(rooms)
        dist, ways, parent = shortest_paths(grid, size, start)
        far = [cell for cell in rooms if dist[cell] >= min_length and ways[cell] == 1]
        if not far:
            continue
        goal = rng.choice(far)
        puzzle = list(grid)
        puzzle[start], puzzle[goal] = START, GOAL
        solution = list(puzzle)
        cell = parent[goal]
        while cell != start:
            solution[cell] = PATH
            cell = parent[cell]
        return puzzle, solution, dist[goal]
    return None


def canonical_form(grid: np.ndarray) -> bytes:
    """The smallest of the maze's 8 rotations and reflections (the maze augmentation group)."""
    array = np.asarray(grid)
    size = int(round(array.size ** 0.5))
    square = array.reshape(size, size)
    images = [np.rot90(view, k) for view in (square, square.T) for k in range(4)]
    return min(np.ascontiguousarray(image).tobytes() for image in images)


def augment(inputs: np.ndarray, solutions: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random rotation/reflection per row of a batch ((B, n*n) each), the same for puzzle and
    solution: walls, start, goal and the unique shortest path map onto each other."""
    inputs, solutions = np.asarray(inputs), np.asarray(solutions)
    if inputs.shape != solutions.shape or inputs.ndim != 2:
        raise HierarchosError(f"augment takes two (B, n*n) batches of one shape, "
                              f"got {inputs.shape} and {solutions.shape}")
    batch, cells = inputs.shape
    size = int(round(cells ** 0.5))
    index = np.arange(cells).reshape(size, size)
    maps = np.stack([np.rot90(view, k).ravel() for view in (index, index.T) for k in range(4)])  # (8, n*n)
    source = maps[rng.integers(0, 8, batch)]                                                   # (B, n*n)
    return np.take_along_axis(inputs, source, axis=1), np.take_along_axis(solutions, source, axis=1)


def check(inputs: np.ndarray, solutions: np.ndarray, where: str, fix: str) -> None:
    """Raise one HierarchosError line unless every solution marks the unique shortest path of its maze."""
    count, cells = inputs.shape
    size = int(round(cells ** 0.5))
    if (inputs > GOAL).any() or (solutions > PATH).any():
        raise HierarchosError(f"{where}: a maze cell holds a token above {PATH}; {fix}")
    for row in range(count):
        puzzle, solution = inputs[row], solutions[row]
        starts, goals = np.flatnonzero(puzzle == START), np.flatnonzero(puzzle == GOAL)
        if len(starts) != 1 or len(goals) != 1:
            raise HierarchosError(f"{where}: maze {row} needs exactly one start and one goal; {fix}")
        marked = solution == PATH
        if not np.array_equal(np.where(marked, OPEN, solution), puzzle) or (puzzle[marked] != OPEN).any():
            raise HierarchosError(f"{where}: solution of maze {row} changes more than open cells into path; {fix}")
        dist, ways, _ = shortest_paths(puzzle, size, int(starts[0]))
        goal = int(goals[0])
        if dist[goal] < 1 or ways[goal] != 1 or int(marked.sum()) != dist[goal] - 1:
            raise HierarchosError(f"{where}: maze {row} has no unique shortest path of the marked length; {fix}")
        on_path = set(np.flatnonzero(marked).tolist()) | {int(starts[0]), goal}
        back = dist[goal]
        cell = goal
        while cell != int(starts[0]):  # the marked cells must be that shortest path, step by step
            step = [n for n in _neighbours_cached(size)[cell] if n in on_path and dist[n] == back - 1]
            if not step:
                raise HierarchosError(f"{where}: the path marked in maze {row} is not its shortest path; {fix}")
            cell, back = step[0], back - 1


def _slot(job: tuple[int, int, str, int, float]):
    size, seed, split, slot, floor = job
    rng = random.Random(f"hierarchos-maze:{size}:{seed}:{split}:{slot}")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        made = _make_maze(size, rng, floor)
        if made is not None:
            return made, attempt
    return None


def generate(count: int, *, size: int = 30, seed: int, min_difficulty: float | None = None, split: str = "train",
             exclude=frozenset(), progress: bool = False) -> tuple[PuzzleSet, list[bytes]]:
    """`count` distinct mazes (up to rotation/reflection, and none in `exclude`) with a unique
    shortest path of at least `min_difficulty` steps, and their canonical forms. Slot k draws
    from its own stream (seed, split, size, k), so the result depends only on the arguments."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise HierarchosError(f"maze size {size} is not supported; use {MIN_SIZE}..{MAX_SIZE} (30 for Maze-Hard)")
    if count < 1:
        raise HierarchosError(f"maze count must be at least 1, got {count}")
    floor = default_min_difficulty(size) if min_difficulty is None else float(min_difficulty)
    if not floor >= 1:
        raise HierarchosError(f"maze min difficulty is a path length of 1 step or more, got {min_difficulty}")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc=f"{split} maze {size}x{size}", unit="maze", dynamic_ncols=True)
    seen, kept, forms = set(exclude), [], []
    slot, attempts, duplicates = 0, 0, 0
    try:
        while len(kept) < count:
            result = _slot((size, int(seed), split, slot, floor))
            slot += 1
            if result is None:
                raise HierarchosError(f"no {size}x{size} maze had a unique shortest path of {floor:g}+ steps in "
                                      f"{MAX_ATTEMPTS} attempts; lower --min-difficulty")
            (puzzle, solution, length), tries = result
            attempts += tries
            form = canonical_form(np.array(puzzle, dtype=np.uint8))
            if form in seen:
                duplicates += 1
                if duplicates > 10 * count + 100:
                    raise HierarchosError(f"only {len(kept)} distinct {size}x{size} mazes found; ask for fewer")
                continue
            seen.add(form)
            kept.append((puzzle, solution, length))
            forms.append(form)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    inputs = np.array([k[0] for k in kept], dtype=np.uint8)
    solutions = np.array([k[1] for k in kept], dtype=np.uint8)
    difficulty = np.array([k[2] for k in kept], dtype=np.float32)
    ids = np.arange(1, count + 1, dtype=np.int32) if split == "train" else np.zeros(count, dtype=np.int32)
    meta = {"task": "maze", "size": size, "split": split, "seed": int(seed), "format_version": FORMAT_VERSION,
            "min_difficulty": floor, "generator": GENERATOR, "difficulty_unit": "shortest path steps",
            "tokens": TOKENS, "slots": slot, "attempts": attempts, "duplicates_skipped": duplicates}
    return PuzzleSet(inputs, solutions, ids, difficulty, meta), forms


def make_splits(train: int, test: int, *, size: int = 30, seed: int, min_difficulty: float | None = None,
                progress: bool = False) -> tuple[PuzzleSet, PuzzleSet]:
    """Train and test mazes with none in common up to rotation/reflection; the test set is drawn
    first from its own stream, so it does not depend on the size of the training set."""
    test_set, forms = generate(test, size=size, seed=seed, min_difficulty=min_difficulty, split="test",
                               progress=progress)
    train_set, _ = generate(train, size=size, seed=seed, min_difficulty=min_difficulty, split="train",
                            exclude=frozenset(forms), progress=progress)
    return train_set, test_set


def expand_with_augmentations(puzzles: PuzzleSet, copies: int, seed: int) -> PuzzleSet:
    """Each maze followed by `copies` rotated/reflected copies of it (same puzzle_id and difficulty)."""
    return dataset.expand_with_augmentations(puzzles, copies, augment, np.random.default_rng([int(seed), 0x3A2E]))
