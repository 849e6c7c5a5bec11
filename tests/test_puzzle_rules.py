"""The rules of hierarchos.model.puzzle against oracles written from them (not from the model's output).

What they hold: the vocabulary (blank + n digits + PUZZLE; a maze's tokens + PUZZLE), every check of
PuzzleConfig.validate at its boundary with its one-line message, from_dict's refusals, the LM config of a
puzzle model, the solver's construction (seed 003's Q head start, position vectors, per-puzzle table),
one segment recomputed by hand (the sequence [PUZZLE] + cells, the position and puzzle vectors added to
the input embeddings, the answer logits sliced from the LM's, the Q head on the last round's carried
output), the cell losses as cross-entropy written out, and the default 9x9 architecture's size as the
recorded benchmark measured it.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model.losses import LossWeights, lm_loss
from hierarchos.model.puzzle import (IGNORE, PuzzleConfig, PuzzleOutput, PuzzleSolver, cell_predictions,
                                     default_puzzle_base, plain_cell_loss, puzzle_model_config, vocab_size)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def solver(puzzle: PuzzleConfig, **arch) -> PuzzleSolver:
    return PuzzleSolver(puzzle_model_config(puzzle, tiny_config(use_rosa=False, **arch)), puzzle)


# ---- vocabulary and config ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 9])
def test_sudoku_vocabulary_is_blank_digits_and_puzzle(n):
    assert vocab_size(n) == 1 + n + 1
    cfg = PuzzleConfig(size=n)
    assert cfg.num_tokens == n + 1  # filled in for Sudoku when not given
    assert (cfg.vocab_size, cfg.puzzle_token, cfg.answer_offset, cfg.num_answers) == (n + 2, n + 1, 1, n)
    assert (cfg.cells, cfg.seq_len) == (n * n, n * n + 1)


def test_a_maze_config_keeps_its_token_count_unset_until_given():
    assert PuzzleConfig(task="maze", size=6).num_tokens is None
    assert PuzzleConfig(task="maze", size=6, num_tokens=7).num_tokens == 7
    assert PuzzleConfig(size=4, num_tokens=5).num_tokens == 5  # given: kept as given


def test_defaults():
    cfg = PuzzleConfig()
    assert (cfg.size, cfg.num_puzzle_ids, cfg.max_segments, cfg.halt_explore_prob, cfg.task) == (9, 0, 8, 0.1, "sudoku")
    assert cfg.validate() is cfg


@pytest.mark.parametrize("fields, message", [
    ({"task": "chess"}, "puzzle config field 'task' = 'chess': must be one of sudoku, maze"),
    ({"size": 0}, "puzzle config field 'size' = 0: must be an integer >= 1"),
    ({"size": True}, "puzzle config field 'size' = True: must be an integer >= 1"),
    ({"size": 4.0, "num_tokens": 5}, "puzzle config field 'size' = 4.0: must be an integer >= 1"),
    ({"num_puzzle_ids": -1}, "puzzle config field 'num_puzzle_ids' = -1: must be an integer >= 0"),
    ({"num_puzzle_ids": False}, "puzzle config field 'num_puzzle_ids' = False: must be an integer >= 0"),
    ({"num_puzzle_ids": 1.5}, "puzzle config field 'num_puzzle_ids' = 1.5: must be an integer >= 0"),
    ({"max_segments": 0}, "puzzle config field 'max_segments' = 0: must be an integer >= 1"),
    ({"max_segments": "8"}, "puzzle config field 'max_segments' = '8': must be an integer >= 1"),
    ({"size": 5}, "puzzle config field 'size' = 5: a Sudoku model's grid must be 4 or 9"),
    ({"size": 4, "num_tokens": 6}, "puzzle config field 'num_tokens' = 6: a 4x4 Sudoku has 5 cell tokens (blank + digits)"),
    ({"task": "maze", "size": 3, "num_tokens": 5},
     "puzzle config field 'size' = 3: a maze model's grid must be 4 or more cells a side"),
    ({"task": "maze", "size": 6},
     "puzzle config field 'num_tokens' = None: a maze model needs its data file's cell token count (an integer >= 2)"),
    ({"task": "maze", "size": 6, "num_tokens": 1},
     "puzzle config field 'num_tokens' = 1: a maze model needs its data file's cell token count (an integer >= 2)"),
    ({"task": "maze", "size": 6, "num_tokens": True},
     "puzzle config field 'num_tokens' = True: a maze model needs its data file's cell token count (an integer >= 2)"),
    ({"task": "maze", "size": 6, "num_tokens": 5.0},
     "puzzle config field 'num_tokens' = 5.0: a maze model needs its data file's cell token count (an integer >= 2)"),
    ({"halt_explore_prob": -0.01}, "puzzle config field 'halt_explore_prob' = -0.01: must be in [0, 1]"),
    ({"halt_explore_prob": 1.01}, "puzzle config field 'halt_explore_prob' = 1.01: must be in [0, 1]"),
    ({"halt_explore_prob": True}, "puzzle config field 'halt_explore_prob' = True: must be in [0, 1]"),
    ({"halt_explore_prob": "0.1"}, "puzzle config field 'halt_explore_prob' = '0.1': must be in [0, 1]"),
])
def test_validate_refuses_each_bad_field_in_one_line(fields, message):
    with pytest.raises(HierarchosError) as err:
        PuzzleConfig(**fields).validate()
    assert str(err.value) == message


@pytest.mark.parametrize("fields", [
    {"size": 4, "num_puzzle_ids": 0, "max_segments": 1, "halt_explore_prob": 0.0},
    {"size": 9, "num_puzzle_ids": 1, "max_segments": 16, "halt_explore_prob": 1.0},
    {"size": 4, "halt_explore_prob": 1},  # an int probability is a probability
    {"task": "maze", "size": 4, "num_tokens": 2},  # the smallest maze and token count
    {"task": "maze", "size": 30, "num_tokens": 5, "halt_explore_prob": 0},
])
def test_validate_accepts_the_edges(fields):
    cfg = PuzzleConfig(**fields)
    assert cfg.validate() is cfg


def test_from_dict_round_trips_and_refuses_what_is_not_a_puzzle_config():
    cfg = PuzzleConfig(task="maze", size=6, num_tokens=5, num_puzzle_ids=3, max_segments=2, halt_explore_prob=0.5)
    assert cfg.to_dict() == {"size": 6, "num_puzzle_ids": 3, "max_segments": 2, "halt_explore_prob": 0.5,
                             "task": "maze", "num_tokens": 5}
    assert PuzzleConfig.from_dict(cfg.to_dict(), "here") == cfg
    # configs saved before mazes have no task or token count: a Sudoku with n + 1 tokens
    assert PuzzleConfig.from_dict({"size": 4}, "here").num_tokens == 5
    for data in (None, [], "puzzle"):
        with pytest.raises(HierarchosError) as err:
            PuzzleConfig.from_dict(data, "runs/x")
        assert str(err.value) == ("runs/x: no puzzle settings (not a puzzle model); train one with "
                                  "`hierarchos puzzle train`")
    with pytest.raises(HierarchosError) as err:
        PuzzleConfig.from_dict({"size": 4, "zeta": 1, "alpha": 2}, "runs/x")
    assert str(err.value) == "runs/x: unknown puzzle config fields alpha, zeta; re-train with this hierarchos"
    with pytest.raises(HierarchosError, match="'size' = 5"):  # validated
        PuzzleConfig.from_dict({"size": 5}, "runs/x")


def test_the_lm_config_of_a_puzzle_model():
    base = tiny_config(use_rosa=True, max_length=64)
    cfg = puzzle_model_config(PuzzleConfig(size=4, max_segments=3), base)  # 17 x 3 = 51 < 64: the base's
    assert (cfg.vocab_size, cfg.use_rosa, cfg.max_length) == (6, False, 64)
    cfg = puzzle_model_config(PuzzleConfig(size=4, max_segments=5), base)  # 17 x 5 = 85 > 64
    assert cfg.max_length == 85
    assert cfg.replace(vocab_size=base.vocab_size, use_rosa=True, max_length=64) == base  # nothing else changed


def test_default_base_is_the_recorded_9x9_model():
    base = default_puzzle_base()
    # the 9x9 Sudoku vocabulary, two H-cycles, no ROSA (the puzzle model cannot carry its host automata)
    assert (base.vocab_size, base.h_cycles, base.use_rosa) == (11, 2, False)
    assert base.validate() == base
    # sizes as the recorded H200 run built them (bench/records/puzzles_9x9_h200_cut.log: "hierarchos-rwkv7:
    # 5,705,510 parameters (without the per-puzzle table)", bench_puzzles' core_parameters)
    puzzle = PuzzleConfig(num_puzzle_ids=2)
    model = PuzzleSolver(puzzle_model_config(puzzle, base), puzzle)
    table = model.puzzle_embedding.table.weight
    assert sum(p.numel() for p in model.parameters() if p is not table) == 5_705_510


# ---- the solver -----------------------------------------------------------------------------------

def test_the_solver_refuses_an_lm_config_not_made_for_its_puzzles():
    puzzle = PuzzleConfig(size=4)
    for cfg in (tiny_config(use_rosa=False), tiny_config(use_rosa=True, vocab_size=6)):
        with pytest.raises(HierarchosError) as err:
            PuzzleSolver(cfg, puzzle)
        assert str(err.value) == (f"puzzle model: the config has vocab_size {cfg.vocab_size} and use_rosa "
                                  f"{cfg.use_rosa}; a 4x4 sudoku model needs 6 and false (build it with "
                                  "puzzle_model_config)")
    with pytest.raises(HierarchosError, match="'size' = 5"):  # the puzzle config is validated
        PuzzleSolver(tiny_config(use_rosa=False, vocab_size=7), PuzzleConfig(size=5, num_tokens=6))


def test_the_solver_starts_as_seed_003_does():
    torch.manual_seed(fresh_seed())
    model = solver(PuzzleConfig(size=4, num_puzzle_ids=3), context_dim=32, h_hidden=32, l_hidden=32)
    # Q head: zero weights, both biases -5 (halt == continue: nobody halts early)
    assert torch.equal(model.q_head.weight, torch.zeros(2, 32))
    assert torch.equal(model.q_head.bias, torch.full((2,), -5.0))
    # one learned position vector per segment position, N(0, 0.02^2)
    assert model.cell_position.shape == (17, 32) and model.cell_position.requires_grad
    assert 0.015 < model.cell_position.std().item() < 0.025
    assert model.puzzle_embedding.table.weight.shape == (4, 32)
    assert model.puzzle_token == 5
    assert model.cfg is model.lm.cfg and model.memory is model.lm.memory
    assert solver(PuzzleConfig(size=4)).puzzle_embedding is None


def test_init_state_is_the_lms_with_its_dtype_and_device():
    model = solver(PuzzleConfig(size=4))
    for kwargs in ({}, {"dtype": torch.float64}, {"device": "meta"}):
        got, want = model.init_state(3, **kwargs), model.lm.init_state(3, **kwargs)
        got_leaves, want_leaves = list(got.tensors()), list(want.tensors())
        assert len(got_leaves) == len(want_leaves) > 0
        for (name, a), (_, b) in zip(got_leaves, want_leaves):
            assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device), name


def test_tokens_are_the_puzzle_token_then_the_cells():
    model = solver(PuzzleConfig(size=4))
    cells = torch.arange(32, dtype=torch.uint8).reshape(2, 16) % 5
    tokens = model.tokens(cells)
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [[5] + row for row in cells.long().tolist()]


def test_a_segment_by_hand():
    """The LM run on [PUZZLE] + cells with cell_position (+ the puzzle's vector at position 0) added to its
    input embeddings; answer logits = the LM's at the cells, answer tokens only; Q = head(out_norm(last
    round's carried output))."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    for puzzle in (PuzzleConfig(size=4, num_puzzle_ids=3, max_segments=2),
                   PuzzleConfig(task="maze", size=4, num_tokens=5, num_puzzle_ids=0, max_segments=2)):
        model = solver(puzzle).double().eval()
        with torch.no_grad():
            for p in (model.q_head.weight, model.q_head.bias, model.cell_position):
                p.copy_(torch.randn_like(p))
            if model.puzzle_embedding is not None:
                model.puzzle_embedding.table.weight.copy_(torch.randn_like(model.puzzle_embedding.table.weight))
        cells = torch.randint(0, puzzle.num_tokens, (3, 16))
        ids = torch.tensor([0, 2, 3]) if puzzle.num_puzzle_ids else torch.zeros(3, dtype=torch.long)
        with torch.no_grad():
            state = model.init_state(3, dtype=torch.float64)
            first = model(cells, ids, state)
            second = model(cells, ids, first.state)  # a second segment from the first's state
            # the oracle: the same LM, its embedding output with the vectors added by hand
            tokens = torch.cat([torch.full((3, 1), puzzle.puzzle_token), cells], dim=1)
            added = model.cell_position.expand(3, -1, -1).clone()
            if model.puzzle_embedding is not None:
                added[:, 0] += model.puzzle_embedding.table.weight[ids]
            handle = model.lm.embed.register_forward_hook(lambda m, a, out: out + added)
            try:
                want_first = model.lm(tokens, model.init_state(3, dtype=torch.float64))
                want_second = model.lm(tokens, want_first.state)
            finally:
                handle.remove()
        lo, hi = puzzle.answer_offset, puzzle.num_tokens
        for got, want in ((first, want_first), (second, want_second)):
            assert got.logits.shape == (3, 16, puzzle.num_answers)
            torch.testing.assert_close(got.logits, want.logits[:, 1:, lo:hi], msg=f"seed {seed}")
            assert got.lm_out is not None and got.state is got.lm_out.state
            carried = want.state.rounds[-1]["last_out"]  # h_cycles = 2: the second round's
            q = model.q_head(model.lm.out_norm(carried))
            assert got.q_halt.dtype == torch.float32
            torch.testing.assert_close(got.q_halt, q[:, 0].float(), msg=f"seed {seed}")
            torch.testing.assert_close(got.q_continue, q[:, 1].float(), msg=f"seed {seed}")
        # the rounds differ, so the Q head reads the last one and not the first
        assert not torch.allclose(want_first.state.rounds[0]["last_out"], want_first.state.rounds[-1]["last_out"])
        # after the segment the hook adds nothing again
        assert model._injected is None
        with torch.no_grad():
            plain = model.lm.embed(tokens)
        assert torch.equal(plain, F.embedding(tokens, model.lm.embed.weight))


