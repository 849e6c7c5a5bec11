"""The RWKV cells of hierarchos/model/rwkv.py against oracles written here from the rules, one token
and one head at a time in float64: the token shift (frozen tokens skipped), the head norm, the RWKV-7
time mix in hierarchos' wiring (data-dependent lerps, decay, in-context rate, delta-rule state,
bonus, sigmoid gate), the RWKV-4 time mix (its recurrence in plain exponentials), the SwiGLU channel
mix with its DeepEmbed gate, the block's residual order, the stack's state layout and initial values.

Random inputs from a fresh seed, printed on failure.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from hierarchos.model import rwkv
from hierarchos.model.rwkv import (ChannelMix, HeadNorm, RWKVBlock, RWKVStack, TimeMix, TimeMix4, TimeMixWiring,
                                   shift_tokens, x070_rank)

D = torch.float64


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def close(a, b, seed, what, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"seed={seed} {what}: {m}")


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Every parameter away from its init (norm weights off 1, biases off 0, low-rank paths on)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def frozen_mask(B, T, seed, rate=0.4):
    g = torch.Generator().manual_seed(seed + 7)
    frozen = torch.rand(B, T, generator=g) < rate
    frozen[0, -1] = True   # a frozen last token: the carried shift is an earlier one
    frozen[-1, :] = False  # a row with nothing frozen
    frozen[-1, 1] = True
    return frozen


def previous_live(x, prev, frozen):
    """x_prev[b, t] = the last non-frozen token before t (else the carried vector); and the new carry."""
    B, T, _ = x.shape
    x_prev, carry = torch.empty_like(x), prev.clone()
    for b in range(B):
        last = prev[b]
        for t in range(T):
            x_prev[b, t] = last
            if frozen is None or not frozen[b, t]:
                last = x[b, t]
        carry[b] = last
    return x_prev, carry


# ---- token shift -------------------------------------------------------------------------------------

def test_shift_tokens_by_hand():
    x = torch.arange(1.0, 13.0, dtype=D).view(2, 3, 2)  # rows [[1,2],[3,4],[5,6]] and [[7,8],[9,10],[11,12]]
    prev = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], dtype=D)
    shifted, carry = shift_tokens(x, prev, None)
    assert shifted.tolist() == [[[-1, -2], [1, 2], [3, 4]], [[-3, -4], [7, 8], [9, 10]]]
    assert carry.tolist() == [[5, 6], [11, 12]]
    frozen = torch.tensor([[False, True, False], [True, True, True]])
    shifted, carry = shift_tokens(x, prev, frozen)
    # row 0: token 1 is frozen, so token 2's previous one is token 0; row 1: nothing live, all see prev
    assert shifted.tolist() == [[[-1, -2], [1, 2], [1, 2]], [[-3, -4], [-3, -4], [-3, -4]]]
    assert carry.tolist() == [[5, 6], [-3, -4]]
    frozen = torch.tensor([[False, False, True], [True, False, True]])
    shifted, carry = shift_tokens(x, prev, frozen)
    assert shifted.tolist() == [[[-1, -2], [1, 2], [3, 4]], [[-3, -4], [-3, -4], [9, 10]]]
    assert carry.tolist() == [[3, 4], [9, 10]]


def test_shift_tokens_one_token():
    x = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]], dtype=D)
    prev = torch.tensor([[5.0, 6.0], [7.0, 8.0]], dtype=D)
    for frozen in (None, torch.tensor([[False], [False]])):
        shifted, carry = shift_tokens(x, prev, frozen)
        assert shifted.tolist() == [[[5, 6]], [[7, 8]]] and carry.tolist() == [[1, 2], [3, 4]]
    shifted, carry = shift_tokens(x, prev, torch.tensor([[True], [False]]))
    assert shifted.tolist() == [[[5, 6]], [[7, 8]]] and carry.tolist() == [[5, 6], [3, 4]]


def test_shift_tokens_one_channel_and_on_the_inputs_device():
    """One channel but several tokens is the general case (not the one-token shortcut); the positions
    it builds are on the inputs' device (meta stands in for the GPU)."""
    x = torch.tensor([[[1.0], [2.0], [3.0]]], dtype=D)
    shifted, carry = shift_tokens(x, torch.tensor([[9.0]], dtype=D), torch.tensor([[False, True, False]]))
    assert shifted.tolist() == [[[9.0], [1.0], [1.0]]] and carry.tolist() == [[3.0]]
    shifted, carry = shift_tokens(x, torch.tensor([[9.0]], dtype=D), None)
    assert shifted.tolist() == [[[9.0], [1.0], [2.0]]] and carry.tolist() == [[3.0]]
    meta = torch.empty(2, 4, 3, device="meta")
    shifted, carry = shift_tokens(meta, torch.empty(2, 3, device="meta"), torch.zeros(2, 4, dtype=torch.bool,
                                                                                        device="meta"))
    assert shifted.device.type == carry.device.type == "meta" and shifted.shape == (2, 4, 3)


def test_shift_tokens_random_frozen_against_the_loop():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for T in (2, 5, 9):
        x = torch.randn(3, T, 4, generator=g, dtype=D)
        prev = torch.randn(3, 4, generator=g, dtype=D)
        frozen = torch.rand(3, T, generator=g) < 0.5
        shifted, carry = shift_tokens(x, prev, frozen)
        want, want_carry = previous_live(x, prev, frozen)
        assert torch.equal(shifted, want) and torch.equal(carry, want_carry), f"seed={seed} T={T}"


# ---- head norm -------------------------------------------------------------------------------------------

