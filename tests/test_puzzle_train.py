"""Puzzle model, training and evaluation (hierarchos.model.puzzle, hierarchos.train.puzzle_trainer,
`hierarchos puzzle`), on tiny 4x4 Sudoku built here by hand (valid grids from a base grid and its
symmetries), so these tests do not depend on the generator.

What they hold: shapes; segment 1 is causal while segment 2 sees the whole grid (a change in the
last cell reaches the first cell's prediction only from segment 2 on); the per-puzzle vector enters
at the start; the LM path is unchanged outside a segment; the halting rule per puzzle (a stub with
scripted Q logits); training moves only the batch's puzzle rows; train -> checkpoint -> eval through
the CLI; an exact resume; and one-line errors for bad input.
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
from hierarchos.model import HierarchosLM
from hierarchos.model.puzzle import PuzzleConfig, PuzzleOutput, PuzzleSolver, puzzle_model_config
from hierarchos.puzzles.dataset import PuzzleSet, save_puzzles
from hierarchos.train.puzzle_trainer import (PuzzleTrainConfig, PuzzleTrainer, evaluate_puzzles, q_losses,
                                             rank_correlation)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


BASE4 = np.array([[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]], dtype=np.uint8)


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def tiny_puzzles(count: int, seed: int, split: str = "train", blanks: int = 8) -> PuzzleSet:
    """Valid 4x4 grids (digit relabelling, rows within bands, bands, transposition of BASE4), `blanks`
    cells erased; ids 1..count for train, 0 for test; difficulty = number of blanks (a stand-in)."""
    rng = np.random.default_rng(seed)
    inputs, solutions = [], []
    for _ in range(count):
        grid = rng.permutation(4)[BASE4 - 1] + 1
        bands = rng.permutation(2)
        rows = np.concatenate([band * 2 + rng.permutation(2) for band in bands])
        grid = grid[rows]
        if rng.random() < 0.5:
            grid = grid.T
        puzzle = grid.reshape(-1).copy()
        puzzle[rng.choice(16, size=blanks, replace=False)] = 0
        inputs.append(puzzle)
        solutions.append(grid.reshape(-1))
    ids = np.arange(1, count + 1, dtype=np.int32) if split == "train" else np.zeros(count, dtype=np.int32)
    meta = {"task": "sudoku", "size": 4, "split": split, "seed": seed, "format_version": 1}
    return PuzzleSet(np.stack(inputs).astype(np.uint8), np.stack(solutions).astype(np.uint8), ids,
                     np.full(count, float(blanks), dtype=np.float32), meta)


def tiny_model(num_ids: int = 6, max_segments: int = 3, **arch) -> PuzzleSolver:
    puzzle = PuzzleConfig(size=4, num_puzzle_ids=num_ids, max_segments=max_segments, halt_explore_prob=0.0)
    return PuzzleSolver(puzzle_model_config(puzzle, tiny_config(use_rosa=False, **arch)), puzzle)


# ---- the model ---------------------------------------------------------------------------------

def test_segment_shapes_and_state_positions():
    model = tiny_model()
    x = torch.randint(0, 5, (3, 16))
    out = model(x, torch.tensor([0, 2, 5]), model.init_state(3))
    assert out.logits.shape == (3, 16, 4) and out.q_halt.shape == (3,) and out.q_continue.shape == (3,)
    assert out.state.pos == 17  # [PUZZLE] + 16 cells
    assert model(x, torch.zeros(3, dtype=torch.long), out.state).state.pos == 34
    # seed 003's start: zero Q weights, equal halt and continue logits (no puzzle halts early)
    assert torch.equal(out.q_halt, out.q_continue)


@pytest.mark.parametrize("block", ["rwkv7", "attention"])
def test_segment_two_sees_the_whole_grid(block):
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = tiny_model(h_block=block, l_block=block).eval()
    a = torch.randint(0, 5, (2, 16))
    b = a.clone()
    b[:, -1] = (a[:, -1] + 1) % 5  # only the last cell differs
    ids = torch.tensor([1, 0])
    with torch.no_grad():
        seg1_a, seg1_b = model(a, ids, model.init_state(2)), model(b, ids, model.init_state(2))
        seg2_a, seg2_b = model(a, ids, seg1_a.state), model(b, ids, seg1_b.state)
    # segment 1 is causal: every cell before the last one predicts the same
    assert torch.equal(seg1_a.logits[:, :-1], seg1_b.logits[:, :-1]), f"seed {seed}"
    # segment 2 reads from the state that holds the whole grid: the first cell's prediction changes
    assert (seg2_a.logits[:, 0] - seg2_b.logits[:, 0]).abs().max() > 1e-6, f"seed {seed}"


def test_the_puzzle_vector_enters_at_the_start_and_the_lm_path_is_unchanged():
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = tiny_model().eval()
    with torch.no_grad():
        model.puzzle_embedding.table.weight[2] = torch.randn(model.cfg.context_dim)
    x = torch.randint(0, 5, (1, 16))
    with torch.no_grad():
        none = model(x, torch.tensor([0]), model.init_state(1)).logits
        other_none = model(x, torch.tensor([3]), model.init_state(1)).logits  # a zero row: as 'none'
        two = model(x, torch.tensor([2]), model.init_state(1)).logits
    assert torch.equal(none, other_none)
    assert (none - two).abs().max() > 1e-6, f"seed {seed}"
    # outside a segment the hook adds nothing: the wrapped LM computes what a plain one with its weights does
    plain = HierarchosLM(model.cfg).eval()
    plain.load_state_dict(model.lm.state_dict())
    tokens = model.tokens(x)
    with torch.no_grad():
        assert torch.equal(plain(tokens).logits, model.lm(tokens).logits)
    assert not any("puzzle" in name for name in plain.state_dict())


class ScriptedSolver(nn.Module):
    """Segment k: row b halts when k >= halt_at[b]; predicts the solution from segment right_at[b] on."""

    def __init__(self, solutions, halt_at, right_at, max_segments):
        super().__init__()
        self.puzzle_cfg = PuzzleConfig(size=4, max_segments=max_segments)
        self.weight = nn.Parameter(torch.zeros(()))
        self.solutions, self.halt_at, self.right_at = solutions, torch.tensor(halt_at), torch.tensor(right_at)

    def init_state(self, batch_size, device=None, dtype=None):
        return SimpleNamespace(k=0, rows=None)

    def forward(self, inputs, ids, state):
        k = state.k + 1
        B = inputs.shape[0]
        rows = torch.arange(B) if state.rows is None else state.rows
        wrong = self.solutions[rows] % 4 + 1
        answer = torch.where((k >= self.right_at[rows])[:, None], self.solutions[rows], wrong)
        logits = torch.nn.functional.one_hot(answer - 1, 4).float() + self.weight
        halt = (k >= self.halt_at[rows]).float() * 2 - 1
        return PuzzleOutput(logits=logits, q_halt=halt, q_continue=torch.zeros(B),
                            state=SimpleNamespace(k=k, rows=rows))


def test_each_puzzle_answers_with_the_segment_it_halted_at():
    puzzles = tiny_puzzles(5, fresh_seed(), split="test")
    halt_at = [1, 2, 4, 9, 3]   # 9 > M: stopped by the cap
    right_at = [1, 3, 2, 4, 3]  # right from this segment on
    model = ScriptedSolver(torch.from_numpy(puzzles.solutions.astype(np.int64)), halt_at, right_at, 4)
    result = evaluate_puzzles(model, puzzles, torch.device("cpu"), batch_size=5, all_segments=True)
    assert result["segments"] == [1, 2, 4, 4, 3]
    assert result["solved"] == [True, False, True, True, True]
    assert result["exact"] == pytest.approx(0.8) and result["mean_segments"] == pytest.approx(14 / 5)
    assert result["segments_histogram"] == {"1": 1, "2": 1, "3": 1, "4": 2}
    assert result["exact_by_segment"] == pytest.approx([0.2, 0.4, 0.8, 1.0])
    # row 1 halted with a wrong answer: its blanks are all wrong, the other rows' all right
    blanks = (puzzles.inputs == 0).sum(1)
    assert result["cells"] == pytest.approx((blanks.sum() - blanks[1]) / blanks.sum())


def test_rank_correlation_matches_a_hand_computation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3) -> r = 0.9486833
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / np.sqrt(10), rel=1e-6)
    assert rank_correlation([2, 2, 2], [1, 2, 3]) is None


# ---- training ----------------------------------------------------------------------------------

def test_q_losses_by_hand():
    """Seed 003's targets: halt -> solved now; continue -> sigmoid(max(next halt, next continue)), or
    sigmoid(next halt) when the next segment is the last; halted puzzles count for nothing."""
    def bce(logit, target):
        p = 1 / (1 + np.exp(-logit))
        return -(target * np.log(p) + (1 - target) * np.log(1 - p))

    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    out = SimpleNamespace(q_halt=torch.tensor([0.5, -1.0, 2.0]), q_continue=torch.tensor([1.5, 0.2, -0.3]))
    nxt = SimpleNamespace(q_halt=torch.tensor([-2.0, 1.0, 0.0]), q_continue=torch.tensor([0.7, -3.0, 9.0]))
    solved = torch.tensor([True, False, True])
    active = torch.tensor([True, True, False])
    halt, cont = q_losses(out, solved, active, nxt, next_is_last=False)
    assert float(halt) == pytest.approx((bce(0.5, 1) + bce(-1.0, 0)) / 2, rel=1e-5)
    assert float(cont) == pytest.approx((bce(1.5, sig(0.7)) + bce(0.2, sig(1.0))) / 2, rel=1e-5)
    _, cont_last = q_losses(out, solved, active, nxt, next_is_last=True)
    assert float(cont_last) == pytest.approx((bce(1.5, sig(-2.0)) + bce(0.2, sig(1.0))) / 2, rel=1e-5)
    halt_only, none = q_losses(out, solved, active)
    assert float(halt_only) == float(halt) and float(none) == 0.0


def _trainer(model, puzzles, device="cpu", **cfg):
    base = dict(epochs=1, batch_size=4, starting_lr=1e-3, min_lr=1e-4, augment=False, puzzle_emb_lr=0.01)
    return PuzzleTrainer(model, puzzles, PuzzleTrainConfig(**{**base, **cfg}), torch.device(device),
                         log=lambda line: None)


def test_a_step_moves_only_the_batch_puzzle_rows_and_lowers_its_loss():
    seed = fresh_seed()
    torch.manual_seed(seed)
    puzzles = tiny_puzzles(10, seed)
    model = tiny_model(num_ids=10, max_segments=2)
    trainer = _trainer(model, puzzles)
    rows, _ = trainer.batch_rows(0)
    before = model.puzzle_embedding.table.weight.detach().clone()
    inputs = torch.from_numpy(puzzles.inputs[rows].astype(np.int64))
    solutions = torch.from_numpy(puzzles.solutions[rows].astype(np.int64))
    ids = torch.from_numpy(puzzles.puzzle_ids[rows].astype(np.int64))
    first = trainer.train_batch(inputs, solutions, ids)
    after = model.puzzle_embedding.table.weight.detach()
    moved = sorted(set((before != after).any(1).nonzero().flatten().tolist()))
    assert moved == sorted(puzzles.puzzle_ids[rows].tolist()), f"seed {seed}"
    # two segments, one update each; every puzzle ran both (equal Q logits at the start: no halt)
    assert trainer.updates == 2 and first["segments"] == 2.0
    for _ in range(6):
        last = trainer.train_batch(inputs, solutions, ids)
    assert last["cell_loss"] < first["cell_loss"], f"seed {seed}"


def test_halting_per_puzzle_in_training():
    seed = fresh_seed()
    torch.manual_seed(seed)
    puzzles = tiny_puzzles(8, seed)
    inputs = torch.from_numpy(puzzles.inputs.astype(np.int64))
    solutions = torch.from_numpy(puzzles.solutions.astype(np.int64))
    ids = torch.from_numpy(puzzles.puzzle_ids.astype(np.int64))
    model = tiny_model(num_ids=8, max_segments=4)
    with torch.no_grad():
        model.q_head.bias.copy_(torch.tensor([20.0, -20.0]))  # halt far above continue: stop at once
    trainer = _trainer(model, puzzles, batch_size=8, starting_lr=1e-9, min_lr=0.0, puzzle_emb_lr=1e-9)
    assert trainer.train_batch(inputs, solutions, ids)["segments"] == 1.0 and trainer.updates == 1
    # exploration for every puzzle: none may halt before a random 2..M segments
    model.puzzle_cfg.halt_explore_prob = 1.0
    record = trainer.train_batch(inputs, solutions, ids)
    assert 2.0 <= record["segments"] <= 4.0
    # the batch runs until its last puzzle halts: as many updates as the longest puzzle's segments
    assert record["segments"] <= trainer.updates - 1 <= 4


# ---- the CLI -----------------------------------------------------------------------------------

def _data(tmp_path: Path, train: int = 12, test: int = 6) -> Path:
    seed = fresh_seed()
    data = tmp_path / "data"
    data.mkdir()
    save_puzzles(data / "train.safetensors", tiny_puzzles(train, seed))
    save_puzzles(data / "test.safetensors", tiny_puzzles(test, seed + 1, split="test"))
    return data


TRAIN = ["--tiny", "--max-segments", "2", "--batch-size", "4", "--device", "cpu", "--log-every", "1"]


def test_train_checkpoint_eval_round_trip(tmp_path, capsys):
    data = _data(tmp_path)
    out = tmp_path / "model"
    assert main(["puzzle", "train", "--data", str(data), "--out-dir", str(out), "--epochs", "2",
                 "--val", str(data), *TRAIN]) == 0
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "latest.json").is_file()
    config = json.loads((out / "hierarchos_config.json").read_text())
    assert config["puzzle"]["size"] == 4 and config["puzzle"]["num_puzzle_ids"] == 12 and config["vocab_size"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and "val_exact" in records[2]
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["puzzle", "eval", "--model-path", str(out), "--data", str(data), "--output", str(report),
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["puzzles"] == 6 and len(result["segments"]) == 6 and 0 <= result["exact"] <= 1
    assert all(1 <= s <= 2 for s in result["segments"])
    assert f"{result['exact']:.4f}" in printed
    # the saved model scores what the in-memory loader and evaluate_puzzles give
    from hierarchos.puzzles.dataset import load_puzzles
    from hierarchos.train.puzzle_trainer import load_puzzle_model

    model, _ = load_puzzle_model(out)
    again = evaluate_puzzles(model, load_puzzles(data / "test.safetensors"), torch.device("cpu"))
    assert again["solved"] == result["solved"] and again["cells"] == pytest.approx(result["cells"])
    # a checkpoint step dir is a model directory for eval too
    assert main(["puzzle", "eval", "--model-path", str(out / "checkpoints" / "step-00000006"), "--data",
                 str(data), "--device", "cpu"]) == 0


def test_resume_continues_exactly(tmp_path):
    data = _data(tmp_path, train=8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--data", str(data), "--epochs", "2", "--save-every", "1", "--keep-checkpoints", "5", *TRAIN]
    assert main(["puzzle", "train", "--out-dir", str(straight), *common]) == 0
    assert main(["puzzle", "train", "--out-dir", str(resumed), *common, "--resume-from-ckpt",
                 str(straight / "checkpoints" / "step-00000002")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "a resumed run diverged from the straight one"
    # the reference loop resumes the fast step's checkpoint to the same weights (it computes the same)
    reference = tmp_path / "reference"
    assert main(["puzzle", "train", "--out-dir", str(reference), *common, "--no-fast-step", "--resume-from-ckpt",
                 str(straight / "checkpoints" / "step-00000002")]) == 0
    c = load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(a[name], c[name]) for name in a), "the reference loop diverged from the fast step"


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_bad_input_is_one_line(tmp_path, capsys):
    data = _data(tmp_path)
    _one_line_error(capsys, ["puzzle", "train", "--out-dir", str(tmp_path / "m")], "puzzle train", "--data")
    _one_line_error(capsys, ["puzzle", "eval", "--model-path", str(tmp_path)], "--data")
    _one_line_error(capsys, ["puzzle"], "generate, train or eval")
    _one_line_error(capsys, ["puzzle", "train", "--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "m")],
                    "no puzzle file", "puzzle generate")
    # a file of another task
    from safetensors.numpy import save_file

    bad = tmp_path / "maze.safetensors"
    puzzles = tiny_puzzles(3, 1)
    save_file({name: getattr(puzzles, name) for name in ("inputs", "solutions", "puzzle_ids", "difficulty")},
              str(bad), metadata={"hierarchos_puzzles": json.dumps({**puzzles.meta, "task": "maze"})})
    _one_line_error(capsys, ["puzzle", "train", "--data", str(bad), "--out-dir", str(tmp_path / "m")], "maze")
    # a 4x4 model on 9x9 puzzles
    out = tmp_path / "model"
    assert main(["puzzle", "train", "--data", str(data), "--out-dir", str(out), "--max-steps", "1", *TRAIN]) == 0
    capsys.readouterr()
    grid = np.array([(r * 3 + r // 3 + c) % 9 + 1 for r in range(9) for c in range(9)], dtype=np.uint8)
    puzzle = grid.copy()
    puzzle[:40] = 0
    nine = PuzzleSet(puzzle[None], grid[None], np.zeros(1, np.int32), np.zeros(1, np.float32),
                     {"task": "sudoku", "size": 9, "split": "test", "seed": 0, "format_version": 1})
    save_puzzles(tmp_path / "nine.safetensors", nine)
    _one_line_error(capsys, ["puzzle", "eval", "--model-path", str(out), "--data", str(tmp_path / "nine.safetensors")],
                    "9x9", "4x4")
    # not a puzzle model: a language model directory, and no model at all
    lm_dir = tmp_path / "lm"
    from hierarchos.io import save_model_dir

    save_model_dir(lm_dir, HierarchosLM(tiny_config()))
    _one_line_error(capsys, ["puzzle", "eval", "--model-path", str(lm_dir), "--data", str(data)], "puzzle train")
    _one_line_error(capsys, ["puzzle", "eval", "--model-path", str(tmp_path / "none"), "--data", str(data)],
                    "not found")
    _one_line_error(capsys, ["puzzle", "train", "--data", str(data), "--out-dir", str(out), "--batch-size", "0"],
                    "--batch-size")
    _one_line_error(capsys, ["puzzle", "train", "--data", str(data), "--out-dir", str(out), "--device", "cpu",
                             "--cuda-graphs"], "--cuda-graphs", "CUDA")
    _one_line_error(capsys, ["puzzle", "train", "--data", str(data), "--out-dir", str(tmp_path / "w"),
                             "--window-size", "8", "--tiny"], "--window-size")


@pytest.mark.parametrize("arch", [dict(halting="q"), dict(h_block="attention", l_block="attention")])
def test_training_runs_with_q_pondering_and_attention_blocks(arch):
    """The manager's own Q halting (its loss terms reach the segment loss through lm_loss) and
    attention stacks (KV caches carried from segment to segment) train like the default model."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    puzzles = tiny_puzzles(4, seed)
    model = tiny_model(num_ids=4, max_segments=2, **arch)
    trainer = _trainer(model, puzzles)
    tensors = [torch.from_numpy(a.astype(np.int64)) for a in (puzzles.inputs, puzzles.solutions, puzzles.puzzle_ids)]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    record = trainer.train_batch(*tensors)
    assert np.isfinite(record["loss"]) and trainer.updates == 2, f"seed {seed}"
    if "halting" in arch:
        out = model(tensors[0], tensors[2], model.init_state(4))
        _, parts = model.cell_loss(out, tensors[1], torch.ones(4, dtype=torch.bool))
        assert "q_halt" in parts  # the manager's Q loss is part of the objective
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert "q_head.weight" in moved and "cell_position" in moved and any(n.startswith("lm.reasoner") for n in moved)


