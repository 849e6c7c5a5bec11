"""Rules of hierarchos/model/attention.py by hand on tiny inputs (tests/test_attention.py holds the
softmax oracle over whole stacks): RoPE angles and rotation, sinusoidal features (odd widths), the
learned table's last row for positions past it, RMSNorm, the block's residual order, the KV cache's
slot positions and contents (which entry sits in which slot, empty slots zero), the initial values
and state, the constructor's checks, and /status's summary line.

Random inputs from a fresh seed, printed on failure.
"""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from hierarchos.config import tiny_config
from hierarchos.model import attention
from hierarchos.model.attention import (AttentionBlock, AttentionStack, FeedForward, RMSNorm, SelfAttention,
                                        apply_rope, blocks_summary, rope_angles, sinusoidal_features)

D = torch.float64


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def close(a, b, seed, what, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"seed={seed} {what}: {m}")


def perturb(module, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def rms(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ---- positions -------------------------------------------------------------------------------------

def test_rope_angles_by_hand():
    angles = rope_angles(torch.tensor([[0, 1, 3]]), 4)   # frequencies 10000^(-0/4), 10000^(-2/4) = 1, 0.01
    assert angles.dtype == D and angles.shape == (1, 3, 2)
    close(angles[0], torch.tensor([[0.0, 0.0], [1.0, 0.01], [3.0, 0.03]], dtype=D), 0, "angles")
    big = rope_angles(torch.tensor([[10**7]]), 8)         # float64: a large position keeps its digits
    close(big[0, 0], torch.tensor([1e7, 1e6, 1e5, 1e4], dtype=D), 0, "large position")
    assert attention.ROPE_BASE == 10000.0
    meta = torch.zeros(2, 3, dtype=torch.long, device="meta")  # every part on the positions' device
    assert rope_angles(meta, 4).device.type == "meta" and sinusoidal_features(meta, 6).device.type == "meta"


def test_apply_rope_turns_channel_pairs_i_and_i_plus_half():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=D).view(1, 1, 1, 4)
    a, b = 0.3, -1.1
    cos = torch.tensor([math.cos(a), math.cos(b)], dtype=D).view(1, 1, 1, 2)
    sin = torch.tensor([math.sin(a), math.sin(b)], dtype=D).view(1, 1, 1, 2)
    out = apply_rope(x, cos, sin).flatten()
    # pair (0, 2) = 1 + 3i turned by a; pair (1, 3) = 2 + 4i turned by b
    z0, z1 = complex(1, 3) * complex(math.cos(a), math.sin(a)), complex(2, 4) * complex(math.cos(b), math.sin(b))
    close(out, torch.tensor([z0.real, z1.real, z0.imag, z1.imag], dtype=D), 0, "rotation")


@pytest.mark.parametrize("dim", [4, 5])
def test_sinusoidal_features_by_hand(dim):
    pos = torch.tensor([[0, 2], [7, 1]])
    feats = sinusoidal_features(pos, dim)
    assert feats.shape == (2, 2, dim) and feats.dtype == D
    for b in range(2):
        for t in range(2):
            p = int(pos[b, t])
            want = [math.sin(p / 10000 ** (c / dim)) if c % 2 == 0 else math.cos(p / 10000 ** ((c - 1) / dim))
                    for c in range(dim)]
            close(feats[b, t], torch.tensor(want, dtype=D), 0, f"position {p}")


def test_learned_positions_past_the_table_share_its_last_row():
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = AttentionStack(8, 1, 4, 2, 11, False, False, "learned", 0, max_positions=4).double()
    assert stack.position_table.weight.shape == (4, 8)
    perturb(stack, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 7, 8, generator=g, dtype=D)
    tokens = torch.zeros(1, 7, dtype=torch.long)
    seen = []
    hook = stack.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        stack(x, tokens, stack.init_state(1, dtype=D))
    hook.remove()
    rows = stack.position_table.weight[[0, 1, 2, 3, 3, 3, 3]]
    close(seen[0], x + rows[None], seed, "block input")


@pytest.mark.parametrize("pos_encodings", ["sinusoidal", "rope", "none"])
def test_positions_skip_frozen_rows_and_continue_the_state(pos_encodings):
    """Position of a row = the state's pos + the live rows before it (a frozen row takes the next one)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = AttentionStack(8, 1, 4, 2, 11, False, False, pos_encodings, 0).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 8, generator=g, dtype=D)
    frozen = torch.tensor([[False, True, False, True, False], [True, False, False, False, True]])
    state = stack.init_state(2, dtype=D)
    state["pos"] = torch.tensor([3, 0])
    state["key"] = torch.zeros(1, 2, 2, 3, 4, dtype=D)
    state["value"] = torch.zeros(1, 2, 2, 3, 4, dtype=D)
    want_pos = torch.tensor([[3, 4, 4, 5, 5], [0, 0, 1, 2, 3]])
    seen, angles = [], []
    hook = stack.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args))
    real = attention.rope_angles
    attention.rope_angles = lambda p, n: angles.append(p.clone()) or real(p, n)
    try:
        with torch.no_grad():
            _, new = stack(x, torch.zeros(2, 5, dtype=torch.long), state, frozen)
    finally:
        attention.rope_angles = real
        hook.remove()
    assert new["pos"].tolist() == [6, 3]
    block_in, rope = seen[0][0], seen[0][1]
    if pos_encodings == "sinusoidal":
        close(block_in, x + sinusoidal_features(want_pos, 8), seed, "sinusoidal input")
        f32 = AttentionStack(8, 1, 4, 2, 11, False, False, pos_encodings, 0)  # float64 features, cast to x's dtype
        with torch.no_grad():
            assert f32(x.float(), torch.zeros(2, 5, dtype=torch.long), f32.init_state(2))[0].dtype == torch.float32
    else:
        close(block_in, x, seed, "input")
    if pos_encodings == "rope":
        assert torch.equal(angles[0], want_pos)
        ang = real(want_pos, 4)[:, None]
        close(rope[0], ang.cos(), seed, "cos")
        close(rope[1], ang.sin(), seed, "sin")
    else:
        assert rope is None and not angles


# ---- layers ------------------------------------------------------------------------------------------

def test_rms_norm_hands_the_kernel_a_weight_of_the_inputs_dtype(monkeypatch):
    """The fused kernel needs input and weight in one dtype (else torch warns once and takes the slow
    path, which a warning filter cannot see twice): the weight goes in as the input's dtype."""
    seen = []
    real = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, w, eps: seen.append((x.dtype, w.dtype)) or real(x, shape, w, eps))
    norm = RMSNorm(4, eps=1e-6)
    for dtype in (torch.bfloat16, D, torch.float32):
        assert norm(torch.randn(2, 4).to(dtype)).dtype == dtype
    assert seen == [(torch.bfloat16, torch.bfloat16), (D, D), (torch.float32, torch.float32)]