def test_head_norm_is_a_layer_norm_per_head_with_eps_64e_5():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    norm = HeadNorm(2, 3).double()
    assert norm.eps == 64e-5
    assert norm.weight.tolist() == [1.0] * 6 and norm.bias.tolist() == [0.0] * 6
    perturb(norm, seed)
    # small spreads, so the eps matters (variance ~1e-4 against eps 6.4e-4)
    x = torch.randn(2, 3, 2, 3, generator=g, dtype=D) * 0.01 + torch.randn(2, 3, 2, 1, generator=g, dtype=D)
    out = norm(x)
    want = torch.empty(2, 3, 6, dtype=D)
    for b in range(2):
        for t in range(3):
            for h in range(2):
                v = x[b, t, h]
                mean = sum(v.tolist()) / 3
                var = sum((e - mean) ** 2 for e in v.tolist()) / 3
                for n in range(3):
                    c = 3 * h + n
                    want[b, t, c] = (v[n] - mean) / math.sqrt(var + 64e-5) * norm.weight[c] + norm.bias[c]
    close(out, want, seed, "head norm")


# ---- RWKV-7 time mix, hierarchos wiring ---------------------------------------------------------------

def time_mix_by_hand(tm: TimeMix, x, shift_prev, state, frozen):
    """hierarchos' wiring, token by token: (out, new shift, new state)."""
    B, T, C = x.shape
    H, N = tm.n_heads, tm.head_size
    x_prev, carry = previous_live(x, shift_prev, frozen)
    S = state.clone()
    out = torch.empty_like(x)
    R = tm.mix_down.shape[1] // 6
    for b in range(B):
        for t in range(T):
            xt, d = x[b, t], x_prev[b, t] - x[b, t]
            base = xt + d * tm.mix_base
            hid = torch.tanh(base @ tm.mix_down)
            xs = [xt + d * (tm.mix[i] + hid[i * R:(i + 1) * R] @ tm.mix_up[i]) for i in range(6)]
            xr, xw, xk, xv, xa, xg = xs
            r, k, v = tm.receptance.weight @ xr, tm.key.weight @ xk, tm.value.weight @ xv
            gate = 1 / (1 + torch.exp(-(tm.gate.weight @ xg)))
            d_logit = tm.decay_base + torch.tanh(xw @ tm.decay_down) @ tm.decay_up
            w = torch.exp(-math.exp(-0.5) / (1 + torch.exp(-d_logit)))  # exp(-e^-0.5 sigmoid(d)), in (e^-e^-0.5, 1)
            a = 1 / (1 + torch.exp(-(tm.iclr_base + (xa @ tm.iclr_down) @ tm.iclr_up)))
            kk = k * tm.removal_scale
            k_new = k * (1 + (a - 1) * tm.key_iclr_mix)
            live = frozen is None or not bool(frozen[b, t])
            y = torch.empty(C, dtype=D)
            for h in range(H):
                sl = slice(h * N, (h + 1) * N)
                kap = kk[sl] / kk[sl].norm()
                if live:
                    Sh = S[b, h]
                    S[b, h] = Sh * w[sl][None, :] - torch.outer(Sh @ kap, kap * a[sl]) + torch.outer(v[sl], k_new[sl])
                o = S[b, h] @ r[sl]
                o = (o - o.mean()) / torch.sqrt(o.var(unbiased=False) + 64e-5) * tm.norm.weight[sl] + tm.norm.bias[sl]
                if live:  # the bonus: this token's own key/value with the per-head weights
                    o = o + (r[sl] * k_new[sl] * tm.bonus[h]).sum() * v[sl]
                y[sl] = o
            out[b, t] = tm.output.weight @ (y * gate)
    return out, carry, S


@pytest.mark.parametrize("with_frozen", [False, True])
def test_time_mix_equals_the_rule_by_hand(with_frozen):
    seed = fresh_seed()
    torch.manual_seed(seed)
    tm = TimeMix(8, 4, 1, 3, 2).double()
    perturb(tm, seed)
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 5
    x = torch.randn(B, T, 8, generator=g, dtype=D)
    shift = torch.randn(B, 8, generator=g, dtype=D)
    state = torch.randn(B, 2, 4, 4, generator=g, dtype=D) * 0.3
    frozen = frozen_mask(B, T, seed) if with_frozen else None
    with torch.no_grad():
        out, new_shift, new_state, v_first = tm(x, shift, state, frozen)
        want, want_shift, want_state = time_mix_by_hand(tm, x, shift, state, frozen)
    assert v_first is None
    close(out, want, seed, "output")
    close(new_shift, want_shift, seed, "shift")
    close(new_state, want_state, seed, "state")
    assert new_shift.dtype == D and new_state.dtype == D


