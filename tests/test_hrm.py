"""The manager/worker rules of model/hrm.py pinned by hand-computed oracles (DESIGN.md 3.4).

The parity tests (tests/test_model.py) prove that the parallel and step forms agree; these prove
what both compute: Graves-style ACT weights, expected steps and halting step for a fixed halting
sequence; halted plan points frozen in later passes; plans reaching tokens strictly after their
plan point, LERPed within the stride; the worker's drift update, freezing rule and commitment
cost; and HRM's one-step gradient (only the last `grad_steps` passes of the rounds and of the
worker's shadow loop record a graph; every pondering pass records one, one step deep).
The stacks are replaced by stubs whose outputs are known, so every expectation is arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hierarchos.config import tiny_config
from hierarchos.model.hrm import HierarchicalReasoner


class PassStub(nn.Module):
    """Stands in for an RWKV stack: pass p returns out_of(p, x) and records its call."""

    def __init__(self, out_of):
        super().__init__()
        self.out_of, self.calls = out_of, []

    def init_state(self, *args, **kwargs):
        return {}

    def forward(self, x, tokens, state, frozen=None):
        p = len(self.calls)
        self.calls.append({"x": x.detach().clone(), "frozen": None if frozen is None else frozen.clone(),
                           "grad": torch.is_grad_enabled()})
        return self.out_of(p, x), state


class HaltStub(nn.Module):
    """Halting head: the logit of pass p for plan point j is logits[p][j] (whatever the input)."""

    def __init__(self, probs):  # probs[p][j]
        super().__init__()
        self.logits = torch.logit(torch.tensor(probs, dtype=torch.float64))
        self.n = 0

    def forward(self, z):
        logit = self.logits[self.n]
        self.n += 1
        return logit.to(z.dtype)[None, :, None].expand(z.shape[0], -1, 1)


def reasoner(**overrides):
    torch.manual_seed(0)
    return HierarchicalReasoner(tiny_config(**overrides)).double()


def onehot_per_pass(width):
    """Pass p outputs the unit vector e_p at every plan point: the ACT mix then holds the weights."""
    def out_of(p, x):
        out = torch.zeros_like(x)
        out[..., p] = 1.0
        return out
    return out_of


def graves(probs, thresh, n_steps):
    """ACT by hand, written from the rule: weight p_i * prod_{j<i}(1 - p_j); at the step where the
    accumulated probability 1 - prod(1 - p) first reaches `thresh` (or at the last step) the
    remainder prod_{j<i}(1 - p_j) takes the place of p_i * prod, so the weights sum to 1."""
    weights, remainder = [], 1.0
    for i in range(n_steps):
        p = probs[i]
        last = i == n_steps - 1 or (thresh < 1.0 and 1.0 - remainder * (1.0 - p) >= thresh)
        weights.append(remainder if last else p * remainder)
        if last:
            return weights, i + 1
        remainder *= 1.0 - p
    raise AssertionError("unreachable")


# two plan points with different halting sequences, over 4 passes
PROBS = [[0.3, 0.9], [0.5, 0.2], [0.6, 0.7], [0.9, 0.4]]


# a third point whose accumulated probability hits 0.75 exactly at pass 2 (1 - 0.5 * 0.5): "reaches"
# the threshold means >=
PROBS = [row + [0.5] for row in PROBS]


@pytest.mark.parametrize("thresh", [0.8, 0.95, 1.0, 0.25, 0.75, 0.999])
def test_act_weights_expected_steps_and_halting_step_by_hand(thresh):
    n_steps, n_points, batch = len(PROBS), len(PROBS[0]), 2
    model = reasoner(max_h_steps=n_steps, h_hidden=16, context_dim=16)
    model.manager = PassStub(onehot_per_pass(16))
    model.h_halt_proj = HaltStub(PROBS)
    model.h_to_context = nn.Identity()
    z = torch.zeros(batch, n_points, 16, dtype=torch.float64)
    totals = {}
    mix, _ = model._ponder(z, torch.zeros(batch, n_points, dtype=torch.long), model.init_state(batch)[0]["ponder"],
                           n_steps, thresh, False, totals)
    assert mix.shape == (batch, n_points, 16)
    expected_ponder, expected_halt = 0.0, 0.0
    for j in range(n_points):
        weights, halt_step = graves([PROBS[p][j] for p in range(n_steps)], thresh, n_steps)
        for b in range(batch):
            got = mix[b, j, :n_steps].tolist()
            assert got == pytest.approx(weights + [0.0] * (n_steps - len(weights)), abs=1e-12), (thresh, j)
            assert sum(got) == pytest.approx(1.0, abs=1e-12)  # a convex mix of the passes
        expected_ponder += batch * sum((i + 1) * w for i, w in enumerate(weights))
        expected_halt += batch * halt_step
    assert float(totals["ponder"][0]) == pytest.approx(expected_ponder, abs=1e-12)
    assert totals["ponder"][1] == batch * n_points
    assert float(totals["manager_steps"][0]) == pytest.approx(expected_halt, abs=1e-12)
    assert totals["manager_steps"][1] == batch * n_points


def test_a_point_that_halts_at_its_first_pass_is_not_run_again_in_the_step_form():
    model = reasoner(max_h_steps=4)
    model.manager = PassStub(onehot_per_pass(16))
    model.h_halt_proj = HaltStub([[0.9], [0.5], [0.5], [0.5]])
    model.h_to_context = nn.Identity()
    mix, _ = model._ponder(torch.zeros(1, 1, 16, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.long),
                           model.init_state(1)[0]["ponder"], 4, 0.8, False, {})
    assert len(model.manager.calls) == 1
    assert mix[0, 0, :4].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_act_numbers_for_one_sequence_written_out():
    """The same rule with the arithmetic spelled out, so the helper above cannot drift with the code:
    p = 0.3, 0.5, 0.6, 0.9, threshold 0.8: accumulated 0.3, 0.65, 0.86 -> halts at pass 3 with
    weights 0.3, 0.7 * 0.5, remainder 0.35; expected steps 1 * 0.3 + 2 * 0.35 + 3 * 0.35 = 2.05."""
    weights, halt = graves([0.3, 0.5, 0.6, 0.9], 0.8, 4)
    assert weights == pytest.approx([0.3, 0.35, 0.35]) and halt == 3
    model = reasoner(max_h_steps=4)
    model.manager = PassStub(onehot_per_pass(16))
    model.h_halt_proj = HaltStub([[0.3], [0.5], [0.6], [0.9]])
    model.h_to_context = nn.Identity()
    totals = {}
    mix, _ = model._ponder(torch.zeros(1, 1, 16, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.long),
                           model.init_state(1)[0]["ponder"], 4, 0.8, False, totals)
    assert mix[0, 0, :4].tolist() == pytest.approx([0.3, 0.35, 0.35, 0.0], abs=1e-12)
    assert float(totals["ponder"][0]) == pytest.approx(2.05, abs=1e-12)
    assert float(totals["manager_steps"][0]) == 3.0
    assert len(model.manager.calls) == 3  # one plan point (the step form): no pass after it halted


def test_halted_plan_points_are_frozen_in_later_passes():
    model = reasoner(max_h_steps=4)
    model.manager = PassStub(onehot_per_pass(16))
    model.h_halt_proj = HaltStub(PROBS)
    model.h_to_context = nn.Identity()
    model._ponder(torch.zeros(1, 3, 16, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.long),
                  model.init_state(1)[0]["ponder"], 4, 0.8, False, {})
    # point 0 halts at pass 3 (0.3, 0.65, 0.86); point 1 at pass 1 (0.9 >= 0.8)
    frozen = [c["frozen"] for c in model.manager.calls]
    assert frozen[0] is None  # the first pass runs every plan point
    # point 2 halts at pass 2 (0.5, then 0.75 < 0.8 ... 0.875 at pass 3)
    assert frozen[1].tolist() == [[False, True, False]]
    assert frozen[2].tolist() == [[False, True, False]]
    assert frozen[3].tolist() == [[True, True, True]]


def test_every_pass_sees_the_watch_output_plus_its_refinement():
    """HRM input injection: pass p's input is the watch output z plus (previous output - previous input)."""
    model = reasoner(max_h_steps=3, h_halt_thresh=1.0)
    model.manager = PassStub(lambda p, x: 2.0 * x + (p + 1))
    model.h_to_context = nn.Identity()
    z = torch.randn(1, 2, 16, dtype=torch.float64)
    model._ponder(z, torch.zeros(1, 2, dtype=torch.long), model.init_state(1)[0]["ponder"], 3, 1.0, False, {})
    x0 = z
    out0 = 2 * x0 + 1
    x1 = z + (out0 - x0)
    out1 = 2 * x1 + 2
    x2 = z + (out1 - x1)
    for call, expected in zip(model.manager.calls, (x0, x1, x2)):
        torch.testing.assert_close(call["x"], expected, rtol=0, atol=1e-12)


