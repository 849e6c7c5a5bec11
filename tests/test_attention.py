"""Attention blocks (hierarchos/model/attention.py) and HierarchosLM built with them.

The oracle is a plain softmax(q k^T / sqrt(N)) v written here from the spec, one query at a time
(RoPE as a complex rotation, the window and the frozen rule as explicit rules). On top: one call
== token-by-token calls == split calls, a frozen row == a row that is not there, the DESIGN 3.5
guarantees through the whole model (parity with ACT early exit and worker freezing, causality,
gradients, bounded state with a window). Random inputs from a fresh seed, printed on failure.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from hierarchos.config import ModelConfig, tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM
from hierarchos.model.attention import AttentionStack
from hierarchos.model.losses import LossWeights, lm_loss

from early_exit import EARLY_EXIT, calibrated, model_tokens

SWITCHES = [(pe, window) for pe in ("rope", "sinusoidal", "learned", "none") for window in (0, 3)]


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make_stack(seed, pos_encodings="rope", window=0, layers=2, dim=16, head=8, per_block=False):
    torch.manual_seed(seed)
    stack = AttentionStack(dim, layers, head, 2, 50, True, per_block, pos_encodings, window, 16).double()
    with torch.no_grad():  # DeepEmbed and norms away from their init so the test sees them act
        for p in stack.parameters():
            if p.dim() == 1 or p.shape[-1] == 2 * dim:
                p.add_(0.3 * torch.randn_like(p))
    return stack


def inputs(seed, batch, length, dim=16, frozen_rate=0.4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 50, (batch, length), generator=g)
    frozen = torch.rand(batch, length, generator=g) < frozen_rate
    return x, tokens, frozen


# ---- the oracle ------------------------------------------------------------------------------------

def rope_reference(vec: torch.Tensor, position: int) -> torch.Tensor:
    """Channels (i, i + N/2) as the complex number a + ib, turned by position * 10000^(-2i/N)."""
    half = vec.shape[-1] // 2
    turned = torch.complex(vec[:half], vec[half:]) * torch.polar(
        torch.ones(half, dtype=torch.float64), position * 10000.0 ** (-2 * torch.arange(half, dtype=torch.float64)
                                                                      / vec.shape[-1]))
    return torch.cat([turned.real, turned.imag])


def stack_reference(stack: AttentionStack, x, tokens, frozen):
    """The stack over a whole history from an empty cache, written from the rule, one query at a time:
    a live entry's position counts the live entries before it (a frozen row's query takes the next
    live position); query t sees itself and every earlier live entry j with pos_j > pos_t - W."""
    B, T, C = x.shape
    H, N, W = stack.n_heads, stack.head_size, stack.window_size
    out = torch.zeros_like(x)
    for b in range(B):
        live = [not bool(f) for f in frozen[b]]
        pos = [sum(live[:t]) for t in range(T)]
        h = x[b].clone()
        for t in range(T):
            if stack.pos_encodings == "sinusoidal":
                h[t] += torch.tensor([math.sin(pos[t] / 10000 ** (2 * (c // 2) / C)) if c % 2 == 0 else
                                      math.cos(pos[t] / 10000 ** (2 * (c // 2) / C)) for c in range(C)],
                                     dtype=torch.float64)
            elif stack.pos_encodings == "learned":
                h[t] += stack.position_table.weight[min(pos[t], stack.position_table.num_embeddings - 1)]
        for i, block in enumerate(stack.blocks):
            att = block.attention
            normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm_attention.weight
            q = (normed @ att.query.weight.T).view(T, H, N)
            k = (normed @ att.key.weight.T).view(T, H, N)
            v = (normed @ att.value.weight.T).view(T, H, N)
            if stack.pos_encodings == "rope":
                q = torch.stack([torch.stack([rope_reference(q[t, hd], pos[t]) for hd in range(H)]) for t in range(T)])
                k = torch.stack([torch.stack([rope_reference(k[t, hd], pos[t]) for hd in range(H)]) for t in range(T)])
            heads_out = torch.zeros(T, H, N, dtype=torch.float64)
            for t in range(T):
                seen = [j for j in range(T) if j == t or (j < t and live[j] and (W == 0 or pos[j] > pos[t] - W))]
                for hd in range(H):
                    scores = torch.stack([q[t, hd] @ k[j, hd] for j in seen]) / math.sqrt(N)
                    weights = torch.exp(scores - scores.max())
                    weights = weights / weights.sum()
                    heads_out[t, hd] = sum(w * v[j, hd] for w, j in zip(weights, seen))
            h = h + heads_out.reshape(T, C) @ att.output.weight.T
            normed = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * block.norm_ffn.weight
            ffn = block.channel_mix
            table = stack.deepembed[i if stack.per_block_deepembed else 0].weight
            hidden = F.silu(normed @ ffn.gate.weight.T) * (normed @ ffn.up.weight.T) * table[tokens[b]]
            h = h + hidden @ ffn.down.weight.T
        out[b] = h
    return out


@pytest.mark.parametrize("pos_encodings,window", SWITCHES)
def test_stack_matches_the_plain_softmax_reference(pos_encodings, window):
    """SDPA with a mask and a carried cache == softmax(QK^T)V by the rule, at every live position
    (a frozen row's own output is not used by the HRM: only its finiteness matters)."""
    seed = fresh_seed()
    stack = make_stack(seed, pos_encodings, window, per_block=bool(seed % 2))
    x, tokens, frozen = inputs(seed, 2, 11)
    split = 1 + seed % 9
    with torch.no_grad():
        first, state = stack(x[:, :split], tokens[:, :split], stack.init_state(2, dtype=torch.float64),
                             frozen[:, :split])
        second, _ = stack(x[:, split:], tokens[:, split:], state, frozen[:, split:])
        expected = stack_reference(stack, x, tokens, frozen)
    got = torch.cat([first, second], dim=1)
    live = ~frozen
    torch.testing.assert_close(got[live], expected[live], rtol=1e-10, atol=1e-10,
                               msg=lambda m: f"seed={seed} split={split}: {m}")
    assert torch.isfinite(got).all(), f"seed={seed}"


@pytest.mark.parametrize("pos_encodings,window", SWITCHES)
def test_one_call_equals_token_steps_and_split_calls(pos_encodings, window):
    seed = fresh_seed()
    stack = make_stack(seed, pos_encodings, window)
    x, tokens, frozen = inputs(seed, 3, 13)
    init = stack.init_state(3, dtype=torch.float64)
    split = 1 + seed % 12
    with torch.no_grad():
        whole, whole_state = stack(x, tokens, init, frozen)
        state, steps = init, []
        for t in range(13):
            y, state = stack(x[:, t:t + 1], tokens[:, t:t + 1], state, frozen[:, t:t + 1])
            steps.append(y)
        a, mid = stack(x[:, :split], tokens[:, :split], init, frozen[:, :split])
        b, split_state = stack(x[:, split:], tokens[:, split:], mid, frozen[:, split:])
    msg = f"seed={seed} split={split}"
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-10, atol=1e-10, msg=lambda m: f"{msg}: {m}")
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-10, atol=1e-10, msg=lambda m: f"{msg}: {m}")
    for other in (state, split_state):
        assert other.keys() == whole_state.keys()
        for name in whole_state:
            torch.testing.assert_close(other[name], whole_state[name], rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{msg} {name}: {m}")


@pytest.mark.parametrize("window", [0, 3])
def test_a_frozen_row_writes_nothing(window):
    """Running frozen rows == leaving them out: the live rows' outputs and the final cache match."""
    seed = fresh_seed()
    stack = make_stack(seed, "rope", window)
    x, tokens, frozen = inputs(seed, 1, 12, frozen_rate=0.5)
    frozen[0, 0] = False  # at least one live row
    live = ~frozen[0]
    init = stack.init_state(1, dtype=torch.float64)
    with torch.no_grad():
        with_frozen, state_a = stack(x, tokens, init, frozen)
        without, state_b = stack(x[:, live], tokens[:, live], init)
    torch.testing.assert_close(with_frozen[:, live], without, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed={seed}: {m}")
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"seed={seed} {name}: {m}")


def test_a_frozen_key_is_seen_by_no_later_position():
    seed = fresh_seed()
    stack = make_stack(seed, "rope", 0)
    x, tokens, _ = inputs(seed, 1, 8)
    frozen = torch.zeros(1, 8, dtype=torch.bool)
    frozen[0, 3] = True
    changed = x.clone()
    changed[0, 3] += 1.0
    with torch.no_grad():
        a, _ = stack(x, tokens, stack.init_state(1, dtype=torch.float64), frozen)
        b, _ = stack(changed, tokens, stack.init_state(1, dtype=torch.float64), frozen)
    keep = torch.ones(8, dtype=torch.bool)
    keep[3] = False
    torch.testing.assert_close(a[:, keep], b[:, keep], rtol=0, atol=0, msg=lambda m: f"seed={seed}: {m}")


@pytest.mark.parametrize("window", [1, 4])
def test_window_bounds_the_cache_and_what_a_query_sees(window):
    """With W: the state has a fixed size however many tokens went by, and a token W or more
    positions back has no effect; without a window the cache grows by one entry per token."""
    seed = fresh_seed()
    stack = make_stack(seed, "rope", window)
    x, tokens, _ = inputs(seed, 1, 12)
    with torch.no_grad():
        state = stack.init_state(1, dtype=torch.float64)
        shapes = {name: t.shape for name, t in state.items()}
        for t in range(12):
            _, state = stack(x[:, t:t + 1], tokens[:, t:t + 1], state)
            assert {name: t.shape for name, t in state.items()} == shapes, f"seed={seed} the cache grew"
        # one layer reaches exactly W positions back; the last token's output ignores token 0..T-1-W...
        one = make_stack(seed, "rope", window, layers=1)
        changed = x.clone()
        changed[0, : 12 - window] += 1.0
        a, _ = one(x, tokens, one.init_state(1, dtype=torch.float64))
        b, _ = one(changed, tokens, one.init_state(1, dtype=torch.float64))
    torch.testing.assert_close(a[:, -1], b[:, -1], rtol=0, atol=1e-12, msg=lambda m: f"seed={seed}: {m}")
    assert not torch.allclose(a[:, -2], b[:, -2]) or window == 1, f"seed={seed}: the window saw nothing"
    full = make_stack(seed, "rope", 0)
    with torch.no_grad():
        state = full.init_state(1, dtype=torch.float64)
        for t in range(5):
            _, state = full(x[:, t:t + 1], tokens[:, t:t + 1], state)
            assert state["key"].shape[3] == t + 1 and int(state["pos"]) == t + 1


# ---- through the whole model ------------------------------------------------------------------------

MODEL_SWITCHES = {
    "rwkv7_both": dict(),  # the RWKV-7 stacks under the same calibrated early exit
    "both_rope_window": dict(h_block="attention", l_block="attention", window_size=3),
    "both_rope_full": dict(h_block="attention", l_block="attention"),
    "manager_sinusoidal": dict(h_block="attention", pos_encodings="sinusoidal", window_size=2),
    "worker_learned_full": dict(l_block="attention", pos_encodings="learned", deepembed_per_block=True),
    "both_none_no_extras": dict(h_block="attention", l_block="attention", pos_encodings="none",
                                use_rosa=False, use_deepembed=False, window_size=5),
}


def build(seed, dtype=torch.float64, **overrides):
    return calibrated(seed, dtype, **overrides)


@pytest.mark.parametrize("switch", sorted(MODEL_SWITCHES))
def test_model_parallel_equals_step_with_early_exit(switch):
    first_seed = fresh_seed()
    for seed in range(first_seed, first_seed + 5):  # calibration splits halting and freezing ~95% of the time
        model = build(seed, **MODEL_SWITCHES[switch])
        tokens = model_tokens(seed, 2, 17)
        with torch.no_grad():
            par = model(tokens)
        aux = {name: float(value) for name, value in par.aux.items()}
        # the parity is only meaningful if some plan points halted early and some worker tokens froze
        if 1.0 < aux["manager_steps"] < model.cfg.max_h_steps and 1.0 < aux["worker_steps"] < model.cfg.max_l_steps:
            break
    else:
        raise AssertionError(f"seeds {first_seed}..{seed}: halting or freezing did not split: {aux}")
    msg = f"seed={seed} switch={switch}"
    with torch.no_grad():
        state, logits, totals = model.init_state(2), [], {}
        for t in range(17):
            out = model.step(tokens[:, t], state)
            state = out.state
            logits.append(out.logits)
            for name, (total, count) in out.totals.items():
                s, c = totals.get(name, (0.0, 0.0))
                totals[name] = (s + total, c + count)
    torch.testing.assert_close(torch.stack(logits, 1), par.logits, rtol=1e-9, atol=1e-9, msg=lambda m: f"{msg}: {m}")
    for name, (total, count) in par.totals.items():
        assert count == totals[name][1], f"{msg} count of {name}"
        torch.testing.assert_close(torch.as_tensor(totals[name][0]), torch.as_tensor(total), rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"{msg} {name}: {m}")
    got, want = dict(state.tensors()), dict(par.state.tensors())
    assert got.keys() == want.keys(), msg
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-9, msg=lambda m: f"{msg} {name}: {m}")