def test_time_mix_float32_state_follows_the_recurrence_dtype():
    """A float32 module keeps a float32 shift and state (the recurrence runs in float32)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    tm = TimeMix(8, 4, 0, 2, 4)
    perturb(tm, seed)
    g = torch.Generator().manual_seed(seed)
    x, shift = torch.randn(1, 3, 8, generator=g), torch.randn(1, 8, generator=g)
    state = torch.zeros(1, 2, 4, 4)
    with torch.no_grad():
        out, new_shift, new_state, _ = tm(x, shift, state)
        want, want_shift, want_state = time_mix_by_hand(tm.double(), x.double(), shift.double(), state.double(), None)
    assert out.dtype == new_shift.dtype == new_state.dtype == torch.float32
    close(out.double(), want, seed, "output", rtol=1e-4, atol=1e-5)
    close(new_state.double(), want_state, seed, "state", rtol=1e-4, atol=1e-5)


def test_time_mix_initial_values():
    """hierarchos' init for layer 1 of 3 (depth 0.5) at width 8: ramp c / C."""
    torch.manual_seed(fresh_seed())
    dim, depth = 8, 0.5
    tm = TimeMix(dim, 4, 1, 3, 2)
    ramp = torch.tensor([c / dim for c in range(dim)])
    close(tm.mix, torch.stack([1 - ramp ** (0.3 + 0.5 * depth)] * 6), 0, "mix", rtol=1e-6, atol=1e-7)
    close(tm.mix_base, 1 - ramp ** (1 - 0.5 * depth), 0, "mix_base", rtol=1e-6, atol=1e-7)
    close(tm.decay_base, -6 + 5 * ramp ** (0.85 + depth), 0, "decay_base", rtol=1e-6, atol=1e-6)
    assert tm.iclr_base.tolist() == [0.0] * dim
    assert tm.removal_scale.tolist() == [pytest.approx(0.85)] * dim and tm.key_iclr_mix.tolist() == [1.0] * dim
    assert tm.bonus.shape == (2, 4) and torch.equal(tm.bonus, torch.full((2, 4), 0.1))
    assert tm.mix_down.shape == (dim, 6 * dim) and tm.mix_up.shape == (6, dim, dim)  # ranks capped at the width
    assert tm.decay_down.shape == (dim, dim) and tm.decay_up.shape == (dim, dim)
    assert tm.iclr_down.shape == (dim, dim) and tm.iclr_up.shape == (dim, dim)
    assert tm.gate.weight.shape == (dim, dim) and tm.gate.bias is None
    assert tm.norm.weight.tolist() == [1.0] * dim and tm.norm.bias.tolist() == [0.0] * dim
    assert tm.layer_id == 1 and tm.wkv_chunk == 2 and (tm.n_heads, tm.head_size, tm.dim) == (2, 4, dim)
    assert not hasattr(tm, "gate_down") and not tm.value_residual
    # first and only layers have depth 0
    for layer_id, n_layers in ((0, 3), (0, 1)):
        first = TimeMix(dim, 4, layer_id, n_layers, 2)
        close(first.mix_base, 1 - ramp, 0, "mix_base depth 0", rtol=1e-6, atol=1e-7)
        close(first.decay_base, -6 + 5 * ramp ** 0.85, 0, "decay_base depth 0", rtol=1e-6, atol=1e-6)
    for layer_id, n_layers in ((2, 3), (1, 2)):  # depth 1
        last = TimeMix(dim, 4, layer_id, n_layers, 2)
        close(last.decay_base, -6 + 5 * ramp ** 1.85, 0, "decay_base depth 1", rtol=1e-6, atol=1e-6)
        close(last.mix, torch.stack([1 - ramp ** 0.8] * 6), 0, "mix depth 1", rtol=1e-6, atol=1e-7)
        close(last.mix_base, 1 - ramp ** 0.5, 0, "mix_base depth 1", rtol=1e-6, atol=1e-7)


@torch.no_grad()
def test_time_mix_random_init_ranges():
    """Low-rank paths uniform in +-1e-2, r/k/v/gate uniform in +-0.5/sqrt(C), output normal with std
    0.1/sqrt(C) (width 64: thousands of draws per tensor, bounds far from sampling noise)."""
    torch.manual_seed(fresh_seed())
    dim = 64
    tm = TimeMix(dim, 16, 0, 2, 16)
    for name in ("mix_down", "mix_up", "decay_down", "decay_up", "iclr_down", "iclr_up"):
        p = getattr(tm, name)
        assert p.abs().max() <= 1e-2 and p.abs().max() > 0.009 and p.min() < 0 < p.max(), name
        assert abs(float(p.mean())) < 1e-3, name
    bound = 0.5 / math.sqrt(dim)
    for lin in (tm.receptance, tm.key, tm.value, tm.gate):
        w = lin.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound and abs(float(w.mean())) < 0.1 * bound
    std = float(tm.output.weight.std())
    assert 0.8 * 0.1 / math.sqrt(dim) < std < 1.2 * 0.1 / math.sqrt(dim)
    assert abs(float(tm.output.weight.mean())) < 0.02 / math.sqrt(dim)
    assert tm.mix_down.shape == (dim, 6 * 32) and tm.decay_down.shape == (dim, 64) and tm.iclr_down.shape == (dim, 32)


def test_wiring_check_and_rank_rule():
    assert TimeMixWiring().check() == TimeMixWiring("ddlerp", "sigmoid_full", False, "hierarchos")
    for field, bad in (("token_shift", "lerp"), ("gate", "tanh"), ("init", "x060")):
        with pytest.raises(ValueError, match=f"unknown {field} '{bad}'"):
            TimeMixWiring(**{field: bad}).check()
        with pytest.raises(ValueError):
            TimeMix(8, 4, 0, 1, 2, TimeMixWiring(**{field: bad}))
    # 32 * round(scale * sqrt(C) / 32), at least 32, at most C
    assert x070_rank(5.0, 768) == min(768, max(32, 32 * round(5 * math.sqrt(768) / 32)))
    assert x070_rank(5.0, 768) == 128 and x070_rank(1.7, 768) == 32 and x070_rank(1.7, 16) == 16
    assert x070_rank(5.0, 4096) == 320 and x070_rank(0.1, 4096) == 32


# ---- RWKV-4 time mix ------------------------------------------------------------------------------------

def time_mix4_by_hand(tm: TimeMix4, x, shift_prev, a0, b0, frozen):
    """a_t = e^w a + e^k v, b_t = e^w b + e^k, o_t = (a + e^{u+k} v) / (b + e^{u+k}), w = -exp(time_decay);
    a frozen token changes nothing; out = W_o (sigmoid(r) * o)."""
    B, T, C = x.shape
    x_prev, carry = previous_live(x, shift_prev, frozen)
    w, u = -torch.exp(tm.time_decay), tm.time_first
    a, bb = a0.clone(), b0.clone()
    out = torch.empty_like(x)
    for b in range(B):
        for t in range(T):
            xt, xp = x[b, t], x_prev[b, t]
            k = tm.key.weight @ (xp + tm.mix_key * (xt - xp))
            v = tm.value.weight @ (xp + tm.mix_value * (xt - xp))
            r = tm.receptance.weight @ (xp + tm.mix_receptance * (xt - xp))
            o = (a[b] + torch.exp(u + k) * v) / (bb[b] + torch.exp(u + k))
            out[b, t] = tm.output.weight @ (torch.sigmoid(r) * o)
            if frozen is None or not bool(frozen[b, t]):
                a[b] = torch.exp(w) * a[b] + torch.exp(k) * v
                bb[b] = torch.exp(w) * bb[b] + torch.exp(k)
    return out, carry, a, bb