def _stub_passes(model, d, worker_out=None):
    """A zero manager watch, identity projections, a recording worker input and a worker stub."""
    model.manager = PassStub(lambda p, x: torch.zeros_like(x))
    model.h_input_proj = nn.Identity()
    model.l_input_proj = RecordingProjection(d)
    model.l_drift_proj = nn.Identity()
    model.l_to_out = nn.Identity()
    model.worker = PassStub(worker_out or (lambda p, x: torch.zeros_like(x)))


def _round_with_stubs(T, stride, pos0, plans, max_l_steps=0, worker_out=None, atol=0.0, commit_thr=0.0,
                      carried=None, batch=1, u_value=0.0):
    """One round with a zero watch, a fixed plan per plan point and a recording worker input."""
    d = 16
    model = reasoner(h_stride=stride, max_l_steps=max_l_steps, l_conv_atol=atol, commitment_threshold=commit_thr)
    _stub_passes(model, d, worker_out)
    calls = iter(plans)
    model._ponder = lambda z, *a, **k: (torch.stack([next(calls) for _ in range(z.shape[1])], 0)[None]
                                        .expand(z.shape[0], -1, -1), a[1])
    rounds = model.init_state(batch)
    if carried is not None:
        rounds[0]["plan_prev"], rounds[0]["plan_last"] = (c.to(torch.float64)[None] for c in carried)
    u = torch.full((batch, T, d), u_value, dtype=torch.float64)
    totals = {}
    y, new = model._round(u, torch.zeros(batch, T, dtype=torch.long), rounds[0], None, pos0, 1, max_l_steps, 1.0,
                          totals)
    return model, y, new, totals


class RecordingProjection(nn.Module):
    """l_input_proj stand-in: records [u ; context + drift] and passes the context half through."""

    def __init__(self, d):
        super().__init__()
        self.d, self.inputs = d, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return x[..., self.d:]


def test_plans_reach_tokens_strictly_after_their_plan_point_lerped_within_the_stride():
    stride, T = 3, 9
    plans = [torch.full((16,), 10.0 * (k + 1), dtype=torch.float64) for k in range(3)]  # at positions 2, 5, 8
    model, _, new, _ = _round_with_stubs(T, stride, 0, plans)
    context = model.l_input_proj.inputs[-1][0, :, 16:]  # commit pass, drift 0
    # written out: token g sees the plans of the plan points < g; with n = floor(g / s) of them, it is
    # plan[n-1] + (g - (n s - 1)) / s * (plan[n] - plan[n-1])... between the last two plans strictly before
    # g; before the first plan point the (zero) carried plans
    expected = [0, 0, 0, 10 / 3, 20 / 3, 10, 10 + 10 / 3, 10 + 20 / 3, 20]
    assert context[:, 0].tolist() == pytest.approx(expected, abs=1e-12)
    assert (context == context[:, :1]).all()  # every channel alike
    # the carried plans are the last two plan points' (for the next call)
    assert new["plan_prev"][0, 0].item() == 20.0 and new["plan_last"][0, 0].item() == 30.0


def test_plan_lerp_continues_across_calls_at_an_offset():
    """A call starting at pos0 = 4 (stride 3) continues from the carried plans (none, plan at 2) and
    gives tokens 4..8 the same context as one call over 0..8."""
    plans = [torch.full((16,), 10.0 * (k + 1), dtype=torch.float64) for k in range(3)]
    model, _, _, _ = _round_with_stubs(5, 3, 4, plans[1:], carried=(torch.zeros(16), plans[0]))
    context = model.l_input_proj.inputs[-1][0, :, 16]
    assert context.tolist() == pytest.approx([20 / 3, 10, 10 + 10 / 3, 10 + 20 / 3, 20], abs=1e-12)