def test_rms_norm_follows_the_input_dtype_with_eps_1e_6():
    seed = fresh_seed()
    norm = RMSNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
    x = torch.tensor([[1e-3, -2e-3, 0.5e-3, 1e-3]], dtype=D)   # mean square ~1.6e-6: the eps matters
    out = norm(x)
    assert out.dtype == D
    close(out, rms(x, norm.weight.double()), seed, "rms norm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a float32 weight with bf16 input warns and skips the fused kernel
        assert norm(x.bfloat16()).dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_self_attention_causal_and_masked_by_hand():
    seed = fresh_seed()
    torch.manual_seed(seed)
    att = SelfAttention(4, 2, 3).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 4, generator=g, dtype=D)
    q, k, v = (x[0] @ lin.weight.T for lin in (att.query, att.key, att.value))

    def by_hand(keys, values, allowed):
        out = torch.zeros(3, 4, dtype=D)
        for t in range(3):
            for h in range(2):
                sl = slice(2 * h, 2 * h + 2)
                js = [j for j in range(keys.shape[0]) if allowed(t, j)]
                s = torch.stack([q[t, sl] @ keys[j, sl] for j in js]) / math.sqrt(2)
                w = torch.softmax(s, 0)
                out[t, sl] = sum(wj * values[j, sl] for wj, j in zip(w, js))
        return out @ att.output.weight.T

    empty = torch.zeros(1, 2, 0, 2, dtype=D)
    with torch.no_grad():
        out, key, value = att(x, None, empty, empty, None)
    close(out[0], by_hand(k, v, lambda t, j: j <= t), seed, "causal")
    close(key[0].transpose(0, 1).reshape(3, 4), k, seed, "keys")
    close(value[0].transpose(0, 1).reshape(3, 4), v, seed, "values")
    ck, cv = torch.randn(1, 2, 2, 2, generator=g, dtype=D), torch.randn(1, 2, 2, 2, generator=g, dtype=D)
    mask = torch.tensor([[[True, False, True, False, False], [False, True, True, True, False],
                          [True, True, False, False, True]]])
    keys = torch.cat([ck[0].transpose(0, 1).reshape(2, 4), k])
    values = torch.cat([cv[0].transpose(0, 1).reshape(2, 4), v])
    with torch.no_grad():
        out, _, _ = att(x, None, ck, cv, mask)
    close(out[0], by_hand(keys, values, lambda t, j: bool(mask[0, t, j])), seed, "masked with cache")