@pytest.mark.slow
def test_bench_puzzles_tiny_smoke(tmp_path):
    """bench/bench_puzzles.py --tiny end to end: three models trained, the baseline's parameter count
    matched to hierarchos's, the JSON written with every model's metrics."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_puzzles.py"
    spec = importlib.util.spec_from_file_location("bench_puzzles", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--device", "cpu", "--train-puzzles", "24", "--test-puzzles", "12", "--steps", "2",
                       "--batch-size", "8", "--workers", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"hierarchos-rwkv7", "hierarchos-attention", "transformer"}
    target, matched = results["hierarchos-rwkv7"]["parameters"], results["transformer"]["parameters"]
    assert abs(matched - target) / target < 0.1, (matched, target)
    for r in results.values():
        assert r["puzzles"] == 12 and r["steps"] == 2 and len(r["exact_by_segment"]) == 2
        assert 0.0 <= r["exact"] <= 1.0 and 1.0 <= r["mean_segments"] <= 2.0


def test_generate_is_wired_into_the_puzzle_command(tmp_path):
    from hierarchos.puzzles.dataset import load_puzzles

    out = tmp_path / "gen"
    assert main(["puzzle", "generate", "--out", str(out), "--size", "4", "--train", "6", "--test", "4",
                 "--no-progress", "--seed", str(fresh_seed() % 1000)]) == 0
    train, test = load_puzzles(out / "train.safetensors"), load_puzzles(out / "test.safetensors")
    assert len(train) == 6 and len(test) == 4 and train.size == 4
    assert sorted(train.puzzle_ids.tolist()) == list(range(1, 7)) and not test.puzzle_ids.any()


def test_puzzle_models_keep_hierarchos_wiring_unless_told(tmp_path):
    """The puzzle model's default wiring is hierarchos' own (its runs on record used it), --tiny too;
    --time-mix-wiring x070 and a single --tm-* flag reach the trained model's config."""
    from hierarchos.io import read_config

    data = _data(tmp_path)
    wirings = {}
    for name, flags in (("default", []), ("x070", ["--time-mix-wiring", "x070"]),
                        ("one_switch", ["--tm-gate", "lowrank"])):
        out = tmp_path / name
        assert main(["puzzle", "train", "--data", str(data), "--out-dir", str(out), "--max-steps", "1", *TRAIN,
                     *flags]) == 0
        cfg, _ = read_config(out)
        wirings[name] = (cfg.time_mix_wiring(), cfg.tm_gate)
    assert wirings == {"default": ("hierarchos", "sigmoid_full"), "x070": ("x070", "lowrank"),
                       "one_switch": (None, "lowrank")}