def test_worker_drift_freezing_and_commitment_by_hand():
    """Drift d_{p+1} = d_p + tanh(z_p) * (not frozen); a token freezes once max|step| < l_conv_atol
    (strictly: a step equal to the tolerance keeps it moving); commitment per pass = sum relu(||d||^2 -
    threshold) over tokens (W_drift = identity here); y = u + W_out z of the commit pass."""
    T, thr = 4, 0.1
    atol = math.tanh(0.05)
    # worker pass p returns a per-token constant: token 0 moves little at pass 1 (freezes), token 3 moves
    # exactly by the tolerance at pass 1 (does not freeze), token 2 never slows down
    table = torch.tensor([[0.5, 0.3, 0.2, 0.4], [0.01, 0.4, 0.3, 0.05], [0.2, 0.02, 0.3, 0.01]],
                         dtype=torch.float64)
    commit_out = torch.arange(1.0, T + 1, dtype=torch.float64)

    def worker_out(p, x):
        value = commit_out if p >= 3 else table[p]
        return value[None, :, None].expand(2, T, 16).clone()

    model, y, _, totals = _round_with_stubs(T, 8, 0, [], max_l_steps=3, worker_out=worker_out, atol=atol,
                                            commit_thr=thr, batch=2, u_value=0.25)
    drift = torch.zeros(T, dtype=torch.float64)
    frozen = [False] * T
    commitment, steps, drift_before = 0.0, 0, []
    for p in range(3):
        drift_before.append(drift.clone())
        steps += sum(not f for f in frozen)
        for t in range(T):
            if not frozen[t]:
                step = math.tanh(table[p][t].item())
                drift[t] += step
                frozen[t] = frozen[t] or abs(step) < atol
        commitment += sum(max(0.0, 16 * drift[t].item() ** 2 - thr) for t in range(T))
    inputs = model.l_input_proj.inputs
    for p in range(3):  # each exploratory pass reads context + the drift so far
        torch.testing.assert_close(inputs[p][:, :, 16], drift_before[p].expand(2, T), rtol=0, atol=1e-12)
    torch.testing.assert_close(inputs[-1][:, :, 16], drift.expand(2, T), rtol=0, atol=1e-12)
    assert (inputs[-1][..., :16] == 0.25).all()  # u beside the context
    assert float(totals["commitment"][0]) == pytest.approx(2 * commitment, abs=1e-10)
    assert totals["commitment"][1] == 3 * 2 * T  # one count per pass, row and token
    assert float(totals["worker_steps"][0]) == 2 * steps and steps == 4 + 4 + 3  # token 0 froze after pass 1
    assert totals["worker_steps"][1] == 2 * T
    frozen_masks = [c["frozen"] for c in model.worker.calls]
    assert frozen_masks[0] is None and frozen_masks[1].tolist() == [[False] * T] * 2
    assert frozen_masks[2].tolist() == [[True, False, False, False]] * 2
    torch.testing.assert_close(y, 0.25 + commit_out[None, :, None].expand(2, T, 16), rtol=0, atol=1e-12)


def test_the_step_form_skips_the_passes_of_a_frozen_token():
    """One token (the step form): once it froze, later exploratory passes are not run at all."""
    table = [0.5, 0.001, 0.3, 0.3]
    model, _, new, _ = _round_with_stubs(1, 4, 0, [], max_l_steps=4, atol=0.01,
                                         worker_out=lambda p, x: torch.full_like(x, table[p] if p < 4 else 0.0))
    assert len(model.worker.calls) == 2 + 1  # passes 0 and 1, then the commit pass
    model, _, _, _ = _round_with_stubs(2, 4, 0, [], max_l_steps=4, atol=0.01,
                                       worker_out=lambda p, x: torch.full_like(x, table[p] if p < 4 else 0.0))
    assert len(model.worker.calls) == 4 + 1  # a sequence runs every pass (frozen rows masked instead)


def test_plan_points_are_every_stride_th_global_position():
    """Plan points are the global positions p with (p + 1) % h_stride == 0; a call at an offset picks its
    own, and a call with none keeps the carried plans."""
    for pos0, T, expected in ((0, 9, [2, 5, 8]), (4, 5, [5, 8]), (1, 1, []), (2, 1, [2]), (6, 3, [8])):
        seen = []
        model = reasoner(h_stride=3, max_l_steps=0)
        model.manager = PassStub(lambda p, x: x)  # the watch output is its input: the position below
        model.h_input_proj = nn.Identity()
        plan = torch.full((16,), 7.0, dtype=torch.float64)

        def ponder(z, *args, **kwargs):
            seen.extend(z[0, :, 0].tolist())
            return plan.expand(1, z.shape[1], 16), args[1]

        model._ponder = ponder
        rounds = model.init_state(1)
        carried = (torch.full((1, 16), 1.0, dtype=torch.float64), torch.full((1, 16), 2.0, dtype=torch.float64))
        rounds[0]["plan_prev"], rounds[0]["plan_last"] = carried
        u = (pos0 + torch.arange(T, dtype=torch.float64))[None, :, None].expand(1, T, 16)
        _, new = model._round(u, torch.zeros(1, T, dtype=torch.long), rounds[0], None, pos0, 1, 0, 1.0, {})
        assert seen == expected, (pos0, T)
        if not expected:
            assert torch.equal(new["plan_prev"], carried[0]) and torch.equal(new["plan_last"], carried[1])
        elif len(expected) == 1:
            assert torch.equal(new["plan_prev"], carried[1]) and torch.equal(new["plan_last"][0], plan)