@torch.no_grad()
def test_initial_values():
    torch.manual_seed(fresh_seed())
    att = SelfAttention(64, 16, 4)
    assert (att.n_heads, att.head_size) == (4, 16)
    for lin in (att.query, att.key, att.value):
        assert lin.bias is None and 0.9 / 8 < float(lin.weight.std()) < 1.1 / 8 and abs(float(lin.weight.mean())) < 0.015
    std = 0.1 / math.sqrt(64 * 4)
    assert att.output.bias is None and 0.9 * std < float(att.output.weight.std()) < 1.1 * std
    ffn = FeedForward(16, 256)
    assert ffn.gate.weight.shape == ffn.up.weight.shape == (256, 16) and ffn.down.weight.shape == (16, 256)
    assert ffn.gate.bias is None and ffn.up.bias is None and ffn.down.bias is None
    assert 0.9 * 0.1 / 16 < float(ffn.down.weight.std()) < 1.1 * 0.1 / 16
    block = AttentionBlock(8, 4, 16, 2)
    assert block.norm_attention.eps == 1e-6 and block.norm_ffn.eps == 1e-6
    assert block.norm_attention.weight.shape == (8,) and block.channel_mix.up.weight.shape == (16, 8)
    stack = AttentionStack(8, 3, 4, 2, 11, True, True, "learned", 5, max_positions=6)
    assert len(stack.blocks) == 3 and len(stack.deepembed) == 3 and stack.deepembed[0].weight.shape == (11, 16)
    assert stack.blocks[0].channel_mix.down.weight.shape == (8, 16)
    big = AttentionStack(64, 1, 16, 1, 11, False, False, "learned", 0, max_positions=64)
    assert 0.9 * 0.02 < float(big.position_table.weight.std()) < 1.1 * 0.02 and big.deepembed is None
    assert stack.blocks[1].attention.output.weight.shape == (8, 8)
    default = AttentionStack(8, 1, 4, 1, 11, False, False)
    assert default.pos_encodings == "rope" and default.window_size == 0 and default.position_table is None
    learned = AttentionStack(8, 1, 4, 1, 11, False, False, "learned")
    assert learned.position_table.num_embeddings == 1024
    one = AttentionStack(8, 1, 4, 1, 11, True, False, "rope", 0)
    assert len(one.deepembed) == 1 and one.position_table is None and not one.gradient_checkpointing
    with pytest.raises(ValueError, match="pos_encodings 'alibi'"):
        AttentionStack(8, 1, 4, 1, 11, False, False, "alibi")


def test_init_state():
    stack = AttentionStack(8, 3, 4, 2, 11, False, False, "rope", 5)
    state = stack.init_state(2)
    assert set(state) == {"key", "value", "pos"}
    for name in ("key", "value"):
        assert state[name].shape == (3, 2, 2, 5, 4) and state[name].dtype == torch.float32 and not state[name].any()
    assert state["pos"].dtype == torch.long and state["pos"].tolist() == [0, 0]
    assert stack.init_state(1, dtype=D)["key"].dtype == D
    assert all(t.device.type == "meta" for t in stack.init_state(2, device="meta").values())
    full = AttentionStack(8, 1, 4, 2, 11, False, False, "rope", 0).init_state(3)
    assert full["key"].shape == (1, 3, 2, 0, 4)


def test_slot_positions_by_hand():
    ring = AttentionStack(8, 1, 4, 2, 11, False, False, "rope", 3)
    # pos 5: entries 2, 3, 4 in slots 2, 0, 1; pos 1: entry 0 in slot 0, slots 1, 2 empty (negative)
    assert ring.slot_positions(torch.tensor([5, 1, 0, 3]), 3).tolist() == [[3, 4, 2], [0, -2, -1], [-3, -2, -1],
                                                                         [0, 1, 2]]
    full = AttentionStack(8, 1, 4, 2, 11, False, False, "rope", 0)
    assert full.slot_positions(torch.tensor([2, 4]), 4).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("window", [0, 1, 3])