def test_a_segment_refuses_a_grid_of_another_size():
    model = solver(PuzzleConfig(size=4))
    with pytest.raises(HierarchosError) as err:
        model(torch.zeros(2, 9, dtype=torch.long), torch.zeros(2, dtype=torch.long), model.init_state(2))
    assert str(err.value) == "puzzle model for 4x4 grids got 9 cells per puzzle"
    assert model._injected is None


def test_the_injection_is_cleared_when_the_lm_fails():
    model = solver(PuzzleConfig(size=4))
    with pytest.raises(Exception):
        model(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, dtype=torch.long), model.init_state(3))
    assert model._injected is None


# ---- losses ---------------------------------------------------------------------------------------

def _cross_entropy_by_hand(logits, targets):
    """Mean over the (row, class) pairs given of -log softmax."""
    logp = logits.double().log_softmax(-1)
    picked = [-logp[r, c] for r, c in targets]
    return torch.stack(picked).mean()


def test_cell_loss_targets_every_cell_of_the_active_puzzles_only():
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = solver(PuzzleConfig(size=4, max_segments=2))
    cells = torch.randint(0, 5, (3, 16))
    solutions = torch.randint(1, 5, (3, 16), dtype=torch.uint8)
    active = torch.tensor([True, False, True])
    out = model(cells, torch.zeros(3, dtype=torch.long), model.init_state(3))
    weights = LossWeights(ponder=0.3, commitment=0.2)
    loss, parts = model.cell_loss(out, solutions, active, weights)
    full = out.lm_out.logits.detach()  # (B, 17, V): the LM's own logits, targets are full-vocabulary ids
    pairs = [(full[b, 1 + i], int(solutions[b, i])) for b in (0, 2) for i in range(16)]
    want_ce = _cross_entropy_by_hand(torch.stack([p[0] for p in pairs]), list(enumerate(p[1] for p in pairs)))
    torch.testing.assert_close(parts["ce"].double(), want_ce, rtol=1.3e-6, atol=1e-5, msg=f"seed {seed}")  # float32 CE
    targets = torch.full((3, 17), IGNORE)
    targets[0, 1:], targets[2, 1:] = solutions[0].long(), solutions[2].long()
    want_loss, _ = lm_loss(out.lm_out, targets, model.cfg.z_loss_weight, weights)
    torch.testing.assert_close(loss, want_loss)
    default_loss, _ = model.cell_loss(out, solutions, active)
    torch.testing.assert_close(default_loss, lm_loss(out.lm_out, targets, model.cfg.z_loss_weight)[0])