def test_round_r_watches_u_plus_the_feedback_of_round_r_minus_1_shifted_by_one():
    """Watch input of round r > 0: W_h u_t + W_fb y^{(r-1)}_{t-1}, with y^{(r-1)}_{-1} = that round's
    carried last output. Round 0 gets no feedback."""
    torch.manual_seed(1)
    model = reasoner(h_cycles=3, max_h_steps=1, max_l_steps=1)
    with torch.no_grad():
        model.l_feedback_proj.weight.normal_(0, 0.5)
    inputs = []
    real = model.manager

    def forward(x, tokens, state, frozen=None):
        inputs.append(x.detach().clone())
        return type(real).forward(real, x, tokens, state, frozen)

    real.forward = forward
    T = 5
    u = torch.randn(1, T, 16, dtype=torch.float64)
    rounds = model.init_state(1)
    for r in range(3):
        rounds[r]["last_out"] = torch.randn(1, 16, dtype=torch.float64)
    with torch.no_grad():
        outputs = [model(u, torch.zeros(1, T, dtype=torch.long), rounds, 0, h_cycles=n)[0] for n in (1, 2, 3)]
        inputs.clear()
        model(u, torch.zeros(1, T, dtype=torch.long), rounds, 0)
        watch_inputs = inputs[0::2]  # watch, then one pondering pass, per round
        torch.testing.assert_close(watch_inputs[0], model.h_input_proj(u), rtol=0, atol=1e-12)
        for r in (1, 2):
            shifted = torch.cat([rounds[r - 1]["last_out"][:, None], outputs[r - 1][:, :-1]], 1)
            expected = model.h_input_proj(u) + model.l_feedback_proj(shifted)
            torch.testing.assert_close(watch_inputs[r], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("caps,calls", [
    ({}, {"H": 2 * (1 + 3), "L": 2 * (2 + 1)}),
    ({"h_cycles": 1}, {"H": 1 + 3, "L": 2 + 1}),
    ({"max_h_steps": 1}, {"H": 2 * (1 + 1), "L": 2 * (2 + 1)}),
    ({"max_l_steps": 0}, {"H": 2 * (1 + 3), "L": 2 * 1}),
    ({"max_l_steps": 1, "h_cycles": 5, "max_h_steps": 9}, {"H": 2 * (1 + 3), "L": 2 * (1 + 1)}),
])
def test_reasoning_caps_limit_the_passes_and_never_exceed_the_config(caps, calls):
    """chat's modes pass caps: each limits its loop, and a cap above the configured value is clipped."""
    model = reasoner(h_cycles=2, max_h_steps=3, max_l_steps=2, h_halt_thresh=1.0, l_conv_atol=0.0, h_stride=1)
    count = {"H": 0, "L": 0}
    for name, stack in (("H", model.manager), ("L", model.worker)):
        def forward(x, tokens, state, frozen=None, _stack=stack, _name=name):
            count[_name] += 1
            return type(_stack).forward(_stack, x, tokens, state, frozen)
        stack.forward = forward
    with torch.no_grad():
        model(torch.randn(1, 3, 16, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.long), model.init_state(1),
              0, **caps)
    assert count == calls


def test_halt_threshold_cap_changes_the_halting():
    """h_halt_thresh passed at call time replaces the configured one (chat's /mode)."""
    model = reasoner(max_h_steps=4, h_halt_thresh=1.0)
    model.manager = PassStub(onehot_per_pass(16))
    model.h_halt_proj = HaltStub([[0.9]] * 4)
    model.h_to_context = nn.Identity()
    model._ponder(torch.zeros(1, 1, 16, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.long),
                  model.init_state(1)[0]["ponder"], 4, 0.5, False, totals := {})
    assert float(totals["manager_steps"][0]) == 1.0


def test_two_calls_carry_every_part_of_the_state_like_one_call():
    """The reasoner's state (watch, pondering, plans, exploration, commit, last output of every round)
    carries a split sequence exactly as one call over it; and every part of the state really moves."""
    torch.manual_seed(2)
    model = reasoner(h_cycles=2, max_h_steps=2, max_l_steps=2, h_stride=2, h_halt_thresh=0.7, l_conv_atol=0.05)
    with torch.no_grad():
        model.l_drift_proj.weight.normal_(0, 0.3)
        model.h_halt_proj.weight.normal_(0, 0.5)
    T, cut = 7, 3
    u = torch.randn(2, T, 16, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, T))
    with torch.no_grad():
        init = model.init_state(2, dtype=torch.float64)
        y_all, state_all, _ = model(u, tokens, init, 0)
        y1, mid, _ = model(u[:, :cut], tokens[:, :cut], init, 0)
        y2, state_split, _ = model(u[:, cut:], tokens[:, cut:], mid, cut)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, rtol=1e-10, atol=1e-12)

    def leaves(tree, prefix=""):
        if isinstance(tree, torch.Tensor):
            yield prefix, tree
        elif isinstance(tree, dict):
            for k in sorted(tree):
                yield from leaves(tree[k], f"{prefix}.{k}")
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                yield from leaves(v, f"{prefix}[{i}]")

    got, want, start = dict(leaves(state_split)), dict(leaves(state_all)), dict(leaves(init))
    assert got.keys() == want.keys() == start.keys()
    moved = set()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
        if not torch.equal(want[name], start[name]):
            moved.add(name.split(".")[1].split("[")[0])
    assert moved >= {"watch", "ponder", "plan_prev", "plan_last", "explore", "commit", "last_out"}, moved
    for r in range(2):
        torch.testing.assert_close(state_all[r]["last_out"], y_all[:, -1] if r == 1 else state_all[r]["last_out"])


@pytest.mark.parametrize("h_cycles,max_h_steps,max_l_steps,grad_steps",
                         [(2, 3, 2, 1), (3, 2, 3, 2), (1, 1, 0, 1), (2, 2, 2, 3)])
def test_one_step_gradient_only_the_last_passes_record_a_graph(h_cycles, max_h_steps, max_l_steps, grad_steps):
    """HRM's one-step gradient: in each loop (rounds; the worker's shadow passes) only the last
    `grad_steps` run with gradients, and the commit pass of a gradient round always does; every
    pondering pass of a gradient round records one (each plan point's plan ends at its own halting
    pass); every other pass runs under no_grad."""
    model = reasoner(h_cycles=h_cycles, max_h_steps=max_h_steps, max_l_steps=max_l_steps, grad_steps=grad_steps,
                     h_halt_thresh=1.0, l_conv_atol=0.0, h_stride=1)
    real_manager, real_worker = model.manager, model.worker
    log = []

    def wrap(stack, name):
        def forward(x, tokens, state, frozen=None):
            log.append((name, torch.is_grad_enabled()))
            return type(stack).forward(stack, x, tokens, state, frozen)
        stack.forward = forward

    wrap(real_manager, "H")
    wrap(real_worker, "L")
    T = 4
    u = torch.randn(1, T, 16, dtype=torch.float64, requires_grad=True)
    y, _, _ = model(u, torch.zeros(1, T, dtype=torch.long), model.init_state(1), 0)
    expected = []
    for r in range(h_cycles):
        round_grad = r >= h_cycles - grad_steps
        expected.append(("H", round_grad))  # watch
        expected += [("H", round_grad) for p in range(max_h_steps)]
        expected += [("L", round_grad and p >= max_l_steps - grad_steps) for p in range(max_l_steps)]
        expected.append(("L", round_grad))  # commit
    assert log == expected
    # and the output's gradient still reaches u through the passes that record a graph
    y.sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