def test_model_state_carries_across_calls():
    seed = fresh_seed()
    model = build(seed, **MODEL_SWITCHES["both_rope_window"])
    tokens = model_tokens(seed, 2, 21)
    split = random.Random(seed).randrange(1, 20)
    with torch.no_grad():
        whole = model(tokens)
        first = model(tokens[:, :split])
        second = model(tokens[:, split:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-9, atol=1e-9,
                               msg=lambda m: f"seed={seed} split={split}: {m}")


@pytest.mark.parametrize("switch", ["both_rope_window", "both_rope_full"])
def test_model_causality(switch):
    seed = fresh_seed()
    model = build(seed, **MODEL_SWITCHES[switch])
    tokens = model_tokens(seed, 1, 20)
    j = random.Random(seed).randrange(1, 20)
    changed = tokens.clone()
    changed[0, j] = (changed[0, j] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-12, msg=lambda m: f"seed={seed} j={j}: {m}")
    assert not torch.allclose(a[:, j:], b[:, j:]), f"seed={seed} j={j}: the change had no effect"


@pytest.mark.parametrize("pos_encodings", ["rope", "learned", "sinusoidal"])
def test_every_parameter_gets_a_gradient(pos_encodings):
    seed = fresh_seed()
    # every pondering pass runs: with early exit, a batch whose plan points all halt before the one
    # gradient-carrying last pass gives the manager no gradient at all (HRM's one-step rule, any block)
    model = build(seed, h_block="attention", l_block="attention", pos_encodings=pos_encodings, window_size=4,
                  h_halt_thresh=1.0).train()
    tokens = model_tokens(seed, 2, 25)
    out = model(tokens[:, :-1])
    loss, _ = lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight, LossWeights())
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"seed={seed} parameters without gradient: {missing}"