@pytest.mark.parametrize("with_frozen", [False, True])
def test_time_mix4_equals_the_rule_by_hand(with_frozen):
    seed = fresh_seed()
    torch.manual_seed(seed)
    tm = TimeMix4(6, 1, 3, 32).double()
    assert tm.wkv_chunk == 16
    perturb(tm, seed)
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 5
    x = torch.randn(B, T, 6, generator=g, dtype=D)
    shift = torch.randn(B, 6, generator=g, dtype=D)
    # a state that has seen something: a = aa e^pp, b = bb e^pp
    aa, bb = torch.randn(B, 6, generator=g, dtype=D), torch.rand(B, 6, generator=g, dtype=D) + 0.5
    pp = torch.randn(B, 6, generator=g, dtype=D)
    frozen = frozen_mask(B, T, seed) if with_frozen else None
    with torch.no_grad():
        out, new_shift, new_state = tm(x, shift, torch.stack([aa, bb, pp], 1), frozen)
        want, want_shift, a, b = time_mix4_by_hand(tm, x, shift, aa * pp.exp(), bb * pp.exp(), frozen)
    assert new_state.shape == (B, 3, 6) and new_state.dtype == D
    close(out, want, seed, "output")
    close(new_shift, want_shift, seed, "shift")
    close(new_state[:, 0] * new_state[:, 2].exp(), a, seed, "a")
    close(new_state[:, 1] * new_state[:, 2].exp(), b, seed, "b")


def test_time_mix4_float32_state_and_small_chunk():
    seed = fresh_seed()
    torch.manual_seed(seed)
    tm = TimeMix4(6, 0, 1, 2)
    assert tm.wkv_chunk == 2
    perturb(tm, seed)
    g = torch.Generator().manual_seed(seed)
    x, shift = torch.randn(1, 5, 6, generator=g), torch.randn(1, 6, generator=g)
    state = torch.stack([torch.zeros(1, 6), torch.zeros(1, 6), torch.full((1, 6), -1e38)], 1)
    with torch.no_grad():
        out, new_shift, new_state = tm(x, shift, state)
        want, _, a, _ = time_mix4_by_hand(tm.double(), x.double(), shift.double(), torch.zeros(1, 6, dtype=D),
                                          torch.zeros(1, 6, dtype=D), None)
    assert out.dtype == new_shift.dtype == new_state.dtype == torch.float32
    close(out.double(), want, seed, "output", rtol=1e-4, atol=1e-5)


def test_time_mix4_initial_values():
    """RWKV-4's init for layer 1 of 3 at width 4: depth 0.5, shallow 2/3."""
    torch.manual_seed(fresh_seed())
    tm = TimeMix4(4, 1, 3, 8)
    channel = torch.tensor([0, 1 / 3, 2 / 3, 1.0])
    ramp = torch.tensor([0, 0.25, 0.5, 0.75])
    shallow = 1 - 1 / 3
    close(tm.time_decay, -5 + 8 * channel ** (0.7 + 1.3 * 0.5), 0, "time_decay", rtol=1e-6, atol=1e-6)
    # zigzag 0.5 * (((c + 1) % 3) - 1): 0, 0.5, -0.5, 0
    close(tm.time_first, math.log(0.3) + torch.tensor([0.0, 0.5, -0.5, 0.0]), 0, "time_first", rtol=1e-6, atol=1e-6)
    close(tm.mix_key, ramp ** shallow, 0, "mix_key", rtol=1e-6, atol=1e-7)
    close(tm.mix_value, ramp ** shallow + 0.3 * 0.5, 0, "mix_value", rtol=1e-6, atol=1e-7)
    close(tm.mix_receptance, ramp ** (0.5 * shallow), 0, "mix_receptance", rtol=1e-6, atol=1e-7)
    for layer_id, n_layers in ((0, 1), (0, 2)):  # depth 0, shallow 1
        first = TimeMix4(4, layer_id, n_layers, 8)
        close(first.time_decay, -5 + 8 * channel ** 0.7, 0, "time_decay depth 0", rtol=1e-6, atol=1e-6)
        close(first.mix_key, ramp, 0, "mix_key shallow 1", rtol=1e-6, atol=1e-7)
        close(first.mix_value, ramp, 0, "mix_value depth 0", rtol=1e-6, atol=1e-7)
    last = TimeMix4(4, 1, 2, 8)  # depth 1, shallow 1/2
    close(last.time_decay, -5 + 8 * channel ** 2.0, 0, "time_decay depth 1", rtol=1e-6, atol=1e-6)
    close(last.mix_receptance, ramp ** 0.25, 0, "mix_receptance", rtol=1e-6, atol=1e-7)
    big = TimeMix4(64, 0, 2, 8)
    bound = 0.5 / math.sqrt(64)
    for lin in (big.receptance, big.key, big.value):
        assert lin.bias is None and bound >= lin.weight.abs().max() > 0.95 * bound
        assert lin.weight.min() < -0.95 * bound and lin.weight.max() > 0.95 * bound
    two = TimeMix4(2, 0, 1, 8)  # channel c / (C - 1): 0 and 1 at width 2
    close(two.time_decay, torch.tensor([-5.0, 3.0]), 0, "time_decay width 2", rtol=1e-6, atol=1e-6)
    assert big.output.bias is None and 0.8 * 0.1 / 8 < float(big.output.weight.std()) < 1.2 * 0.1 / 8