@pytest.mark.parametrize("halting", ["act", "q"])
def test_the_manager_learns_when_every_plan_point_halts_before_the_cap(halting):
    """Every plan point halting at its first pass (ACT with a tiny threshold; a Q head whose halt logit
    wins at once) still gives the manager and its watch pass a gradient: each point's plan ends at
    its own halting pass, and that pass records a graph. With only the cap's pass recording one, this
    gradient was exactly zero."""
    # ours' init: x070's (the default) starts each block as the identity, so its inner parameters get
    # no gradient at the first step whatever the halting does
    model = reasoner(h_cycles=1, max_h_steps=4, max_l_steps=1, grad_steps=1, h_halt_thresh=0.01, halting=halting,
                     h_stride=2, tm_init="hierarchos")
    if halting == "q":
        with torch.no_grad():
            model.h_q_head.bias.copy_(torch.tensor([5.0, -5.0]))  # halt beats continue at the first pass
    T = 8
    u = torch.randn(2, T, 16, dtype=torch.float64)
    model.eval()  # (Q halting's exploration minimum is for training only)
    with torch.enable_grad():
        y, _, totals = model(u, torch.zeros(2, T, dtype=torch.long), model.init_state(2), 0)
    assert float(totals["manager_steps"][0]) == float(totals["manager_steps"][1])  # every point: one pass
    y.pow(2).sum().backward()
    for name, p in model.manager.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.h_input_proj.weight.grad.abs().sum() > 0  # the watch pass's input


@pytest.mark.parametrize("grad_steps", [1, 2])
def test_each_pondering_pass_is_one_step_deep(grad_steps):
    """A pondering pass takes the previous pass's refinement as a constant, except between the last
    `grad_steps` passes, where the chain stays."""
    n = 4
    model = reasoner(h_cycles=1, max_h_steps=n, grad_steps=grad_steps, h_stride=1)
    state = model.init_state(1)[0]["ponder"][0]
    injected = torch.randn(1, 3, 16, dtype=torch.float64)
    for p in range(n):
        refinement = torch.randn(1, 3, 16, dtype=torch.float64, requires_grad=True)
        z, _, _ = model._ponder_pass(p, injected, refinement, torch.zeros(1, 3, dtype=torch.long), state,
                                     torch.zeros(1, 3, dtype=torch.bool), n, True, False)
        assert z.requires_grad  # every pass records a graph
        reached = torch.autograd.grad(z.sum(), refinement, allow_unused=True)[0] is not None
        assert reached == (p > n - grad_steps), p


@pytest.mark.parametrize("max_l_steps", [1, 3])
def test_the_drift_reaches_the_worker_at_one_step_gradient(max_l_steps):
    """At grad_steps = 1 the worker's last shadow pass records a graph: the drift it adds carries a
    gradient into the worker, the earlier passes' drift does not. With the commit as the loop's only
    graph the worker could not shape its drift (only the projection after it learned), and that
    untrained drift stalled training (BENCHMARKS.md, "Learning quality")."""
    model = reasoner(h_cycles=1, max_h_steps=1, max_l_steps=max_l_steps, grad_steps=1, l_conv_atol=0.0)
    seen = []
    model.l_drift_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].requires_grad))
    T = 6
    u = torch.randn(2, T, 16, dtype=torch.float64)
    y, _, _ = model(u, torch.zeros(2, T, dtype=torch.long), model.init_state(2), 0)
    assert seen == [False] * (max_l_steps - 1) + [True]
    y.pow(2).sum().backward()
    assert model.l_drift_proj.weight.grad.abs().sum() > 0


def test_one_step_gradient_gives_earlier_passes_no_gradient():
    """With grad_steps = 1 and two rounds, the first round's worker output feeds round 2 only as a
    constant: the feedback projection's gradient differs from the one with every pass recording."""
    torch.manual_seed(3)
    cfg = dict(h_cycles=2, max_h_steps=2, max_l_steps=1, h_halt_thresh=1.0, l_conv_atol=0.0, h_stride=1)
    T = 5
    u = torch.randn(1, T, 16, dtype=torch.float64)

    def grad_of(grad_steps):
        model = reasoner(grad_steps=grad_steps, **cfg)
        with torch.no_grad():
            model.l_feedback_proj.weight.normal_(0, 0.5)
        y, _, _ = model(u, torch.zeros(1, T, dtype=torch.long), model.init_state(1), 0)
        y.pow(2).sum().backward()
        return model.l_feedback_proj.weight.grad.clone()

    one_step = grad_of(1)
    full = grad_of(4)
    # round 2's watch uses the feedback projection on round 1's output (a constant under one-step):
    # its gradient exists in both, but differs once round 1 carries gradients
    assert one_step.abs().sum() > 0
    assert not torch.allclose(one_step, full)


@pytest.mark.parametrize("h_block,l_block", [("rwkv7", "rwkv7"), ("attention", "rwkv7"), ("rwkv7", "attention"),
                                             ("attention", "attention")])
@pytest.mark.parametrize("deepembed,per_block", [(True, False), (True, True), (False, False)])
def test_each_stack_is_built_as_its_config_says(h_block, l_block, deepembed, per_block):
    from hierarchos.model.attention import AttentionStack
    from hierarchos.model.rwkv import RWKVStack

    cfg = dict(h_block=h_block, l_block=l_block, h_hidden=32, l_hidden=16, h_layers=2, l_layers=1,
               use_deepembed=deepembed, deepembed_per_block=per_block, pos_encodings="learned", window_size=5,
               max_length=48)
    model = reasoner(**cfg)
    for stack, block, dim, layers in ((model.manager, h_block, 32, 2), (model.worker, l_block, 16, 1)):
        assert isinstance(stack, AttentionStack if block == "attention" else RWKVStack)
        assert (stack.dim, stack.n_layers, len(stack.blocks)) == (dim, layers, layers)
        assert stack.head_size == model.cfg.head_size
        if deepembed:
            assert stack.deepembed is not None and len(stack.deepembed) == (layers if per_block else 1)
            assert stack.deepembed[0].weight.shape == (model.cfg.vocab_size, model.cfg.ffn_mult * dim)
        else:
            assert stack.deepembed is None
        if block == "attention":
            assert (stack.pos_encodings, stack.window_size) == ("learned", 5)
            assert stack.position_table.weight.shape == (48, dim)