@pytest.mark.parametrize("offset", [1, 0])
def test_plain_cell_loss_is_cross_entropy_over_the_answers_of_active_puzzles(offset):
    seed = fresh_seed()
    torch.manual_seed(seed)
    logits = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    solutions = torch.randint(offset, 5 + offset, (3, 4), dtype=torch.uint8)
    active = torch.tensor([False, True, True])
    out = PuzzleOutput(logits=logits, q_halt=torch.zeros(3), q_continue=torch.zeros(3), state=None)
    ce, parts = plain_cell_loss(out, solutions, active, answer_offset=offset)
    rows = logits.detach()[1:].reshape(-1, 5)
    want = _cross_entropy_by_hand(rows, list(enumerate((solutions[1:].reshape(-1).long() - offset).tolist())))
    # computed in float32 whatever the logits: float32's tolerances (float64's failed 10 of 6,000 draws)
    torch.testing.assert_close(ce.double(), want, rtol=1.3e-6, atol=1e-5, msg=f"seed {seed}")
    assert ce.dtype == torch.float32
    assert torch.equal(parts["ce"], ce.detach()) and not parts["ce"].requires_grad
    ce.backward()  # the inactive puzzle gets no gradient
    assert torch.equal(logits.grad[0], torch.zeros(4, 5)) and logits.grad[1:].abs().sum() > 0