# ---- channel mix, block, stack -----------------------------------------------------------------------------

def channel_mix_by_hand(cm: ChannelMix, x, shift_prev, gate, frozen):
    x_prev, carry = previous_live(x, shift_prev, frozen)
    xk = x + (x_prev - x) * cm.mix
    pre = xk @ cm.gate.weight.T
    hidden = pre / (1 + torch.exp(-pre)) * (xk @ cm.up.weight.T)
    if gate is not None:
        hidden = hidden * gate
    return hidden @ cm.down.weight.T, carry


@pytest.mark.parametrize("with_frozen", [False, True])
def test_channel_mix_equals_swiglu_by_hand(with_frozen):
    seed = fresh_seed()
    torch.manual_seed(seed)
    cm = ChannelMix(4, 12, 1, 3).double()
    perturb(cm, seed)
    g = torch.Generator().manual_seed(seed)
    x, shift = torch.randn(2, 5, 4, generator=g, dtype=D), torch.randn(2, 4, generator=g, dtype=D)
    gate = torch.randn(2, 5, 12, generator=g, dtype=D)
    frozen = frozen_mask(2, 5, seed) if with_frozen else None
    with torch.no_grad():
        for deep in (None, gate):
            out, carry = cm(x, shift, deep, frozen)
            want, want_carry = channel_mix_by_hand(cm, x, shift, deep, frozen)
            close(out, want, seed, f"channel mix gate={deep is not None}")
            close(carry, want_carry, seed, "carry")


def test_channel_mix_initial_values():
    torch.manual_seed(fresh_seed())
    ramp = torch.tensor([0, 0.25, 0.5, 0.75])
    for layer_id, n_layers, depth in ((1, 3, 0.5), (0, 1, 0.0), (2, 3, 1.0), (1, 2, 1.0)):
        cm = ChannelMix(4, 8, layer_id, n_layers)
        close(cm.mix, 1 - ramp ** (1 - 0.5 * depth), 0, "mix", rtol=1e-6, atol=1e-7)
        assert cm.gate.weight.shape == cm.up.weight.shape == (8, 4) and cm.down.weight.shape == (4, 8)
        assert cm.gate.bias is None and cm.up.bias is None and cm.down.bias is None
    big = ChannelMix(16, 256, 0, 2)
    assert 0.8 * 0.1 / 16 < float(big.down.weight.std()) < 1.2 * 0.1 / 16


@pytest.mark.parametrize("time_mix", ["rwkv7", "wkv4"])
def test_block_is_pre_norm_residual_time_then_channel(time_mix):
    seed = fresh_seed()
    torch.manual_seed(seed)
    block = RWKVBlock(8, 4, 16, 1, 2, 4, time_mix).double()
    assert isinstance(block.time_mix, TimeMix4 if time_mix == "wkv4" else TimeMix)
    perturb(block, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, generator=g, dtype=D)
    tm_shift, cm_shift = torch.randn(2, 8, generator=g, dtype=D), torch.randn(2, 8, generator=g, dtype=D)
    wkv = (torch.randn(2, 2, 4, 4, generator=g, dtype=D) if time_mix == "rwkv7" else
           torch.stack([torch.zeros(2, 8), torch.zeros(2, 8), torch.full((2, 8), -1e38)], 1).double())
    gate = torch.randn(2, 4, 16, generator=g, dtype=D)
    frozen = frozen_mask(2, 4, seed)
    ln = torch.nn.functional.layer_norm
    with torch.no_grad():
        y, s_tm, s_wkv, s_cm, v_first = block(x, tm_shift, wkv, cm_shift, gate, frozen)
        h = ln(x, (8,), block.ln_time.weight, block.ln_time.bias, 1e-5)
        att, want_tm, want_wkv = block.time_mix(h, tm_shift, wkv, frozen)[:3]
        mid = x + att
        ffn, want_cm = channel_mix_by_hand(block.channel_mix, ln(mid, (8,), block.ln_channel.weight,
                                                                 block.ln_channel.bias, 1e-5), cm_shift, gate, frozen)
    assert v_first is None
    close(y, mid + ffn, seed, "block output")
    close(s_tm, want_tm, seed, "tm shift")
    close(s_wkv, want_wkv, seed, "wkv")
    close(s_cm, want_cm, seed, "cm shift")


@pytest.mark.parametrize("time_mix", ["rwkv7", "wkv4"])
def test_stack_init_state(time_mix):
    stack = RWKVStack(8, 3, 4, 2, 11, False, False, 4, time_mix)
    assert all(type(b.time_mix) is (TimeMix4 if time_mix == "wkv4" else TimeMix) for b in stack.blocks)
    assert stack.time_mix == time_mix and stack.per_block_deepembed is False and stack.deepembed is None
    assert RWKVStack(8, 2, 4, 2, 11, True, True, 4, time_mix).per_block_deepembed is True
    state = stack.init_state(2)
    assert set(state) == {"tm_shift", "wkv", "cm_shift"}
    for name in ("tm_shift", "cm_shift"):
        assert state[name].shape == (3, 2, 8) and state[name].dtype == torch.float32
        assert not state[name].any()
    wkv = state["wkv"]
    assert wkv.dtype == torch.float32
    if time_mix == "wkv4":
        assert wkv.shape == (3, 2, 3, 8)
        assert not wkv[:, :, :2].any() and (wkv[:, :, 2] == -1e38).all()
    else:
        assert wkv.shape == (3, 2, 2, 4, 4) and not wkv.any()
    s64 = stack.init_state(1, dtype=D)
    assert s64["wkv"].dtype == D and s64["tm_shift"].dtype == D
    s16 = stack.init_state(1, dtype=torch.bfloat16)
    assert s16["wkv"].dtype == torch.float32 and s16["cm_shift"].dtype == torch.bfloat16
    meta = stack.init_state(2, device="meta")  # the device reaches every part
    assert all(t.device.type == "meta" for t in meta.values())
    with pytest.raises(ValueError, match="time_mix 'wkv5'"):
        RWKVStack(8, 1, 4, 2, 11, False, False, 4, "wkv5")