def test_initial_scales_of_the_reasoner_heads():
    """Feedback and drift start at a tenth of nn.Linear's default scale (|w| <= 0.1 / sqrt(fan_in)), the
    feedback has no bias, and the halting head starts at sigmoid(-1): ACT ponders at init."""
    torch.manual_seed(0)
    model = HierarchicalReasoner(tiny_config(context_dim=64, h_hidden=64, l_hidden=64, head_size=16))
    for proj, fan_in in ((model.l_feedback_proj, 64), (model.l_drift_proj, 64)):
        bound = 0.1 / fan_in ** 0.5
        assert float(proj.weight.detach().abs().max()) <= bound
        assert float(proj.weight.detach().abs().max()) > 0.8 * bound  # uniform over +-bound
    assert model.l_feedback_proj.bias is None
    assert model.h_halt_proj.bias.detach().tolist() == [-1.0]


def test_halt_threshold_passed_to_forward_replaces_the_config():
    model = reasoner(max_h_steps=3, h_halt_thresh=1.0, h_stride=1, max_l_steps=0, h_cycles=1)
    u = torch.randn(1, 4, 16, dtype=torch.float64)
    steps = {}
    for thresh in (None, 1e-9):
        with torch.no_grad():
            _, _, totals = model(u, torch.zeros(1, 4, dtype=torch.long), model.init_state(1), 0,
                                 h_halt_thresh=thresh)
        steps[thresh] = float(totals["manager_steps"][0]) / totals["manager_steps"][1]
    assert steps == {None: 3.0, 1e-9: 1.0}


def test_a_certain_halt_still_runs_every_pass_when_the_threshold_is_one():
    """h_halt_thresh = 1.0 runs every pass even when a pass is certain to halt (p = 1 exactly): the
    weight goes to that pass, but no point stops early."""
    model = reasoner(max_h_steps=3)
    model.manager = PassStub(onehot_per_pass(16))
    model.h_halt_proj = HaltStub([[1.0], [0.5], [0.5]])
    model.h_to_context = nn.Identity()
    totals = {}
    mix, _ = model._ponder(torch.zeros(1, 1, 16, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.long),
                           model.init_state(1)[0]["ponder"], 3, 1.0, False, totals)
    assert mix[0, 0, :3].tolist() == [1.0, 0.0, 0.0]
    assert float(totals["manager_steps"][0]) == 3.0 and len(model.manager.calls) == 3


def test_a_token_frozen_after_the_first_pass_runs_no_other_exploratory_pass():
    model, _, _, _ = _round_with_stubs(1, 4, 0, [], max_l_steps=4, atol=0.01,
                                       worker_out=lambda p, x: torch.full_like(x, 0.001 if p < 4 else 0.0))
    assert len(model.worker.calls) == 1 + 1  # pass 0, then the commit pass