def test_model_state_is_bounded_with_a_window_and_grows_without():
    seed = fresh_seed()
    windowed = build(seed, h_block="attention", l_block="attention", window_size=4)
    full = build(seed, h_block="attention", l_block="attention")
    tokens = model_tokens(seed, 1, 30)
    with torch.no_grad():
        state = windowed.step(tokens[:, 0]).state
        shapes = state.shapes()
        full_state = full.step(tokens[:, 0]).state
        for t in range(1, 30):
            state = windowed.step(tokens[:, t], state).state
            full_state = full.step(tokens[:, t], full_state).state
    assert state.shapes() == shapes, f"seed={seed}: the windowed state grew"
    assert full_state.rounds[0]["commit"]["key"].shape[3] == 30, f"seed={seed}: full attention keeps every token"


def test_gradient_checkpointing_gives_the_same_gradients():
    seed = fresh_seed()
    grads = []
    for checkpointing in (False, True):
        model = build(seed, h_block="attention", l_block="attention", window_size=3).train()
        model.set_gradient_checkpointing(checkpointing)
        tokens = model_tokens(seed, 2, 12)
        loss, _ = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], model.cfg.z_loss_weight, LossWeights())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"seed={seed} {name}: {m}")


def test_float32_parity():
    seed = fresh_seed()
    model = build(seed, dtype=torch.float32, h_block="attention", l_block="attention", window_size=3,
                  h_halt_thresh=1.0, l_conv_atol=0.0)
    tokens = model_tokens(seed, 2, 15)
    with torch.no_grad():
        par = model(tokens).logits
        state, steps = model.init_state(2), []
        for t in range(15):
            out = model.step(tokens[:, t], state)
            state, steps = out.state, steps + [out.logits]
    rel = (torch.stack(steps, 1) - par).norm() / par.norm()
    assert rel < 1e-4, f"seed={seed} relative error {rel}"


