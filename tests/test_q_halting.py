"""Q-learning halting (`halting="q"`, seed 003) in model/hrm.py and its loss in model/losses.py.

Hand oracles with stubbed stacks and a stubbed Q head (fixed halt/continue logits per pass): the
halting pass (halt > continue, strictly, or the cap), the plan = that pass's output, halted points
frozen in later passes, the bootstrapped continue targets and the halt targets (argmax right) of
the Q loss, exploration (off in eval, a seeded minimum of passes in training). Then the whole-model
guarantees (DESIGN.md 3.5) with halting="q": parallel == step in eval with points that really
halt early, causality, every parameter gets a gradient; and the CLI trains and chats with it.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM
from hierarchos.model.hrm import HierarchicalReasoner
from hierarchos.model.losses import LossWeights, lm_loss, q_halt_loss

from early_exit import model_tokens

REPO = Path(__file__).resolve().parents[1]


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


class PassStub(nn.Module):
    """Stands in for a stack: pass p returns the unit vector e_p at every point, and records its call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def init_state(self, *args, **kwargs):
        return {}

    def forward(self, x, tokens, state, frozen=None):
        p = len(self.calls)
        self.calls.append(None if frozen is None else frozen.clone())
        out = torch.zeros_like(x)
        out[..., p] = 1.0
        return out, state