def test_cache_holds_each_live_entry_in_its_slot(window):
    """pos_encodings 'none', one layer: the value cache's slot of position p holds W_v rmsnorm(x) of the
    p-th live row over everything consumed; empty slots are zero; keys likewise. A last call with
    every row frozen keeps the cache as it was."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = AttentionStack(8, 1, 4, 2, 11, False, False, "none", window).double()
    perturb(stack, seed)
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 5
    x1, x2 = torch.randn(B, 2, 8, generator=g, dtype=D), torch.randn(B, T, 8, generator=g, dtype=D)
    f1 = torch.tensor([[True, True], [False, True]])
    f2 = torch.tensor([[False, True, False, False, True], [True, True, False, True, True]])
    tokens = torch.zeros(B, 2, dtype=torch.long)
    with torch.no_grad():
        _, mid = stack(x1, tokens, stack.init_state(B, dtype=D), f1)
        _, new = stack(x2, torch.zeros(B, T, dtype=torch.long), mid, f2)
        _, new = stack(torch.randn(B, 2, 8, generator=g, dtype=D), tokens, new, torch.ones(B, 2, dtype=torch.bool))
    block = stack.blocks[0]
    live = [[x1[b, t] for t in range(2) if not f1[b, t]] + [x2[b, t] for t in range(T) if not f2[b, t]]
            for b in range(B)]
    assert new["pos"].tolist() == [len(r) for r in live] == [3, 2] and mid["pos"].tolist() == [0, 1]
    n_slots = window or 3
    assert new["key"].shape == (1, B, 2, n_slots, 4)
    for b in range(B):
        for s in range(n_slots):
            p = s if not window else max(p for p in range(-window, len(live[b])) if p % window == s)
            for name, lin in (("value", block.attention.value), ("key", block.attention.key)):
                got = new[name][0, b, :, s].reshape(8)
                if 0 <= p < len(live[b]):
                    close(got, rms(live[b][p], block.norm_attention.weight) @ lin.weight.T, seed, f"{name} b={b} s={s}")
                else:
                    assert not got.any(), f"seed={seed} {name} b={b} slot {s} should be empty"


def test_frozen_query_sees_its_own_key_and_checkpointing():
    """A call whose rows are all frozen still gives finite outputs (each query sees itself), writes
    nothing; gradient checkpointing runs each block through checkpoint only with gradients."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = AttentionStack(8, 2, 4, 2, 11, True, False, "rope", 0).double()
    perturb(stack, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 8, generator=g, dtype=D, requires_grad=True)
    tokens = torch.randint(0, 11, (1, 3), generator=g)
    state = stack.init_state(1, dtype=D)
    with torch.no_grad():
        y, new = stack(x, tokens, state, torch.ones(1, 3, dtype=torch.bool))
    assert torch.isfinite(y).all() and new["pos"].tolist() == [0] and new["key"].shape[3] == 0
    plain, _ = stack(x, tokens, state)
    calls = []
    real = attention.checkpoint
    stack.gradient_checkpointing = True
    attention.checkpoint = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        ckpt, _ = stack(x, tokens, state)
        with torch.no_grad():
            stack(x, tokens, state)
    finally:
        attention.checkpoint = real
    assert len(calls) == 2
    close(ckpt, plain, seed, "checkpointed")
    # an input without gradient: the parameters still get theirs, equal to the plain run's (a
    # reentrant checkpoint would cut them off)
    plain_stack = AttentionStack(8, 2, 4, 2, 11, False, False, "rope", 0).double()  # no DeepEmbed gate either
    grads = []
    for flag in (False, True):
        plain_stack.gradient_checkpointing = flag
        plain_stack.zero_grad()
        out, new = plain_stack(x.detach(), tokens, state)
        (out.pow(2).sum() + new["value"].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in plain_stack.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(plain_stack.parameters()))
    for name in grads[0]:
        close(grads[1][name], grads[0][name], seed, f"grad {name}")