def test_bf16_autocast_trains_and_keeps_the_cache_float32():
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(h_block="attention", l_block="attention", window_size=4)).train()
    tokens = model_tokens(seed, 2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens[:, :-1])
        loss, _ = lm_loss(out, tokens[:, 1:], model.cfg.z_loss_weight, LossWeights())
    loss.backward()
    assert torch.isfinite(loss), f"seed={seed}"
    cache = out.state.rounds[0]["commit"]
    assert (cache["key"].dtype, cache["value"].dtype, cache["pos"].dtype) == (torch.float32, torch.float32, torch.long)


@pytest.mark.parametrize("field,value", [("h_block", "transformer"), ("l_block", ""), ("pos_encodings", "alibi"),
                                         ("window_size", -1), ("window_size", True)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(HierarchosError, match=field):
        tiny_config(**{field: value})


def test_config_rejects_odd_heads_with_rope_and_round_trips():
    with pytest.raises(HierarchosError, match="head_size"):
        tiny_config(head_size=3, context_dim=9, h_hidden=9, l_hidden=9)
    cfg = tiny_config(h_block="attention", pos_encodings="learned", window_size=7)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


# ---- quantizer, LoRA and the CLI --------------------------------------------------------------------

ATTENTION_LINEARS = ("attention.query", "attention.key", "attention.value", "attention.output",
                     "channel_mix.gate", "channel_mix.up", "channel_mix.down")


def test_the_quantizer_and_lora_find_the_attention_linears_by_name():
    pytest.importorskip("hierarchos.quant.kernel")
    from hierarchos.lora import resolve_targets
    from hierarchos.quant.model import QuantLinear, build_quantized_model, quantize_tensors

    seed = fresh_seed()
    torch.manual_seed(seed)
    cfg = tiny_config(context_dim=32, h_hidden=32, l_hidden=32, h_block="attention", l_block="attention",
                      pos_encodings="learned", window_size=4)
    model = HierarchosLM(cfg).eval()
    tensors = quantize_tensors(model, "Q8_0")
    wanted = {f"reasoner.{stack}.blocks.0.{name}.weight" for stack in ("manager", "worker") for name in ATTENTION_LINEARS}
    assert all(not hasattr(tensors[name], "dtype") for name in wanted), f"float: {[n for n in wanted if hasattr(tensors[n], 'dtype')]}"
    quantized = build_quantized_model(cfg, tensors).eval()
    assert sum(isinstance(m, QuantLinear) for n, m in quantized.named_modules() if ".blocks." in n) == len(wanted)
    tokens = model_tokens(seed, 1, 12)
    with torch.no_grad():
        full, quant = model(tokens).logits, quantized(tokens).logits
    rel = (full - quant).norm() / full.norm()
    assert rel < 0.05, f"seed={seed}: Q8_0 attention model is {rel:.3f} away from the float one"
    names = resolve_targets(model, ["time_mix"])
    assert names and all(".attention." in n for n in names) and len(names) == 8
    assert resolve_targets(model, ["attention"]) == names


def run_cli(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    return subprocess.run([sys.executable, "hierarchos_cli.py", *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_cli_trains_attention_stacks_and_chats(tmp_path):
    import json

    data = tmp_path / "text.txt"
    data.write_text("\n".join(f"line {i}: to be or not to be, that is the question" for i in range(200)))
    common = ("train", "--tiny", "--tokenizer-path", "byte", "--train", str(data), "--steps", "1", "--batch-size",
              "2", "--max_length", "16", "--h-block", "attention", "--l-block", "attention")
    result = run_cli(*common, "--pos-encodings", "sinusoidal", "--window-size", "8", "--out-dir", str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = json.loads((tmp_path / "w" / "hierarchos_config.json").read_text())
    cfg = cfg.get("model", cfg)
    assert (cfg["h_block"], cfg["l_block"], cfg["pos_encodings"], cfg["window_size"]) == (
        "attention", "attention", "sinusoidal", 8)
    chat = run_cli("chat", "--model-path", str(tmp_path / "w"), "--prompt", "to be", "--max-new-tokens", "4",
                   "--seed", "1")
    assert chat.returncode == 0, chat.stderr[-2000:]
    # full attention: every window starts afresh, and an explicit --persist-state says why not
    full = run_cli(*common, "--out-dir", str(tmp_path / "f"))
    assert full.returncode == 0 and "each training window starts from a fresh state" in full.stdout, full.stderr[-2000:]
    refused = run_cli(*common, "--persist-state", "--out-dir", str(tmp_path / "p"))
    assert refused.returncode == 2 and "KV cache would grow" in refused.stderr, refused.stderr[-2000:]