def test_plain_cell_loss_default_offset_is_sudokus():
    logits = torch.zeros(1, 1, 3)
    logits[0, 0, 0] = 5.0  # index 0 = digit 1
    out = PuzzleOutput(logits=logits, q_halt=torch.zeros(1), q_continue=torch.zeros(1), state=None)
    ce, _ = plain_cell_loss(out, torch.tensor([[1]]), torch.tensor([True]))
    assert ce.item() == pytest.approx(-torch.log_softmax(logits[0, 0], -1)[0].item())


def test_cell_predictions_are_the_argmax_answer_as_a_token():
    logits = torch.tensor([[[0.1, 0.9, 0.0], [2.0, -1.0, 1.0], [0.0, 0.0, 3.0]]])
    assert cell_predictions(logits).tolist() == [[2, 1, 3]]
    assert cell_predictions(logits, answer_offset=0).tolist() == [[1, 0, 2]]


def test_the_default_puzzle_model_is_the_one_readme_describes():
    """README ("Reasoning puzzles"): width 256, 2 + 2 RWKV-7 blocks of head size 64, 2 H-cycles, up to 2
    pondering and 2 worker passes, a plan point every 4 cells, a 64-slot memory (key and value 64, top-4
    reads, written every 16 tokens), ROSA off. The budget fields add no parameters, so only this pins them."""
    c = default_puzzle_base()
    assert (c.context_dim, c.h_hidden, c.l_hidden, c.h_layers, c.l_layers, c.head_size) == (256, 256, 256, 2, 2, 64)
    assert (c.h_cycles, c.max_h_steps, c.max_l_steps, c.h_stride) == (2, 2, 2, 4)
    assert (c.ltm_slots, c.ltm_key_dim, c.ltm_val_dim, c.ltm_topk, c.ltm_chunk) == (64, 64, 64, 4, 16)
    assert c.use_rosa is False and c.persistent_dim == 32