def test_block_is_pre_norm_residual_with_the_deepembed_gate():
    seed = fresh_seed()
    torch.manual_seed(seed)
    block = AttentionBlock(4, 2, 8, 2).double()
    perturb(block, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, 4, generator=g, dtype=D)
    gate = torch.randn(1, 3, 8, generator=g, dtype=D)
    empty = torch.zeros(1, 2, 0, 2, dtype=D)
    with torch.no_grad():
        for deep in (None, gate):
            y, _, _ = block(x, None, empty, empty, None, deep)
            att, _, _ = block.attention(rms(x, block.norm_attention.weight), None, empty, empty, None)
            mid = x + att
            n = rms(mid, block.norm_ffn.weight)
            hidden = F.silu(n @ block.channel_mix.gate.weight.T) * (n @ block.channel_mix.up.weight.T)
            if deep is not None:
                hidden = hidden * deep
            close(y, mid + hidden @ block.channel_mix.down.weight.T, seed, f"block gate={deep is not None}")


def test_blocks_summary():
    cfg = tiny_config(h_block="attention", pos_encodings="sinusoidal", window_size=4)
    assert blocks_summary(cfg) == "manager attention (sinusoidal, window 4: KV cache of 4 tokens), worker rwkv7"
    cfg = tiny_config(l_block="attention")
    assert blocks_summary(cfg) == ("manager rwkv7, worker attention (rope, full attention: the KV cache grows with "
                                   "the context)")


@pytest.mark.parametrize("pos_encodings", ["rope", "sinusoidal", "learned"])
def test_a_window_stack_runs_on_the_inputs_device(pos_encodings):
    """Every tensor the stack makes (masks, positions, cache indices) is on the inputs' device: the
    meta device (no data) stands in for the GPU; a window keeps the cache size off the host."""
    stack = AttentionStack(8, 2, 4, 2, 11, True, False, pos_encodings, 3).to("meta")
    x = torch.empty(2, 5, 8, device="meta")
    tokens = torch.zeros(2, 5, dtype=torch.long, device="meta")
    state = stack.init_state(2, device="meta")
    with torch.no_grad():
        for frozen in (None, torch.zeros(2, 5, dtype=torch.bool, device="meta")):
            y, new = stack(x, tokens, state, frozen)
            assert y.device.type == "meta" and y.shape == (2, 5, 8)
            assert all(t.device.type == "meta" for t in new.values()) and new["key"].shape == (2, 2, 2, 3, 4)
            state = new


def test_bf16_autocast_with_a_cache_and_frozen_rows():
    """Under CPU bf16 autocast a float32 stack reads its float32 cache (cast to the keys' dtype for
    SDPA), keeps the cache float32, and follows the float64 stack to bf16 precision."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = AttentionStack(8, 2, 4, 2, 11, True, False, "rope", 3)
    perturb(stack, seed, 0.1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 8, generator=g)
    tokens = torch.randint(0, 11, (2, 6), generator=g)
    frozen = torch.tensor([[False, True, False, False, False, True], [False] * 6])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            first, state = stack(x[:, :2], tokens[:, :2], stack.init_state(2), frozen[:, :2])
            second, state = stack(x[:, 2:], tokens[:, 2:], state, frozen[:, 2:])
        ref = stack.double()
        want, _ = ref(x.double(), tokens, ref.init_state(2, dtype=D), frozen)
    assert state["key"].dtype == state["value"].dtype == torch.float32
    got = torch.cat([first, second], 1).double()
    live = ~frozen
    err = float((got[live] - want[live]).norm() / want[live].norm())
    assert err < 5e-2, f"seed={seed} relative error {err}"


def test_the_cache_keeps_its_dtype_and_is_read_in_the_compute_dtype():
    """A float32 stack carrying a float64 cache: the cache stays float64, its entries are read in
    float32, and the outputs equal those with a float32 cache (to float32 precision)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    stack = AttentionStack(8, 2, 4, 2, 11, False, False, "rope", 0)
    perturb(stack, seed, 0.1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 8, generator=g)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    outs = {}
    with torch.no_grad():
        for dtype in (torch.float32, D):
            a, state = stack(x[:, :2], tokens[:, :2], stack.init_state(2, dtype=dtype))
            b, state = stack(x[:, 2:], tokens[:, 2:], state)
            assert state["key"].dtype == state["value"].dtype == dtype and b.dtype == torch.float32
            outs[dtype] = torch.cat([a, b], 1)
    close(outs[D], outs[torch.float32], seed, "float64 cache", rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_an_empty_batch_gives_an_empty_cache():
    empty = AttentionStack(8, 1, 4, 2, 11, False, False, "rope", 0)
    y, state = empty(torch.zeros(0, 3, 8), torch.zeros(0, 3, dtype=torch.long), empty.init_state(0))
    assert y.shape == (0, 3, 8) and state["key"].shape == (1, 0, 2, 0, 4) and state["pos"].shape == (0,)