@pytest.mark.parametrize("per_block", [False, True])
def test_stack_runs_its_blocks_in_order_with_their_gates(per_block):
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = RWKVStack(8, 3, 4, 2, 11, True, per_block, 4).double()
    assert len(stack.deepembed) == (3 if per_block else 1) and stack.deepembed[0].weight.shape == (11, 16)
    assert [b.time_mix.layer_id for b in stack.blocks] == [0, 1, 2]
    assert stack.blocks[0].channel_mix.gate.weight.shape == (16, 8)
    perturb(stack, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, generator=g, dtype=D)
    tokens = torch.randint(0, 11, (2, 4), generator=g)
    state = {name: t + torch.randn(t.shape, generator=g, dtype=D) * 0.3
             for name, t in stack.init_state(2, dtype=D).items()}
    frozen = frozen_mask(2, 4, seed)
    with torch.no_grad():
        y, new = stack(x, tokens, state, frozen)
        h = x
        for i, block in enumerate(stack.blocks):
            gate = stack.deepembed[i if per_block else 0].weight[tokens]
            h, s_tm, s_wkv, s_cm, _ = block(h, state["tm_shift"][i], state["wkv"][i], state["cm_shift"][i], gate, frozen)
            close(new["tm_shift"][i], s_tm, seed, f"tm_shift {i}")
            close(new["wkv"][i], s_wkv, seed, f"wkv {i}")
            close(new["cm_shift"][i], s_cm, seed, f"cm_shift {i}")
    close(y, h, seed, "stack output")
    assert set(new) == {"tm_shift", "wkv", "cm_shift"}


def test_stack_without_deepembed_and_with_checkpointing():
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = RWKVStack(8, 2, 4, 2, 11, False, False, 4).double()
    assert stack.deepembed is None and not stack.gradient_checkpointing
    perturb(stack, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 8, generator=g, dtype=D, requires_grad=True)
    tokens = torch.randint(0, 11, (1, 3), generator=g)
    y, _ = stack(x, tokens, stack.init_state(1, dtype=D))
    h = x
    for block in stack.blocks:
        h = block(h, *(torch.zeros(1, 8, dtype=D), torch.zeros(1, 2, 4, 4, dtype=D), torch.zeros(1, 8, dtype=D)))[0]
    close(y, h, seed, "no deepembed")
    calls = []
    real = rwkv.checkpoint
    stack.gradient_checkpointing = True
    try:
        rwkv.checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
        y2, _ = stack(x, tokens, stack.init_state(1, dtype=D))
        assert len(calls) == 2
        with torch.no_grad():
            stack(x, tokens, stack.init_state(1, dtype=D))
        assert len(calls) == 2  # no checkpointing without gradients
    finally:
        rwkv.checkpoint = real
    close(y2, y, seed, "checkpointed")
    # an input without gradient (a frozen embedding): the blocks' parameters still get theirs, equal
    # to the plain run's (a reentrant checkpoint would cut them off)
    x0 = x.detach()
    grads = []
    for flag in (False, True):
        stack.gradient_checkpointing = flag
        stack.zero_grad()
        out, new = stack(x0, tokens, stack.init_state(1, dtype=D))
        (out.pow(2).sum() + new["wkv"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(stack.parameters()))
    for name in grads[0]:
        close(grads[1][name], grads[0][name], seed, f"grad {name}")


def test_compile_blocks_marks_every_rwkv_block_and_uncompile_undoes_it(monkeypatch):
    """Without running a compiled graph (tests/test_compile.py does): every RWKVBlock gets a compiled
    call with the backend asked for, nothing else does, the recurrences become dynamo-disabled calls
    (once), the cache holds 64 variants at least, and uncompile_blocks drops the compiled calls."""
    import torch._dynamo

    monkeypatch.setattr(rwkv, "_wkv7_opaque", rwkv.wkv7)
    monkeypatch.setattr(rwkv, "_wkv4_opaque", rwkv.wkv4)
    limit = rwkv.recompile_limit_name()
    before = getattr(torch._dynamo.config, limit)
    setattr(torch._dynamo.config, limit, 8)  # restored below: no delattr on dynamo's config
    try:
        _check_compile_blocks(monkeypatch, limit)
    finally:
        setattr(torch._dynamo.config, limit, before)


def _check_compile_blocks(monkeypatch, limit):
    from hierarchos.config import tiny_config
    from hierarchos.model import HierarchosLM

    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or real(fn, **kw))
    model = HierarchosLM(tiny_config(h_layers=2, l_layers=3))
    blocks = [m for m in model.modules() if isinstance(m, RWKVBlock)]
    assert len(blocks) == 5
    assert rwkv.compile_blocks(model, backend="eager") == 5
    assert all(b._compiled_call_impl is not None for b in blocks)
    # the five blocks and the memory's chunk segment (compiled with any backend but CPU inductor)
    assert [kw["backend"] for kw in compiled] == ["eager"] * 6 and all(kw["dynamic"] is None for kw in compiled)
    assert model.memory._segment_call is not None
    assert all(m._compiled_call_impl is None for m in model.modules() if not isinstance(m, RWKVBlock))
    assert rwkv._wkv7_opaque is not rwkv.wkv7 and rwkv._wkv4_opaque is not rwkv.wkv4
    assert getattr(torch._dynamo.config, limit) == 64
    opaque7, opaque4 = rwkv._wkv7_opaque, rwkv._wkv4_opaque
    setattr(torch._dynamo.config, limit, 100)
    assert rwkv.compile_blocks(model, backend="eager") == 5
    assert rwkv._wkv7_opaque is opaque7 and rwkv._wkv4_opaque is opaque4  # wrapped once, not twice
    assert getattr(torch._dynamo.config, limit) == 100
    rwkv.uncompile_blocks(model)
    assert all(m._compiled_call_impl is None for m in model.modules()) and model.memory._segment_call is None
    assert rwkv.compile_blocks(torch.nn.Linear(2, 2)) == 0
    compiled.clear()
    # the default backend; the CPU model's memory stays eager under inductor
    assert rwkv.compile_blocks(model) == 5 and [kw["backend"] for kw in compiled] == ["inductor"] * 5
    rwkv.uncompile_blocks(model)
    # the opaque recurrences are the plain ones behind dynamo's disable (calling them would cost seconds)
    assert opaque7.__wrapped__ is rwkv.wkv7 and opaque7._torchdynamo_disable
    assert opaque4.__wrapped__ is rwkv.wkv4 and opaque4._torchdynamo_disable