def test_the_carried_last_output_keeps_its_dtype_under_autocast():
    model = HierarchicalReasoner(tiny_config())
    rounds = model.init_state(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, new, _ = model(torch.randn(1, 3, 16), torch.zeros(1, 3, dtype=torch.long), rounds, 0)
    assert all(r["last_out"].dtype == torch.float32 for r in new)


def test_rwkv_stacks_take_the_configured_time_mix():
    from hierarchos.model.rwkv import TimeMix4

    for time_mix in ("rwkv7", "wkv4"):
        model = reasoner(time_mix=time_mix)
        for stack in (model.manager, model.worker):
            assert all(isinstance(b.time_mix, TimeMix4) == (time_mix == "wkv4") for b in stack.blocks), time_mix


# ---- the sync-free step (row_pos): every pass runs, masked instead of skipped -------------------------

def test_act_with_rows_halted_from_the_start_runs_every_pass_and_weighs_them_nothing():
    """`_ponder(halted=, count=)` (the sync-free step): row 1 is off a plan point, so it is halted before
    pass 0 (frozen in every pass, pass 0 included), adds nothing to the mix, the expected steps or the
    halting step; row 0 follows Graves' rule (0.9 >= 0.8 at pass 1: weights 1, 0, 0, 0); one plan point
    per row and yet every pass runs (no host read of the halted mask); totals count `count`."""
    model = reasoner(max_h_steps=4)
    model.manager = PassStub(onehot_per_pass(16))
    model.h_halt_proj = HaltStub([[0.9], [0.5], [0.5], [0.5]])
    model.h_to_context = nn.Identity()
    totals, count = {}, torch.tensor(3.0)  # not B * P = 2: the count handed in is the one used
    halted = torch.tensor([[False], [True]])
    mix, _ = model._ponder(torch.zeros(2, 1, 16, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.long),
                           model.init_state(2)[0]["ponder"], 4, 0.8, False, totals, halted=halted, count=count)
    assert len(model.manager.calls) == 4
    assert [c["frozen"].tolist() for c in model.manager.calls] == [[[False], [True]]] + [[[True], [True]]] * 3
    assert mix[0, 0, :4].tolist() == [1.0, 0.0, 0.0, 0.0] and not mix[1].any()
    assert float(totals["ponder"][0]) == 1.0 and float(totals["manager_steps"][0]) == 1.0
    assert [float(totals[k][1]) for k in ("ponder", "manager_steps")] == [3.0, 3.0]
    assert halted.tolist() == [[False], [True]]  # the caller's mask is not changed in place


class QTableStub(nn.Module):
    """Q head: pass p gives every point the logits (halt, continue) = table[p], whatever the input."""

    def __init__(self, table):
        super().__init__()
        self.table, self.n = torch.tensor(table, dtype=torch.float64), 0

    def forward(self, z):
        logits = self.table[self.n]
        self.n += 1
        return logits.to(z.dtype).expand(*z.shape[:-1], 2)


def test_q_halting_with_rows_halted_from_the_start_runs_every_pass_and_chooses_nothing_for_them():
    """`_ponder_q(halted=, count=)`: row 0 halts at pass 2 (halt > continue first there), its plan is
    pass 2's output and its halt logit pass 2's; row 1 (halted from the start) is frozen from pass 0,
    keeps a zero plan, logit and halting step, and adds no continue loss; every pass runs for one point.
    The continue loss by hand: row 0 went on from pass 1 with continue 1.0 towards sigmoid(max(1.5, 0.5))."""
    import math as _m

    table = [[0.0, 1.0], [1.5, 0.5], [3.0, 0.0]]
    model = HierarchicalReasoner(tiny_config(halting="q", max_h_steps=3)).double().eval()
    model.manager = PassStub(onehot_per_pass(16))
    model.h_q_head = QTableStub(table)
    model.h_to_context = nn.Identity()
    totals, count = {}, torch.tensor(3.0)  # not B * P = 2
    plans, _, logit = model._ponder_q(torch.zeros(2, 1, 16, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.long),
                                      model.init_state(2)[0]["ponder"], 3, False, totals,
                                      halted=torch.tensor([[False], [True]]), count=count)
    assert len(model.manager.calls) == 3
    assert [c["frozen"].tolist() for c in model.manager.calls] == [[[False], [True]], [[False], [True]],
                                                                    [[True], [True]]]
    assert plans[0, 0, :3].tolist() == [0.0, 1.0, 0.0] and not plans[1].any()
    assert logit.tolist() == [[1.5], [0.0]]
    target = 1 / (1 + _m.exp(-1.5))
    p = 1 / (1 + _m.exp(-1.0))
    bce = -(target * _m.log(p) + (1 - target) * _m.log(1 - p))
    assert float(totals["q_continue"][0]) == pytest.approx(bce, abs=1e-12)
    assert float(totals["manager_steps"][0]) == 2.0
    assert [float(totals[k][1]) for k in ("q_continue", "manager_steps")] == [3.0, 3.0]


def _sync_free_round(halting="act", max_l_steps=0, worker_out=None, atol=0.0, **caps):
    """One forward of the sync-free step (h_cycles 1, stride 3) over five rows at positions 2, 3, 4, 5, 7
    with carried plans prev = b + 1, last = 10 (b + 1) in row b, a zero watch and a ponder stub that
    returns the plan 100 (b + 1) in row b and records its keyword arguments."""
    d, B = 16, 5
    model = reasoner(h_stride=3, h_cycles=1, max_h_steps=3, max_l_steps=max_l_steps, l_conv_atol=atol, halting=halting)
    _stub_passes(model, d, worker_out)
    seen = []
    plan = (100.0 * torch.arange(1, B + 1, dtype=torch.float64))[:, None, None].expand(B, 1, d)
    pondered = ["the new pondering states"]

    def ponder(*args, **kwargs):
        seen.append((args, kwargs))
        return (plan, pondered, torch.zeros(B, 1, dtype=torch.float64)) if halting == "q" else (plan, pondered)

    setattr(model, "_ponder_q" if halting == "q" else "_ponder", ponder)
    rounds = model.init_state(B)
    rows = torch.arange(1, B + 1, dtype=torch.float64)[:, None].expand(B, d)
    rounds[0]["plan_prev"], rounds[0]["plan_last"] = rows.clone(), 10 * rows
    row_pos = torch.tensor([2, 3, 4, 5, 7])
    tokens = torch.arange(1, B + 1)[:, None]
    with torch.no_grad():  # pos0 = 0 is unused: each row is at its own position
        y, new, totals = model(torch.zeros(B, 1, d, dtype=torch.float64), tokens, rounds, 0, row_pos=row_pos,
                               **caps)
    return model, y, new[0], totals, (seen, tokens, rounds[0]["ponder"], pondered)


@pytest.mark.parametrize("halting", ["act", "q"])
def test_sync_free_step_plans_at_per_row_plan_points_and_lerps_by_hand(halting):
    """Stride 3: plan points are positions 2 and 5 (rows 0 and 3). Context of the token at g (n = g // 3
    plan points before it): prev + (g - (3 n - 1)) / 3 (last - prev) of the carried plans:
    g = 2: 1 + 1 * 9 = 10; 3: 2 + 1/3 * 18 = 8; 4: 3 + 2/3 * 27 = 21; 5: 4 + 1 * 36 = 40; 7: 5 + 2/3 * 45 = 35.
    Only plan rows shift their plans (prev <- last, last <- the new plan); the ponder gets the other rows
    as halted and the number of plan rows as its count."""
    model, _, new, totals, (seen, tokens, states, pondered) = _sync_free_round(halting, max_h_steps=2,
                                                                              h_halt_thresh=0.6)
    context = model.l_input_proj.inputs[-1][:, 0, 16:]
    assert context.shape == (5, 16) and (context == context[:, :1]).all()
    assert context[:, 0].tolist() == pytest.approx([10, 8, 21, 40, 35], abs=1e-12)
    assert new["plan_prev"][:, 0].tolist() == [10, 2, 3, 40, 5]
    assert new["plan_last"][:, 0].tolist() == [100, 20, 30, 400, 50]
    assert new["plan_last"].dtype == torch.float64
    ((args, kwargs),) = seen
    assert new["ponder"] is pondered  # the pondering states it returns are the new state
    # the watch output (zero here), the rows' tokens, the carried pondering states, the pass cap (2 of the
    # configured 3), the threshold passed (ACT only), gradients off (no_grad), the call's totals
    z, rest = args[0], args[1:]
    assert z.shape == (5, 1, 16) and not z.any()
    assert rest[0] is tokens and rest[1] is states and rest[2] == 2
    assert rest[3:-1] == ((0.6,) if halting == "act" else ()) + (False,) and rest[-1] is totals
    assert kwargs["halted"].tolist() == [[False], [True], [True], [False], [True]]
    assert float(kwargs["count"]) == 2.0 and kwargs["count"].dtype == torch.float32


def test_sync_free_step_runs_every_worker_pass_of_a_frozen_token_and_counts_only_moving_ones():
    """One token per row: the plain step skips the passes after the token froze (2 + 1 calls, see
    test_the_step_form_skips_the_passes_of_a_frozen_token); the sync-free step runs all 4 + 1 (a host
    read of the mask is what it avoids), the frozen passes masked: drift and worker steps as if skipped
    (tanh(0.5) + tanh(0.001); 2 steps a row), frozen masks all true after the token froze."""
    table = [0.5, 0.001, 0.3, 0.3]
    model, y, _, totals, _ = _sync_free_round(max_l_steps=4, atol=0.01,
                                              worker_out=lambda p, x: torch.full_like(x, table[p] if p < 4 else 0.0))
    assert len(model.worker.calls) == 4 + 1
    assert [c["frozen"] is None for c in model.worker.calls[:4]] == [True, False, False, False]
    assert all(c["frozen"].all() for c in model.worker.calls[2:4]) and not model.worker.calls[1]["frozen"].any()
    drift = model.l_input_proj.inputs[-1][:, 0, 16:] - model.l_input_proj.inputs[0][:, 0, 16:]
    assert drift.flatten().tolist() == pytest.approx([math.tanh(0.5) + math.tanh(0.001)] * (5 * 16), abs=1e-12)
    assert float(totals["worker_steps"][0]) == 2 * 5 and totals["worker_steps"][1] == 5


def test_rwkv_stacks_take_the_configured_time_mix_wiring():
    """The config's tm_* fields reach every RWKV-7 block of both stacks (hierarchos' own wiring here,
    not the default x070 wiring)."""
    from hierarchos.model.rwkv import TimeMixWiring

    ours = dict(tm_token_shift="ddlerp", tm_gate="sigmoid_full", tm_value_residual=False, tm_init="hierarchos")
    model = reasoner(h_layers=2, l_layers=2, **ours)
    for stack in (model.manager, model.worker):
        assert [b.time_mix.wiring for b in stack.blocks] == [TimeMixWiring("ddlerp", "sigmoid_full", False,
                                                                           "hierarchos")] * 2


def test_q_halt_pairs_are_collected_only_when_asked_and_only_under_q_halting():
    """`q_halt` is optional: a Q-halting reasoner runs without a list (what the step and evaluation
    do) and gives the same output as with one, which then holds one pair per round; an ACT reasoner
    appends nothing to a list it is handed."""
    u, tokens = torch.randn(1, 4, 16, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.long)
    q_model = reasoner(halting="q", h_stride=2, h_cycles=2)
    with torch.no_grad():
        y_none, _, _ = q_model(u, tokens, q_model.init_state(1), 0)
        pairs = []
        y_list, _, _ = q_model(u, tokens, q_model.init_state(1), 0, q_halt=pairs)
    torch.testing.assert_close(y_none, y_list, rtol=0, atol=0)
    assert len(pairs) == 2
    act_model, pairs = reasoner(h_stride=2), []
    with torch.no_grad():
        act_model(u, tokens, act_model.init_state(1), 0, q_halt=pairs)
    assert pairs == []


@pytest.mark.parametrize("stride", [1, 3, 4, 7])
def test_one_token_plan_equals_the_general_plan_bit_for_bit(stride, monkeypatch):
    """A generated token's `_plan` takes a host-arithmetic path (`_plan_one`); at every position of a
    few strides (3 and 7: LERP weights that float32 rounds) its context, pondering states and two
    latest plans equal the general path's exactly, plan points and the tokens between alike."""
    torch.manual_seed(stride)
    model = reasoner(h_stride=stride, max_h_steps=2, h_halt_thresh=0.6).float().eval()
    d = model.cfg.context_dim
    B = 3
    rounds = model.init_state(B)
    rs = dict(rounds[0], plan_prev=torch.randn(B, d), plan_last=torch.randn(B, d))
    tokens = torch.randint(0, model.cfg.vocab_size, (B, 1))
    watch_out = torch.randn(B, 1, model.cfg.h_hidden)
    u = torch.randn(B, 1, d)
    for pos0 in range(2 * stride + 1):
        results = []
        for fast in (True, False):
            monkeypatch.setattr(HierarchicalReasoner, "_plan_one_applies", lambda self, u, fast=fast: fast)
            new, totals = dict(rs), {}
            with torch.no_grad():
                context = model._plan(u, watch_out, tokens, rs, new, pos0, 2, 0.6, False, totals, None)
            results.append((context, new, totals))
        (c1, n1, t1), (c2, n2, t2) = results
        assert c1.shape == c2.shape == (B, 1, d) and torch.equal(c1, c2), pos0
        assert torch.equal(n1["plan_prev"], n2["plan_prev"]) and torch.equal(n1["plan_last"], n2["plan_last"])
        for s1, s2 in zip(n1["ponder"], n2["ponder"]):
            assert all(torch.equal(s1[k], s2[k]) for k in s1)
        assert t1.keys() == t2.keys() and all(torch.equal(torch.as_tensor(t1[k][0]), torch.as_tensor(t2[k][0]))
                                              for k in t1)
        assert (pos0 + 1) % stride != 0 or "ponder" in t1  # a plan point pondered


def test_the_one_token_plan_applies_where_it_computes_the_general_plan(monkeypatch):
    """`_plan_one` takes one token (T = 1) of a float32 model with ACT halting, nothing else (Q halting
    keeps its halt logits, other dtypes their own rounding); it reports the same totals as the general
    path; and with gradients on, a plan point's pondering trains the halting head through it."""
    model = reasoner(h_stride=2, max_h_steps=2, h_halt_thresh=0.6).float()
    d = model.cfg.context_dim
    one, two = torch.randn(2, 1, d), torch.randn(2, 2, d)
    assert model._plan_one_applies(one)
    assert not model._plan_one_applies(two) and not model._plan_one_applies(one.double())
    assert not reasoner(halting="q").float()._plan_one_applies(one)
    B = 2
    rs = dict(model.init_state(B)[0], plan_prev=torch.randn(B, d), plan_last=torch.randn(B, d))
    tokens = torch.randint(0, model.cfg.vocab_size, (B, 1))
    watch_out = torch.randn(B, 1, model.cfg.h_hidden, requires_grad=True)
    totals = {}
    context = model._plan(one, watch_out, tokens, rs, dict(rs), 1, 2, 0.6, True, totals, None)  # pos 1: a plan point
    assert context.shape == (B, 1, d) and set(totals) == {"ponder", "manager_steps"}
    new = dict(rs)
    model._plan(one, watch_out, tokens, rs, new, 1, 2, 0.6, True, {}, None)
    new["plan_last"].sum().backward()
    assert model.h_halt_proj.weight.grad is not None and model.h_halt_proj.weight.grad.abs().sum() > 0
    assert watch_out.grad is not None and watch_out.grad.abs().sum() > 0


def test_no_shadow_pass_leaves_no_drift_and_counts_no_worker_step():
    """At max_l_steps 0 `_explore` returns no drift (None: the commit pass reads the plans as they are),
    the shadow states as they came, and a worker_steps total of 0 over B * T tokens."""
    model = reasoner(max_l_steps=0).float()
    B, T, d = 2, 3, model.cfg.context_dim
    states = [{"x": torch.zeros(1)}]
    totals = {}
    drift, explore = model._explore(torch.randn(B, T, d), torch.randn(B, T, d), torch.zeros(B, T, dtype=torch.long),
                                    states, 0, False, False, totals)
    assert drift is None and explore == states and explore is not states
    assert list(totals) == ["worker_steps"]
    total, count = totals["worker_steps"]
    assert float(total) == 0.0 and count == float(B * T)
