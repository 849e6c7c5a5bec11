"""Maze puzzles through the puzzle model, trainer and CLI (hierarchos.model.puzzle, hierarchos.train.puzzle_trainer,
`hierarchos puzzle`), on tiny 6x6 mazes from the generator (hierarchos.puzzles.maze) and tiny models.

What they hold: a maze PuzzleConfig (task, tokens from the data) and its vocabulary; the trainer's
augmented batches are still valid mazes (the same mazes, rotated or reflected); the maze metrics
(exact grid, open-cell and path-cell accuracy, valid shortest path) against hand-made answers; a
training step lowers the cell loss on mazes; train -> checkpoint -> eval through the CLI; a model of
one task given puzzles of the other is one line; language-model commands pointed at a puzzle model
say so in one line.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hierarchos.cli import main
from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model.puzzle import PuzzleConfig, PuzzleOutput, PuzzleSolver, puzzle_model_config
from hierarchos.puzzles import maze
from hierarchos.puzzles.dataset import load_puzzles
from hierarchos.train.puzzle_trainer import PuzzleTrainConfig, PuzzleTrainer, evaluate_puzzles, valid_paths


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def mazes(count: int, seed: int, size: int = 6, split: str = "train"):
    generated, _ = maze.generate(count, size=size, seed=seed, split=split)
    return generated


def maze_config(**fields) -> PuzzleConfig:
    return PuzzleConfig(**{"task": "maze", "size": 6, "num_tokens": 5, "num_puzzle_ids": 0, "max_segments": 2,
                           "halt_explore_prob": 0.0, **fields})


def tiny_maze_model(**fields) -> PuzzleSolver:
    puzzle = maze_config(**fields)
    return PuzzleSolver(puzzle_model_config(puzzle, tiny_config(use_rosa=False)), puzzle)


# ---- config and model ----------------------------------------------------------------------------

def test_maze_config_and_vocabulary():
    puzzle = maze_config().validate()
    # 5 cell tokens (open, wall, start, goal, path), then PUZZLE; every token is an answer
    assert (puzzle.vocab_size, puzzle.puzzle_token, puzzle.answer_offset, puzzle.num_answers) == (6, 5, 0, 5)
    assert PuzzleConfig.from_dict(puzzle.to_dict(), "here") == puzzle
    # a Sudoku config saved before mazes (no task tokens) still loads: blank + n digits, answers 1..n
    old = PuzzleConfig.from_dict({"size": 4, "num_puzzle_ids": 3, "max_segments": 2, "halt_explore_prob": 0.1,
                                  "task": "sudoku"}, "here")
    assert (old.num_tokens, old.vocab_size, old.answer_offset, old.num_answers) == (5, 6, 1, 4)
    for bad, needle in ((dict(num_tokens=None), "num_tokens"), (dict(size=3), "size"), (dict(task="go"), "task"),
                        (dict(task="sudoku", size=6, num_tokens=7), "size")):
        with pytest.raises(HierarchosError, match=needle):
            maze_config(**bad).validate()
    model = tiny_maze_model()
    assert model.cfg.vocab_size == 6 and model.puzzle_token == 5
    x = torch.from_numpy(mazes(3, fresh_seed() % 1000).inputs.astype(np.int64))
    out = model(x, torch.zeros(3, dtype=torch.long), model.init_state(3))
    assert out.logits.shape == (3, 36, 5) and out.state.pos == 37  # [PUZZLE] + 36 cells


def test_a_maze_step_lowers_its_cell_loss():
    seed = fresh_seed()
    torch.manual_seed(seed)
    puzzles = mazes(4, seed % 1000)
    model = tiny_maze_model(num_puzzle_ids=puzzles.num_puzzle_ids)
    trainer = PuzzleTrainer(model, puzzles, PuzzleTrainConfig(epochs=1, batch_size=4, starting_lr=1e-3, min_lr=1e-4,
                                                              augment=False), torch.device("cpu"), log=lambda _: None)
    inputs, solutions, ids, _ = trainer.batch(0)
    first = trainer.train_batch(inputs, solutions, ids)
    for _ in range(5):
        last = trainer.train_batch(inputs, solutions, ids)
    assert np.isfinite(first["loss"]) and last["cell_loss"] < first["cell_loss"], f"seed {seed}"


# ---- augmentation and metrics ----------------------------------------------------------------------

def test_augmented_training_batches_are_the_same_valid_mazes():
    seed = fresh_seed()
    puzzles = mazes(8, seed % 1000)
    model = tiny_maze_model(num_puzzle_ids=8)
    trainer = PuzzleTrainer(model, puzzles, PuzzleTrainConfig(epochs=3, batch_size=4, augment=True, seed=seed),
                            torch.device("cpu"), log=lambda _: None)
    changed = 0
    for step in range(6):
        inputs, solutions, ids, _ = trainer.batch(step)
        rows, _ = trainer.batch_rows(step)
        inputs, solutions = inputs.numpy().astype(np.uint8), solutions.numpy().astype(np.uint8)
        maze.check(inputs, solutions, f"batch {step} (seed {seed})", "")  # the unique shortest path, still marked
        for i, row in enumerate(rows):  # each one is its own maze, rotated or reflected
            assert ids[i] == puzzles.puzzle_ids[row]
            assert maze.canonical_form(inputs[i]) == maze.canonical_form(puzzles.inputs[row]), f"seed {seed}"
            assert maze.canonical_form(solutions[i]) == maze.canonical_form(puzzles.solutions[row]), f"seed {seed}"
            changed += not np.array_equal(inputs[i], puzzles.inputs[row])
    assert changed > 0, f"seed {seed}: augmentation changed no maze in 24 rows"


class AnswerSolver(nn.Module):
    """Answers each maze with a fixed grid of tokens (one-hot logits) and halts after one segment."""

    def __init__(self, answers: np.ndarray):
        super().__init__()
        self.puzzle_cfg = maze_config(max_segments=1)
        self.weight = nn.Parameter(torch.zeros(()))
        self.answers = torch.from_numpy(answers.astype(np.int64))

    def init_state(self, batch_size, device=None, dtype=None):
        return SimpleNamespace(offset=0)

    def forward(self, inputs, ids, state):
        B = inputs.shape[0]
        logits = torch.nn.functional.one_hot(self.answers[:B], 5).float() + self.weight
        return PuzzleOutput(logits=logits, q_halt=torch.ones(B), q_continue=torch.zeros(B), state=state)


def test_maze_metrics_on_hand_made_answers():
    seed = fresh_seed() % 1000
    puzzles = mazes(12, seed, split="test")
    spare = (puzzles.solutions == maze.OPEN).any(1)  # mazes with an open cell off the path
    assert spare.sum() >= 4, f"seed {seed}"
    rows = np.flatnonzero(spare)[:4]
    inputs, solutions = puzzles.inputs[rows], puzzles.solutions[rows]
    answers = solutions.copy()
    # 0: the solution; 1: a wall miscopied as open (path right: valid, not exact)
    answers[1, np.flatnonzero(inputs[1] == maze.WALL)[0]] = maze.OPEN
    # 2: one path cell left open (not a path: invalid; one open cell and one path cell wrong)
    answers[2, np.flatnonzero(solutions[2] == maze.PATH)[0]] = maze.OPEN
    # 3: an extra open cell marked as path (invalid; one open cell wrong, every path cell right)
    answers[3, np.flatnonzero(solutions[3] == maze.OPEN)[0]] = maze.PATH
    assert valid_paths(inputs, answers).tolist() == [True, True, False, False]
    assert valid_paths(inputs, solutions).all()
    subset = type(puzzles)(inputs, solutions, puzzles.puzzle_ids[rows], puzzles.difficulty[rows], puzzles.meta)
    result = evaluate_puzzles(AnswerSolver(answers), subset, torch.device("cpu"))
    assert result["task"] == "maze" and result["solved"] == [True, False, False, False]
    assert result["exact"] == pytest.approx(0.25) and result["valid_path"] == pytest.approx(0.5)
    open_cells, path_cells = int((inputs == maze.OPEN).sum()), int((solutions == maze.PATH).sum())
    assert result["cells"] == pytest.approx((open_cells - 2) / open_cells)
    assert result["path_cells"] == pytest.approx((path_cells - 1) / path_cells)


# ---- the CLI -----------------------------------------------------------------------------------

TRAIN = ["--tiny", "--max-segments", "2", "--batch-size", "4", "--device", "cpu", "--log-every", "1"]


def _generate(root: Path, *flags: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    out = root / "data"
    assert main(["puzzle", "generate", "--out", str(out), "--train", "8", "--test", "4", "--no-progress",
                 "--seed", str(fresh_seed() % 1000), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6x6 maze data and a maze model trained on it through the CLI (2 epochs, checkpoints, --val)."""
    root = tmp_path_factory.mktemp("maze")
    data = _generate(root, "--task", "maze", "--size", "6")
    out = root / "model"
    assert main(["puzzle", "train", "--data", str(data), "--out-dir", str(out), "--epochs", "2", "--val", str(data),
                 *TRAIN]) == 0
    return SimpleNamespace(root=root, data=data, model=out)