# ---- dtypes under autocast, the chunk size that reaches the recurrence -----------------------------------

def rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


def test_cells_under_bf16_autocast_feed_bf16_to_the_matmuls_and_keep_the_carried_dtypes():
    """A float32 module under CPU bf16 autocast: the mixes and the recurrence's output reach the output
    projection in bf16, the carried shift and state keep their float32, and the values follow the
    float64 rule to bf16 precision."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    tm, tm4, cm = TimeMix(8, 4, 1, 2, 4), TimeMix4(8, 1, 2, 4), ChannelMix(8, 16, 1, 2)
    for m in (tm, tm4, cm):
        perturb(m, seed)
    static = TimeMix(8, 4, 1, 2, 4, TimeMixWiring(token_shift="static"))
    perturb(static, seed)
    seen = {}  # what each projection is handed, before autocast's own cast: the mixes themselves in bf16
    for name, lin in (("tm", tm.output), ("tm_receptance", tm.receptance), ("tm_key", tm.key),
                      ("static_receptance", static.receptance), ("tm4", tm4.output), ("tm4_key", tm4.key),
                      ("tm4_value", tm4.value), ("tm4_receptance", tm4.receptance), ("cm", cm.down),
                      ("cm_gate", cm.gate)):
        lin.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].dtype))
    real7 = rwkv._wkv7_opaque
    recurrence_dtypes = []
    rwkv._wkv7_opaque = lambda *a, **k: recurrence_dtypes.append([t.dtype for t in a]) or real7(*a, **k)
    g = torch.Generator().manual_seed(seed)
    x, shift = torch.randn(2, 5, 8, generator=g), torch.randn(2, 8, generator=g)
    state7 = torch.randn(2, 2, 4, 4, generator=g) * 0.3
    aa, bb, pp = torch.randn(2, 8, generator=g), torch.rand(2, 8, generator=g) + 0.5, torch.randn(2, 8, generator=g)
    state4 = torch.stack([aa, bb, pp], 1)
    gate = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                out7, shift7, new7, _ = tm(x, shift, state7)
            finally:
                rwkv._wkv7_opaque = real7
            static(x, shift, state7)
            out4, shift4, new4 = tm4(x, shift, state4)
            outc, shiftc = cm(x, shift, gate.bfloat16())  # DeepEmbed hands its gates over in the autocast dtype
        want7, want_shift, want_state7 = time_mix_by_hand(tm.double(), x.double(), shift.double(), state7.double(), None)
        want4, _, a, _ = time_mix4_by_hand(tm4.double(), x.double(), shift.double(), (aa * pp.exp()).double(),
                                           (bb * pp.exp()).double(), None)
        wantc, _ = channel_mix_by_hand(cm.double(), x.double(), shift.double(), gate.double(), None)
    assert seen == {name: torch.bfloat16 for name in ("tm", "tm_receptance", "tm_key", "static_receptance", "tm4",
                                                      "tm4_key", "tm4_value", "tm4_receptance", "cm", "cm_gate")}, \
        f"seed={seed} {seen}"
    # the recurrence's inputs under autocast: r and v as the matmuls made them (bf16, upcast exactly
    # inside every path); the decay, the key (scaled by float32 parameters) and a, b in float32
    bf, f32 = torch.bfloat16, torch.float32
    assert recurrence_dtypes[0] == [bf, f32, f32, bf, f32, f32], f"seed={seed}"
    assert shift7.dtype == shift4.dtype == shiftc.dtype == torch.float32
    assert new7.dtype == new4.dtype == torch.float32
    # the carried shift is the last token itself (to bf16 precision)
    assert rel_err(shift7, want_shift) < 1e-2 and rel_err(shift4, want_shift) < 1e-2
    for got, want, what in ((out7, want7, "tm"), (new7, want_state7, "tm state"), (out4, want4, "tm4"),
                            (new4[:, 0] * new4[:, 2].exp(), a, "tm4 a"), (outc, wantc, "cm")):
        # bf16 rounding, heavy-tailed where the output cancels (400 seeds: at most 0.046); the float64
        # tests pin the rule, this one the dtypes and that the values still follow it
        assert rel_err(got, want) < 0.25, f"seed={seed} {what}: {rel_err(got, want)}"


def test_time_mix4_keeps_the_state_dtype():
    """A float32 cell carrying a float64 state hands back a float64 state (the recurrence computes in
    float32 there)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    tm4 = TimeMix4(6, 0, 2, 4)
    g = torch.Generator().manual_seed(seed)
    x, shift = torch.randn(1, 3, 6, generator=g), torch.randn(1, 6, generator=g, dtype=D)
    state = torch.stack([torch.zeros(1, 6), torch.zeros(1, 6), torch.full((1, 6), -1e38)], 1).double()
    with torch.no_grad():
        out, new_shift, new_state = tm4(x, shift, state)
    assert out.dtype == torch.float32 and new_shift.dtype == D and new_state.dtype == D
    close(new_shift, x[:, -1].double(), seed, "shift")