class QStub(nn.Module):
    """Q head: pass p gives plan point j the logits (halt, continue) = table[p][j], whatever the input."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float64)  # (passes, points, 2)
        self.n = 0

    def forward(self, z):
        logits = self.table[self.n]
        self.n += 1
        return logits.to(z.dtype)[None].expand(z.shape[0], -1, -1)


def reasoner(**overrides):
    torch.manual_seed(0)
    return HierarchicalReasoner(tiny_config(halting="q", **overrides)).double()


def stubbed(table, **overrides):
    model = reasoner(max_h_steps=len(table), **overrides)
    model.manager = PassStub()
    model.h_q_head = QStub(table)
    model.h_to_context = nn.Identity()
    return model


def ponder(model, batch, n_points, totals=None):
    totals = {} if totals is None else totals
    z = torch.zeros(batch, n_points, 16, dtype=torch.float64)
    plans, _, halt_logit = model._ponder_q(z, torch.zeros(batch, n_points, dtype=torch.long),
                                           model.init_state(batch)[0]["ponder"], model.cfg.max_h_steps, False,
                                           totals)
    return plans, halt_logit, totals


# 4 passes, 4 plan points; entries (halt, continue):
#   point 0: halt > continue first at pass 2 -> halts at 2
#   point 1: at pass 1 -> halts at 1
#   point 2: never -> the cap, pass 4
#   point 3: halt == continue at passes 1-3 (not "greater") -> the cap, pass 4
TABLE = [
    [[-1.0, 0.5], [2.0, -1.0], [0.0, 1.0], [0.3, 0.3]],
    [[1.5, 0.5], [0.0, 3.0], [-2.0, 1.0], [0.7, 0.7]],
    [[0.2, 0.9], [-1.0, 0.0], [-0.5, 2.0], [-0.4, -0.4]],
    [[0.4, 0.1], [0.6, 0.2], [-3.0, 0.5], [1.0, 2.0]],
]
HALT_PASS = [2, 1, 4, 4]


def test_halting_pass_plan_and_manager_steps_by_hand():
    batch = 2
    model = stubbed(TABLE)
    plans, halt_logit, totals = ponder(model, batch, 4)
    for j, h in enumerate(HALT_PASS):
        expected = [0.0] * 16
        expected[h - 1] = 1.0  # the plan is the halting pass's output, no mix
        for b in range(batch):
            assert plans[b, j].tolist() == expected, j
            assert halt_logit[b, j].item() == TABLE[h - 1][j][0]  # the halt logit of the halting pass
    assert float(totals["manager_steps"][0]) == batch * (2 + 1 + 4 + 4)
    assert totals["manager_steps"][1] == batch * 4
    assert "ponder" not in totals  # no Graves expected steps under Q halting


def test_halted_points_are_frozen_in_later_passes_and_the_step_form_stops():
    model = stubbed(TABLE)
    ponder(model, 1, 4)
    assert model.manager.calls[0] is None  # the first pass runs every point
    assert model.manager.calls[1].tolist() == [[False, True, False, False]]
    assert model.manager.calls[2].tolist() == [[True, True, False, False]]
    assert model.manager.calls[3].tolist() == [[True, True, False, False]]
    # one plan point (the step form): no pass after it halted
    single = stubbed([[[0.0, 1.0]], [[2.0, 1.0]], [[5.0, 0.0]], [[5.0, 0.0]]])
    plans, _, totals = ponder(single, 1, 1)
    assert len(single.manager.calls) == 2
    assert plans[0, 0, :4].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert float(totals["manager_steps"][0]) == 2.0


def bce(logit, target):
    """Binary cross-entropy with logits, from its definition."""
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_continue_targets_are_the_next_pass_best_q_by_hand():
    """Seed 003: the continue logit of a pass that went on is trained towards sigmoid(max(halt, continue))
    of the next pass, or sigmoid(halt) of the next pass when that pass is the cap. Written out for TABLE:
      point 0 (halts at 2): continue 0.5 at pass 1 -> pass 2's max(1.5, 0.5) = 1.5
      point 1 (halts at 1): nothing
      point 2 (cap): continue 1.0 at pass 1 -> max(-2, 1) = 1; 1.0 at pass 2 -> max(-0.5, 2) = 2;
                     2.0 at pass 3 -> pass 4 is the cap: its halt logit -3.0
      point 3 (cap): 0.3 -> 0.7; 0.7 -> -0.4; -0.4 -> the cap: halt 1.0"""
    terms = [
        bce(0.5, sigmoid(1.5)),
        bce(1.0, sigmoid(1.0)), bce(1.0, sigmoid(2.0)), bce(2.0, sigmoid(-3.0)),
        bce(0.3, sigmoid(0.7)), bce(0.7, sigmoid(-0.4)), bce(-0.4, sigmoid(1.0)),
    ]
    _, _, totals = ponder(stubbed(TABLE), 2, 4)
    total, count = totals["q_continue"]
    assert float(total) == pytest.approx(2 * sum(terms), abs=1e-12)
    assert count == 2 * 4


def test_halt_targets_are_whether_the_argmax_is_right_by_hand():
    """Two rounds, T = 6, stride 2 (plan points 1, 3, 5 lead tokens 2-3 and 4-5; tokens 0-1 have none in
    the call). Predictions: argmax right at tokens 2, 5; wrong at 3, 4; token 5's target ignored.
    Per token: BCE(halt logit of its plan point, right), averaged over the counted (token, round) pairs."""
    V, ignore = 5, -100
    predicted = [0, 1, 2, 3, 4, 0]
    targets = torch.tensor([[0, 1, 2, 0, 0, ignore]])
    logits = torch.zeros(1, 6, V, dtype=torch.float64)
    for t, k in enumerate(predicted):
        logits[0, t, k] = 1.0
    leads = torch.tensor([False, False, True, True, True, True])
    halt = torch.tensor([[[9.0, 9.0, 0.5, 0.5, -1.0, -1.0]], [[9.0, 9.0, 2.0, 2.0, 0.0, 0.0]]], dtype=torch.float64)
    out = SimpleNamespace(logits=logits, q_halt=(halt, leads))
    # counted: tokens 2 (right), 3 (wrong), 4 (wrong), both rounds
    expected = (bce(0.5, 1) + bce(0.5, 0) + bce(-1.0, 0) + bce(2.0, 1) + bce(2.0, 0) + bce(0.0, 0)) / 6
    assert float(q_halt_loss(out, targets, ignore)) == pytest.approx(expected, abs=1e-12)
    # the same as the plan point's BCE against its accuracy over the tokens it leads (BCE is linear in its target)
    per_point = (2 * bce(0.5, 0.5) + bce(-1.0, 0) + 2 * bce(2.0, 0.5) + bce(0.0, 0)) / 6
    assert float(q_halt_loss(out, targets, ignore)) == pytest.approx(per_point, abs=1e-12)


@pytest.mark.parametrize("T,stride,pos0,expected_point", [
    (9, 3, 0, [None, None, None, 0, 0, 0, 1, 1, 1]),   # plan points 2, 5, 8
    (5, 3, 4, [None, None, 0, 0, 0]),                  # positions 4..8: plan points 5, 8
    (4, 2, 0, [None, None, 0, 0]),
])
def test_each_token_gets_the_halt_logit_of_the_latest_plan_point_strictly_before_it(T, stride, pos0, expected_point):
    model = reasoner(h_stride=stride, max_l_steps=0)
    n_points = sum(1 for g in range(pos0, pos0 + T) if (g + 1) % stride == 0)
    point_logits = torch.tensor([[10.0 * (j + 1) for j in range(n_points)]], dtype=torch.float64)
    model._ponder_q = lambda z, tokens, states, *a: (torch.zeros(z.shape[0], z.shape[1], 16, dtype=z.dtype),
                                                     states, point_logits)
    q_halt = []
    model._round(torch.zeros(1, T, 16, dtype=torch.float64), torch.zeros(1, T, dtype=torch.long),
                 model.init_state(1)[0], None, pos0, 1, 0, 1.0, {}, q_halt=q_halt)
    (logit, leads), = q_halt
    assert leads.tolist() == [j is not None for j in expected_point]
    for t, j in enumerate(expected_point):
        if j is not None:
            assert logit[0, t].item() == 10.0 * (j + 1), t


# ---- exploration ------------------------------------------------------------------------------
HALT_AT_ONCE = [[[1.0, 0.0]] * 8] * 5  # every point's Q says "halt" at every pass


def test_exploration_is_off_in_eval():
    model = stubbed(HALT_AT_ONCE, q_explore_prob=1.0).eval()
    _, _, totals = ponder(model, 3, 8)
    assert float(totals["manager_steps"][0]) == 3 * 8  # every point halts at its first pass


def test_exploration_in_training_honours_a_seeded_random_minimum():
    """With q_explore_prob = 1 every point draws its minimum in [2, max_h_steps] (seed 003) and, its Q
    saying "halt" from the start, halts exactly there; the draws follow the seed."""
    seed = fresh_seed()
    n, batch, points = 5, 4, 8
    model = stubbed(HALT_AT_ONCE, q_explore_prob=1.0).train()
    torch.manual_seed(seed)
    _, _, totals = ponder(model, batch, points)
    torch.manual_seed(seed)
    torch.rand(batch, points)  # the draw that decides who explores (all of them here)
    expected = torch.randint(2, n + 1, (batch, points))
    frozen_after = [c for c in model.manager.calls[1:]]
    for p, frozen in enumerate(frozen_after, start=1):  # frozen before pass p+1: minimum reached by pass p
        assert frozen.tolist() == (expected <= p).tolist(), f"seed={seed} pass {p + 1}"
    assert float(totals["manager_steps"][0]) == float(expected.sum()), f"seed={seed}"
    assert set(expected.flatten().tolist()) <= set(range(2, n + 1))


def test_exploration_minimum_does_not_stop_a_point_that_wants_more():
    """The minimum only delays halting: a point whose Q says halt at pass 4 still halts at 4 when its
    minimum is 2; with probability 0 training halts as eval does."""
    table = [[[0.0, 1.0]]] * 3 + [[[1.0, 0.0]]] + [[[1.0, 0.0]]]
    model = stubbed(table, q_explore_prob=1.0).train()
    torch.manual_seed(fresh_seed())
    _, _, totals = ponder(model, 6, 1)
    assert float(totals["manager_steps"][0]) >= 6 * 4
    model = stubbed(HALT_AT_ONCE, q_explore_prob=0.0).train()
    _, _, totals = ponder(model, 2, 8)
    assert float(totals["manager_steps"][0]) == 2 * 8


def test_config_validates_the_halting_fields():
    with pytest.raises(HierarchosError, match="halting"):
        tiny_config(halting="graves")
    with pytest.raises(HierarchosError, match="q_explore_prob"):
        tiny_config(q_explore_prob=1.5)
    assert tiny_config().halting == "act"
    model = HierarchicalReasoner(tiny_config(halting="q"))
    assert isinstance(model.h_q_head, nn.Linear) and model.h_q_head.out_features == 2
    assert not hasattr(model, "h_halt_proj")


# ---- the whole model ------------------------------------------------------------------------
def calibrated_q(seed, dtype=torch.float64, **overrides):
    """A tiny halting="q" model whose plan points halt at different passes (as tests/early_exit.py does
    for ACT): the halt logit looks along the plan points' first principal direction, centred on their
    mean, the continue logit is 0; the drift head is spread so some tokens freeze."""
    torch.manual_seed(seed)
    cfg = tiny_config(halting="q", max_h_steps=3, l_conv_atol=0.06, **overrides)
    model = HierarchosLM(cfg).to(dtype).eval()
    seen = []
    hook = model.reasoner.h_q_head.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().flatten(0, -2)))
    with torch.no_grad():
        model(model_tokens(seed + 1, 2, 16))
        hook.remove()
        plan = torch.cat(seen)
        centred = plan - plan.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        spread = (centred @ direction).std().clamp(min=1e-6)
        head = model.reasoner.h_q_head
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0] = 2.0 * direction / spread
        head.bias[0] = -(2.0 * direction / spread) @ plan.mean(0)
        model.reasoner.l_drift_proj.weight.normal_(0, 0.3)
    return model


def run_steps(model, tokens):
    state = model.init_state(tokens.shape[0])
    logits, totals = [], {}
    for t in range(tokens.shape[1]):
        out = model.step(tokens[:, t], state)
        logits.append(out.logits)
        state = out.state
        for name, (total, count) in out.totals.items():
            s, c = totals.get(name, (0.0, 0.0))
            totals[name] = (s + total, c + count)
    return torch.stack(logits, 1), totals, state


@pytest.mark.parametrize("overrides", [{}, dict(h_cycles=1, max_l_steps=0), dict(h_stride=1, use_rosa=False),
                                       dict(h_block="attention", window_size=5)])
def test_parallel_equals_step_in_eval_with_points_halting_early(overrides):
    first = fresh_seed()
    for seed in range(first, first + 5):  # the calibration splits the halting most of the time
        model = calibrated_q(seed, **overrides)
        tokens = model_tokens(seed, 2, 19)
        with torch.no_grad():
            par = model(tokens)
        steps = float(par.aux["manager_steps"])
        if 1.0 < steps < model.cfg.max_h_steps:
            break
    else:
        raise AssertionError(f"seeds {first}..{seed}: Q halting did not split: {steps}")
    msg = f"seed={seed} {overrides}"
    with torch.no_grad():
        step_logits, step_totals, step_state = run_steps(model, tokens)
    torch.testing.assert_close(par.logits, step_logits, rtol=1e-9, atol=1e-9, msg=lambda m: f"{msg}: {m}")
    assert par.totals.keys() == step_totals.keys(), msg
    for name, (total, count) in par.totals.items():
        assert count == step_totals[name][1], f"{msg} count of {name}"
        torch.testing.assert_close(torch.as_tensor(total), torch.as_tensor(step_totals[name][0]),
                                   rtol=1e-9, atol=1e-9, msg=lambda m: f"{msg} {name}: {m}")
    a, b = dict(par.state.tensors()), dict(step_state.tensors())
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-9, atol=1e-9, msg=lambda m: f"{msg} {name}: {m}")


def test_training_mode_without_exploration_keeps_parallel_equal_to_step():
    """Exploration is the only thing training mode changes: with q_explore_prob = 0 the two forms agree
    in training mode too (and differ from eval in nothing)."""
    seed = fresh_seed()
    model = calibrated_q(seed, q_explore_prob=0.0).train()
    tokens = model_tokens(seed, 2, 13)
    with torch.no_grad():
        par = model(tokens)
        step_logits, step_totals, _ = run_steps(model, tokens)
        evaluated = model.eval()(tokens)
    torch.testing.assert_close(par.logits, step_logits, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(par.logits, evaluated.logits, rtol=0, atol=0, msg=lambda m: f"seed={seed}: {m}")
    assert float(par.totals["manager_steps"][0]) == float(step_totals["manager_steps"][0]), f"seed={seed}"


def test_causality():
    seed = fresh_seed()
    model = calibrated_q(seed)
    tokens = model_tokens(seed, 1, 20)
    j = random.Random(seed).randrange(1, 20)
    changed = tokens.clone()
    changed[0, j] = (changed[0, j] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a.logits[:, :j], b.logits[:, :j], rtol=0, atol=1e-12,
                               msg=lambda m: f"seed={seed} j={j}: {m}")
    assert not torch.allclose(a.logits[:, j:], b.logits[:, j:]), f"seed={seed} j={j}"
    # the halt logits of the plan points leading tokens < j do not move either (a token that no plan
    # point of this call leads, q_halt[1] false, holds a placeholder the loss masks out: the first
    # plan point's logit, which may sit at j or later)
    led = a.q_halt[1][:j]
    assert torch.equal(led, b.q_halt[1][:j])
    torch.testing.assert_close(a.q_halt[0][..., :j][..., led], b.q_halt[0][..., :j][..., led], rtol=0, atol=1e-12,
                               msg=lambda m: f"seed={seed} j={j}: {m}")


def test_every_parameter_gets_a_gradient_including_the_q_head():
    from live_paths import wake_zero_paths

    seed = fresh_seed()
    model = calibrated_q(seed).train()
    wake_zero_paths(model, seed)  # x070's init zeroes each block's exit: nothing inside would learn yet
    tokens = model_tokens(seed, 2, 25)
    out = model(tokens[:, :-1])
    loss, parts = lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight, LossWeights())
    assert {"q_halt", "q_continue"} <= parts.keys()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"seed={seed} parameters without gradient: {missing}"


def test_the_q_loss_enters_the_total_with_its_weight():
    seed = fresh_seed()
    model = calibrated_q(seed)
    tokens = model_tokens(seed, 2, 17)
    with torch.no_grad():
        out = model(tokens[:, :-1])
        with_q, parts = lm_loss(out, tokens[:, 1:], 0.0, LossWeights(q=0.5))
        without, _ = lm_loss(out, tokens[:, 1:], 0.0, LossWeights(q=0.0))
    expected = 0.5 * (float(parts["q_halt"]) + float(parts["q_continue"]))
    assert float(with_q - without) == pytest.approx(expected, rel=1e-12), f"seed={seed}"
    assert float(parts["q_continue"]) == pytest.approx(float(out.aux["q_continue"]), rel=1e-12)


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_trains_with_q_halting_and_chats(tmp_path):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbos".split()
    rng = random.Random(0)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n"
                            for _ in range(12)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HIERARCHOS_TOKEN_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "model"

    def cli(*args):
        result = subprocess.run([sys.executable, "hierarchos_cli.py", "--threads", "1", *map(str, args)], cwd=REPO,
                                env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        return result

    cli("train", "--tiny", "--tokenizer-path", "byte", "--max_length", "16", "--batch_size", "2", "--epochs", "1",
        "--seed", "0", "--device", "cpu", "--train", data, "--out-dir", out, "--max-steps", "4",
        "--halting", "q", "--q-explore-prob", "0.5", "--q-loss-weight", "0.25", "--reset-halt-bias", "2.0")
    config = json.loads((out / "hierarchos_config.json").read_text())
    assert config["halting"] == "q" and config["q_explore_prob"] == 0.5
    from safetensors.torch import load_file

    bias = load_file(out / "model.safetensors")["reasoner.h_q_head.bias"]
    # --reset-halt-bias sets the halt logit's bias (4 steps at lr 1e-4 move it a little), not the continue one's
    assert bias[0].item() == pytest.approx(2.0, abs=0.01) and bias[1].item() == pytest.approx(-5.0, abs=0.01)
    reply = cli("chat", "--model-path", out, "--prompt", "the quick", "--max-new-tokens", "4", "--device", "cpu")
    assert reply.stdout.strip() != "" or reply.returncode == 0


def test_q_head_starts_at_zero_weights_and_bias_minus_five():
    """Seed 003's initialisation: both logits sigmoid(-5) ~ 0.007 for every input at the start."""
    model = reasoner()
    assert not model.h_q_head.weight.detach().any()
    assert model.h_q_head.bias.detach().tolist() == [-5.0, -5.0]