@pytest.fixture(scope="module")
def sudoku(tmp_path_factory):
    """4x4 Sudoku data and a Sudoku model (one step) for the task-mismatch errors."""
    root = tmp_path_factory.mktemp("sudoku")
    data = _generate(root, "--size", "4")
    out = root / "model"
    assert main(["puzzle", "train", "--data", str(data), "--out-dir", str(out), "--max-steps", "1", *TRAIN]) == 0
    return SimpleNamespace(root=root, data=data, model=out)


def test_maze_train_checkpoint_eval_round_trip(trained, capsys):
    out, data = trained.model, trained.data
    config = json.loads((out / "hierarchos_config.json").read_text())
    assert config["puzzle"]["task"] == "maze" and config["puzzle"]["size"] == 6
    assert config["puzzle"]["num_tokens"] == 5 and config["vocab_size"] == 6 and config["puzzle"]["num_puzzle_ids"] == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and 0 <= records[-1]["val_valid_path"] <= 1
    capsys.readouterr()
    report = trained.root / "eval.json"
    assert main(["puzzle", "eval", "--model-path", str(out), "--data", str(data), "--output", str(report),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["task"] == "maze" and result["puzzles"] == 4 and all(1 <= s <= 2 for s in result["segments"])
    for key in ("exact", "cells", "path_cells", "valid_path"):
        assert 0.0 <= result[key] <= 1.0, key
    assert "6x6 maze" in printed and f"valid paths        {result['valid_path']:.4f}" in printed
    # the saved model scores what the loader and evaluate_puzzles give in memory
    from hierarchos.train.puzzle_trainer import load_puzzle_model

    model, _ = load_puzzle_model(out)
    again = evaluate_puzzles(model, load_puzzles(data / "test.safetensors"), torch.device("cpu"))
    assert again["solved"] == result["solved"] and again["valid_path"] == pytest.approx(result["valid_path"])
    # a checkpoint step dir is a model directory for eval too
    assert main(["puzzle", "eval", "--model-path", str(out / "checkpoints" / "step-00000004"), "--data",
                 str(data), "--device", "cpu"]) == 0


def _one_line_error(capsys, argv, *needles):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_a_model_given_the_other_task_is_one_line(trained, sudoku, capsys):
    _one_line_error(capsys, ["puzzle", "eval", "--model-path", str(trained.model), "--data", str(sudoku.data),
                             "--device", "cpu"], "holds sudoku puzzles", "solves maze")
    _one_line_error(capsys, ["puzzle", "eval", "--model-path", str(sudoku.model), "--data", str(trained.data),
                             "--device", "cpu"], "holds maze puzzles", "solves sudoku")
    # resuming a maze run on Sudoku data, and a Sudoku run scored on mazes while training
    _one_line_error(capsys, ["puzzle", "train", "--data", str(sudoku.data), "--out-dir", str(trained.root / "r"),
                             "--resume-from-ckpt", str(trained.model / "checkpoints"), *TRAIN],
                    "holds sudoku puzzles", "solves maze")
    _one_line_error(capsys, ["puzzle", "train", "--data", str(sudoku.data), "--val", str(trained.data),
                             "--out-dir", str(sudoku.root / "v"), *TRAIN], "--val", "holds maze puzzles")


def test_language_model_commands_name_a_puzzle_model(trained, capsys):
    model = str(trained.model)
    for argv in (["chat", "--model-path", model, "--prompt", "hi", "--device", "cpu"],
                 ["ckpt-2-inf", "--ckpt-input", str(trained.model / "checkpoints"),
                  "--inf-output", str(trained.root / "inf")]):
        _one_line_error(capsys, argv, "is a puzzle model (task maze)", "puzzle eval")
    assert not (trained.root / "inf").exists()


def test_bench_puzzles_maze_tiny_smoke(tmp_path):
    """bench/bench_puzzles.py --task maze --tiny: 6x6 mazes generated, hierarchos and the matched Transformer
    trained and scored with the maze metrics, the JSON written."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_puzzles.py"
    spec = importlib.util.spec_from_file_location("bench_puzzles", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--task", "maze", "--tiny", "--device", "cpu", "--train-puzzles", "8", "--test-puzzles", "4",
                       "--steps", "2", "--batch-size", "4", "--models", "hierarchos-rwkv7", "transformer",
                       "--seed", str(fresh_seed() % 1000), "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["task"] == "maze" and payload["size"] == 6
    for r in payload["results"].values():
        assert r["task"] == "maze" and r["puzzles"] == 4 and r["steps"] == 2
        assert 0.0 <= r["valid_path"] <= 1.0 and 0.0 <= r["path_cells"] <= 1.0