def test_the_configured_chunk_reaches_the_recurrence(monkeypatch):
    seen = []
    for name in ("_wkv7_opaque", "_wkv4_opaque"):
        real = getattr(rwkv, name)
        monkeypatch.setattr(rwkv, name, lambda *a, real=real, name=name, **k: seen.append((name, k["chunk_size"]))
                            or real(*a, **k))
    x, shift = torch.randn(1, 3, 8), torch.zeros(1, 8)
    with torch.no_grad():
        TimeMix(8, 4, 0, 1, 3)(x, shift, torch.zeros(1, 2, 4, 4))
        for chunk in (5, 40):
            TimeMix4(8, 0, 1, chunk)(x, shift, torch.stack([torch.zeros(1, 8)] * 2 + [torch.full((1, 8), -1e38)], 1))
    assert seen == [("_wkv7_opaque", 3), ("_wkv4_opaque", 5), ("_wkv4_opaque", rwkv.WKV4_MAX_CHUNK)]
    assert rwkv.WKV4_MAX_CHUNK == 16


def test_orthogonal_init_and_rank_rounding():
    """_orthogonal: orthonormal rows (wide) or columns (tall) times gain, a tall one times sqrt(rows / cols)
    more; x070_rank rounds to the nearest multiple of 32."""
    torch.manual_seed(fresh_seed())
    wide, tall, square = rwkv._orthogonal(2, 8, 0.5), rwkv._orthogonal(8, 2, 0.5), rwkv._orthogonal(4, 4, 3.0)
    close(wide @ wide.T, 0.25 * torch.eye(2), 0, "wide", rtol=1e-5, atol=1e-6)
    close(tall.T @ tall, (0.5 * 2) ** 2 * torch.eye(2), 0, "tall", rtol=1e-5, atol=1e-6)
    close(square @ square.T, 9 * torch.eye(4), 0, "square", rtol=1e-5, atol=1e-5)
    # scale * sqrt(C) = 48.5: 1.52 multiples of 32 -> 2 (64); 47 -> 1.47 -> 1 (32)
    assert x070_rank(48.5 / 32, 1024) == 64 and x070_rank(47 / 32, 1024) == 32


def test_value_residual_without_the_first_value_says_so():
    tm = TimeMix(8, 4, 1, 2, 4, TimeMixWiring(value_residual=True))
    with pytest.raises(ValueError, match=r"^TimeMix: value_residual needs the first layer's value \(v_first\)$"):
        tm(torch.zeros(1, 2, 8), torch.zeros(1, 8), torch.zeros(1, 2, 4, 4))


@torch.no_grad()
def test_x070_low_rank_up_projections_and_value_residual_base():
    """x070's gate and value-residual up-projections: orthonormal rows times 0.1 (rank 32 at width 64);
    the value residual's base 0.73 - 0.4 (c / (C - 1) - 0.5), also at width 2."""
    torch.manual_seed(fresh_seed())
    tm = TimeMix(64, 16, 1, 2, 16, TimeMixWiring("static", "lowrank", True, "x070"))
    for up in (tm.gate_up, tm.value_residual_up):
        assert up.shape == (32, 64)
        close(up @ up.T, 0.01 * torch.eye(32), 0, "orthonormal rows times 0.1", rtol=1e-5, atol=1e-6)
    assert not tm.gate_down.any() and not tm.value_residual_down.any()
    two = TimeMix(2, 2, 1, 2, 4, TimeMixWiring(value_residual=True))
    close(two.value_residual_base, torch.tensor([0.93, 0.53]), 0, "value residual base", rtol=1e-6, atol=1e-6)
    assert not hasattr(TimeMix(2, 2, 0, 2, 4, TimeMixWiring(value_residual=True)), "value_residual_base")


def test_recompile_limit_name_follows_what_dynamo_calls_it(monkeypatch):
    """`recompile_limit` where dynamo's config has it (torch >= 2.6, this one too), else the older
    `cache_size_limit`; checked on this torch and on stand-in configs of both kinds."""
    import types

    import torch._dynamo

    from hierarchos.model.rwkv import recompile_limit_name

    assert hasattr(torch._dynamo.config, "recompile_limit") and recompile_limit_name() == "recompile_limit"
    monkeypatch.setattr(torch._dynamo, "config", types.SimpleNamespace(recompile_limit=8, cache_size_limit=8))
    assert recompile_limit_name() == "recompile_limit"
    monkeypatch.setattr(torch._dynamo, "config", types.SimpleNamespace(cache_size_limit=8))
    assert recompile_limit_name() == "cache_size_limit"


def test_one_token_runs_the_traceable_recurrence_and_longer_calls_the_opaque_one(monkeypatch):
    """TimeMix calls `wkv7` itself for one token (torch.compile traces and fuses those few ops in the
    compiled generation step) and the dynamo-opaque `_wkv7_opaque` for T > 1 (T = 2 included)."""
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, args[0].shape[1]))
            return fn(*args, **kwargs)
        return wrapped

    original = rwkv.wkv7
    monkeypatch.setattr(rwkv, "wkv7", spy("wkv7", original))
    monkeypatch.setattr(rwkv, "_wkv7_opaque", spy("opaque", original))
    tm = TimeMix(8, 4, 1, 3, 2).double()
    with torch.no_grad():
        for T in (1, 2, 3):
            tm(torch.randn(1, T, 8, dtype=torch.float64), torch.zeros(1, 8, dtype=torch.float64),
               torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    assert calls == [("wkv7", 1), ("opaque", 2), ("opaque", 3)]