def test_exploration_with_two_passes_forces_the_second():
    """max_h_steps = 2, q_explore_prob = 1 in training: every minimum is 2, so no point halts at pass 1."""
    table = [[[1.0, 0.0]] * 3, [[1.0, 0.0]] * 3]
    model = stubbed(table, q_explore_prob=1.0).train()
    _, _, totals = ponder(model, 2, 3)
    assert float(totals["manager_steps"][0]) == 2 * 3 * 2


def test_a_point_halting_at_its_first_pass_is_not_run_again_in_the_step_form():
    single = stubbed([[[2.0, 1.0]], [[5.0, 0.0]], [[5.0, 0.0]]])
    plans, _, _ = ponder(single, 1, 1)
    assert len(single.manager.calls) == 1 and plans[0, 0, :3].tolist() == [1.0, 0.0, 0.0]


def test_an_act_model_reports_no_q_halt():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config()).double()
    out = model(model_tokens(0, 1, 6))
    assert out.q_halt is None
    _, parts = lm_loss(out, model_tokens(1, 1, 6), 0.0)
    assert "q_halt" not in parts


def test_both_q_terms_and_the_ignore_index_reach_the_total():
    """With every point running to the cap the continue term is nonzero: the total must hold
    q * (halt + continue); and lm_loss hands its ignore_index to the halt loss."""
    torch.manual_seed(fresh_seed())
    model = HierarchosLM(tiny_config(halting="q", h_stride=2)).double().eval()
    with torch.no_grad():  # halt logits that differ per point; continue always wins, so every pass runs
        model.reasoner.h_q_head.weight.normal_(0, 0.5)
        model.reasoner.h_q_head.bias.copy_(torch.tensor([-5.0, 5.0]))
    tokens = model_tokens(3, 2, 17)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    with torch.no_grad():
        out = model(inputs)
    assert float(out.aux["q_continue"]) > 0
    plain, _ = lm_loss(out, targets, 0.0, LossWeights(q=0.0))
    total, parts = lm_loss(out, targets, 0.0, LossWeights(q=0.5))
    expected = 0.5 * (float(q_halt_loss(out, targets)) + float(out.aux["q_continue"]))
    assert float(total - plain) == pytest.approx(expected, rel=1e-12)
    ignored = targets[0, 3].item()
    _, parts_ignored = lm_loss(out, targets, 0.0, LossWeights(q=0.5), ignore_index=ignored)
    assert float(parts_ignored["q_halt"]) == pytest.approx(float(q_halt_loss(out, targets, ignored)), rel=1e-12)
    assert float(parts_ignored["q_halt"]) != pytest.approx(float(parts["q_halt"]), rel=1e-9)
