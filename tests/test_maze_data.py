"""Maze data: generator, unique shortest paths, rotations/reflections, splits, files, `puzzle generate --task maze`."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from hierarchos.errors import HierarchosError
from hierarchos.puzzles import maze
from hierarchos.puzzles.dataset import PuzzleSet, load_puzzles, save_puzzles


def bfs(grid: np.ndarray, start: tuple[int, int]) -> np.ndarray:
    """Oracle: steps from `start` to every cell through non-wall cells (-1 = unreachable)."""
    n = grid.shape[0]
    dist = np.full((n, n), -1)
    dist[start] = 0
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < n and 0 <= nc < n and grid[nr, nc] != 1 and dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


def assert_unique_shortest_path(puzzle: np.ndarray, solution: np.ndarray) -> int:
    """A cell lies on some shortest path iff d(start, cell) + d(cell, goal) = D; the shortest
    path is unique iff there is exactly one such cell per distance 0..D. The marked cells must be them."""
    n = int(round(len(puzzle) ** 0.5))
    grid = puzzle.reshape(n, n)
    (start,), (goal,) = np.argwhere(grid == 2).tolist(), np.argwhere(grid == 3).tolist()
    from_start, from_goal = bfs(grid, tuple(start)), bfs(grid, tuple(goal))
    total = from_start[tuple(goal)]
    assert total > 0
    on_shortest = (from_start >= 0) & (from_goal >= 0) & (from_start + from_goal == total)
    assert np.array_equal(np.bincount(from_start[on_shortest], minlength=total + 1), np.ones(total + 1))
    expected = np.where(on_shortest & (grid == 0), 4, grid)
    assert np.array_equal(solution.reshape(n, n), expected)
    return int(total)


def test_generated_mazes_have_a_unique_long_shortest_path_and_are_deterministic():
    mazes, forms = maze.generate(12, size=30, seed=1)
    again, _ = maze.generate(12, size=30, seed=1)
    assert np.array_equal(mazes.inputs, again.inputs) and np.array_equal(mazes.solutions, again.solutions)
    assert mazes.inputs.shape == (12, 900) and mazes.size == 30 and mazes.task == "maze"
    assert len(set(forms)) == 12 and (mazes.difficulty >= 110).all()
    for puzzle, solution, difficulty in zip(mazes.inputs, mazes.solutions, mazes.difficulty):
        assert assert_unique_shortest_path(puzzle, solution) == difficulty
        assert (puzzle == 1).mean() > 0.3  # a maze, not an open field


def test_maze_augmentation_keeps_the_path_and_the_canonical_form():
    mazes, forms = maze.generate(6, size=12, seed=2)
    rng = np.random.default_rng(0)
    inputs, solutions = np.repeat(mazes.inputs, 5, axis=0), np.repeat(mazes.solutions, 5, axis=0)
    moved, moved_solutions = maze.augment(inputs, solutions, rng)
    assert (moved != inputs).any(axis=1).mean() > 0.6  # 7 of the 8 symmetries move a maze
    for puzzle, solution, original in zip(moved, moved_solutions, inputs):
        assert_unique_shortest_path(puzzle, solution)
        assert maze.canonical_form(puzzle) == maze.canonical_form(original)


def test_maze_splits_are_disjoint_and_files_round_trip(tmp_path):
    train, test = maze.make_splits(10, 8, size=10, seed=3)
    train_forms = {maze.canonical_form(p) for p in train.inputs}
    test_forms = {maze.canonical_form(p) for p in test.inputs}
    assert len(train_forms) == 10 and len(test_forms) == 8 and not train_forms & test_forms
    assert train.puzzle_ids.tolist() == list(range(1, 11)) and (test.puzzle_ids == 0).all()
    expanded = maze.expand_with_augmentations(train, 3, seed=0)
    save_puzzles(tmp_path / "train.safetensors", expanded)
    loaded = load_puzzles(tmp_path / "train.safetensors")
    assert np.array_equal(loaded.inputs, expanded.inputs) and np.array_equal(loaded.solutions, expanded.solutions)
    assert loaded.meta["tokens"] == maze.TOKENS and len(loaded) == 40 and loaded.num_tokens == 5
    from hierarchos.puzzles.dataset import augmenter
    from hierarchos.puzzles import sudoku
    assert augmenter("maze") is maze.augment and augmenter("sudoku") is sudoku.augment


@pytest.mark.parametrize("damage", ["path_cell_dropped", "path_through_wall", "second_start", "detour"])
def test_a_maze_file_with_a_wrong_path_is_a_one_line_error(tmp_path, damage):
    mazes, _ = maze.generate(2, size=10, seed=4)
    inputs, solutions = mazes.inputs.copy(), mazes.solutions.copy()
    path = np.flatnonzero(solutions[0] == 4)
    if damage == "path_cell_dropped":
        solutions[0, path[0]] = 0
    elif damage == "path_through_wall":
        solutions[0, np.flatnonzero(inputs[0] == 1)[0]] = 4
    elif damage == "second_start":
        inputs[0, np.flatnonzero(inputs[0] == 0)[0]] = 2
        solutions[0] = np.where(inputs[0] == 2, 2, solutions[0])
    else:  # an extra open cell marked: no longer the shortest path's cells
        extra = np.flatnonzero((inputs[0] == 0) & (solutions[0] == 0))[0]
        solutions[0, extra] = 4
    with pytest.raises(HierarchosError) as err:
        save_puzzles(tmp_path / "bad.safetensors", PuzzleSet(inputs, solutions, mazes.puzzle_ids, mazes.difficulty,
                                                             mazes.meta))
    assert "\n" not in str(err.value) and "maze 0" in str(err.value)
    assert not (tmp_path / "bad.safetensors").exists()


def test_generate_action_writes_mazes(tmp_path, capsys):
    from hierarchos.cli import OneLineParser
    from hierarchos.cli.puzzle_generate import add_generate_arguments, run_generate

    parser = OneLineParser(prog="hierarchos puzzle generate")
    add_generate_arguments(parser)
    out = tmp_path / "mazes"
    args = parser.parse_args(["--task", "maze", "--size", "12", "--out", str(out), "--train", "6", "--test", "4",
                              "--augment", "1", "--no-progress"])
    assert run_generate(args) == 0
    assert "maze puzzles" in capsys.readouterr().out
    train, test = load_puzzles(out / "train.safetensors"), load_puzzles(out / "test.safetensors")
    assert len(train) == 12 and len(test) == 4 and train.task == test.task == "maze"
    for puzzle, solution in zip(train.inputs, train.solutions):
        assert_unique_shortest_path(puzzle, solution)
    with pytest.raises(HierarchosError, match="lower --min-difficulty"):
        run_generate(parser.parse_args(["--task", "maze", "--size", "8", "--out", str(tmp_path / "x"),
                                        "--train", "1", "--test", "1", "--min-difficulty", "60", "--no-progress"]))
