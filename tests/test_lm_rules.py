"""HierarchosLM's own wiring (hierarchos/model/lm.py), recomputed here from the rule on a tiny float64
model: embeddings + ROSA hint embeddings (hints from the brute-force definition), the memory read at
the state's position, the encoder over [e ; reads ; persistent] through an exact GELU, the reasoner
fed that and the state's rounds, the tied head after the output norm; the new state's parts; the step
forms; the Q-halting pairs; aux means; parameter counting (tied head, DeepEmbed, quantized blocks);
initial values and the initial state.

Random inputs from a fresh seed, printed on failure.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.lm import ModelOutput
from hierarchos.model.rosa import RosaAutomaton, rosa_hints_bruteforce

D = torch.float64


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def close(a, b, seed, what, rtol=1e-9, atol=1e-11):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"seed={seed} {what}: {m}")


def build(seed, **overrides):
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(**overrides)).double().eval()
    with torch.no_grad():  # the output norm, encoder bias and persistent vector off their init
        g = torch.Generator().manual_seed(seed)
        for p in (model.out_norm.weight, model.out_norm.bias, model.encoder.bias, model.persistent):
            p.add_(torch.randn(p.shape, generator=g, dtype=D) * 0.3)
        if model.rosa_embed is not None:
            model.rosa_embed.weight.add_(torch.randn(model.rosa_embed.weight.shape, generator=g, dtype=D) * 0.1)
    return model


def spy(module, seen: list):
    """Record (args, kwargs, output) of every call of `module`."""
    return module.register_forward_hook(lambda _m, args, kwargs, out: seen.append((args, kwargs, out)),
                                       with_kwargs=True)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def tokens_for(seed, B, T, alphabet=5):
    return torch.randint(0, alphabet, (B, T), generator=torch.Generator().manual_seed(seed))


def by_hand(model, tokens, hints, mem_seen, rsn_seen):
    """u and logits from the recorded memory reads and reasoner output."""
    B, T = tokens.shape
    e = model.embed.weight[tokens]
    if hints is not None:
        e = e + model.rosa_embed.weight[hints]
    (m_args, _, (reads, _)), = mem_seen
    close(m_args[0], e, 0, "memory input")
    enc_in = torch.cat([e, reads, model.persistent.expand(B, T, -1)], -1)
    u = gelu(enc_in @ model.encoder.weight.T + model.encoder.bias)
    (r_args, r_kwargs, (y, _, _)), = rsn_seen
    normed = F.layer_norm(y, y.shape[-1:], model.out_norm.weight, model.out_norm.bias, 1e-5)
    return u, normed @ model.embed.weight.T, r_args, r_kwargs


@pytest.mark.parametrize("use_rosa", [True, False])
def test_forward_is_embed_memory_encoder_reasoner_head(use_rosa):
    seed = fresh_seed()
    model = build(seed, use_rosa=use_rosa)
    cfg = model.cfg
    B, T = 2, 7
    tokens = tokens_for(seed, B, T)
    with torch.no_grad():
        first = model(tokens[:, :3])
        mem_seen, rsn_seen = [], []
        hooks = [spy(model.memory, mem_seen), spy(model.reasoner, rsn_seen)]
        out = model(tokens[:, 3:], first.state)
        for h in hooks:
            h.remove()
    hints = None
    if use_rosa:  # the automata carried from the first call continue each row's stream
        hints = torch.tensor([rosa_hints_bruteforce(row.tolist(), cfg.rosa_none_id, cfg.rosa_window)
                              for row in tokens])[:, 3:]
    u, logits, r_args, r_kwargs = by_hand(model, tokens[:, 3:], hints, mem_seen, rsn_seen)
    assert mem_seen[0][0][1] is first.state.memory and mem_seen[0][0][2] == 3  # read at the state's position
    close(r_args[0], u, seed, "reasoner input u")
    assert torch.equal(r_args[1], tokens[:, 3:]) and r_args[2] is first.state.rounds and r_args[3] == 3
    assert r_kwargs.get("q_halt") is None and r_kwargs.get("row_pos") is None
    close(out.logits, logits, seed, "logits")
    assert out.logits.shape == (B, 4, cfg.vocab_size)
    assert out.state.pos == 7 and first.state.pos == 3
    assert out.state.memory is mem_seen[0][2][1] and out.state.rounds is rsn_seen[0][2][1]
    assert out.totals is rsn_seen[0][2][2] and out.q_halt is None
    if use_rosa:
        assert out.state.rosa is first.state.rosa and [a.history_len for a in out.state.rosa] == [7, 7]
    else:
        assert out.state.rosa is None and model.rosa_embed is None


def test_precomputed_hints_are_used_and_the_automata_left_alone():
    seed = fresh_seed()
    model = build(seed)
    tokens = tokens_for(seed, 2, 6)
    hints = torch.randint(0, model.cfg.rosa_vocab, (2, 6), generator=torch.Generator().manual_seed(seed + 1))
    state = model.init_state(2)
    with torch.no_grad():
        mem_seen, rsn_seen = [], []
        hooks = [spy(model.memory, mem_seen), spy(model.reasoner, rsn_seen)]
        out = model(tokens, state, rosa_hint_ids=hints)
        for h in hooks:
            h.remove()
    u, logits, _, _ = by_hand(model, tokens, hints, mem_seen, rsn_seen)
    close(out.logits, logits, seed, "logits")
    assert [a.history_len for a in state.rosa] == [0, 0]


def test_caps_reach_the_reasoner_and_no_state_means_a_fresh_one():
    seed = fresh_seed()
    model = build(seed, h_cycles=2, max_h_steps=2, max_l_steps=2)
    tokens = tokens_for(seed, 2, 5)
    seen = []
    hook = spy(model.reasoner, seen)
    with torch.no_grad():
        out = model(tokens, h_cycles=1, max_l_steps=0)
        fresh = model(tokens, model.init_state(2))
        hook.remove()
    assert seen[0][1]["h_cycles"] == 1 and seen[0][1]["max_l_steps"] == 0 and "h_cycles" not in seen[1][1]
    assert seen[0][0][3] == 0 and out.state.pos == 5
    rounds = seen[0][0][2]  # a call without a state starts from the initial (zero) rounds of its batch
    assert len(rounds) == 2 and rounds[0]["plan_last"].shape == (2, 16) and not rounds[0]["plan_last"].any()
    # the state made for a call without one is the initial state: same results as passing it
    with torch.no_grad():
        again = model(tokens, h_cycles=1, max_l_steps=0)
    close(out.logits, again.logits, seed, "no state twice")
    assert not torch.allclose(out.logits, fresh.logits)  # the caps changed the computation
    full = model(tokens)
    close(full.logits, fresh.logits, seed, "None == init_state")


def test_step_is_forward_on_one_token():
    seed = fresh_seed()
    model = build(seed)
    tokens = tokens_for(seed, 2, 4)
    with torch.no_grad():
        par = model(tokens)
        state = model.init_state(2)
        for t in range(4):
            out = model.step(tokens[:, t], state, max_l_steps=2)
            assert out.logits.shape == (2, model.cfg.vocab_size) and out.state.pos == t + 1
            close(out.logits, par.logits[:, t], seed, f"step {t}", rtol=1e-8, atol=1e-10)
            state = out.state
        # caps: from the second token on, one round differs from two (the first token's second round
        # sees zero feedback and a zero state, as the first does)
        state, capped = model.init_state(2), []
        for t in range(3):
            out = model.step(tokens[:, t], state, h_cycles=1)
            capped.append(out.logits)
            state = out.state
        want = model(tokens[:, :3], h_cycles=1).logits
        assert not torch.allclose(want[:, 1:], par.logits[:, 1:3])
    close(torch.stack(capped, 1), want, seed, "caps reach step", rtol=1e-8, atol=1e-10)


def test_step_sync_free_equals_step_with_and_without_hints():
    seed = fresh_seed()
    model = build(seed)
    tokens = tokens_for(seed, 2, 5)
    cfg = model.cfg
    hints = torch.tensor([rosa_hints_bruteforce(row.tolist(), cfg.rosa_none_id, cfg.rosa_window) for row in tokens])
    with torch.no_grad():
        s_step, s_free, s_hint = model.init_state(2), model.init_state(2), model.init_state(2)
        for t in range(5):
            a = model.step(tokens[:, t], s_step)
            b = model.step_sync_free(tokens[:, t], s_free, torch.full((2,), t))
            c = model.step_sync_free(tokens[:, t], s_hint, torch.full((2,), t), hints[:, t])
            for other, name in ((b, "automata"), (c, "hints")):
                close(other.logits, a.logits, seed, f"{name} t={t}", rtol=1e-9, atol=1e-10)
                assert other.state.pos == t + 1
                for (n1, x1), (n2, x2) in zip(a.state.tensors(), other.state.tensors()):
                    assert n1 == n2
                    close(x2, x1, seed, f"{name} t={t} {n1}", rtol=1e-9, atol=1e-10)
            s_step, s_free, s_hint = a.state, b.state, c.state
        # caps reach the reasoner (from the second token on one round differs from two); a stale
        # state.pos changes nothing: the rows' positions are row_pos
        s_cap, s_ref = model.init_state(2), model.init_state(2)
        for t in range(3):
            s_cap.pos = 0
            a = model.step_sync_free(tokens[:, t], s_cap, torch.full((2,), t), h_cycles=1)
            b = model.step(tokens[:, t], s_ref, h_cycles=1)
            close(a.logits, b.logits, seed, f"caps / stale pos t={t}", rtol=1e-9, atol=1e-10)
            assert b.totals and set(a.totals) >= set(b.totals)
            for name, (total, count) in a.totals.items():  # a term the step skipped has count 0 here
                ref_total, ref_count = b.totals.get(name, (0.0, 0))
                assert float(count) == float(ref_count), f"seed={seed} count of {name}"
                close(torch.as_tensor(total, dtype=D), torch.as_tensor(ref_total, dtype=D), seed, f"{name} t={t}")
            s_cap, s_ref = a.state, b.state
    assert [x.history_len for x in s_free.rosa] == [5, 5] and [x.history_len for x in s_hint.rosa] == [0, 0]


def test_q_halting_pairs_are_stacked_over_rounds():
    seed = fresh_seed()
    model = build(seed, halting="q", h_cycles=2)
    tokens = tokens_for(seed, 2, 6)
    seen = []
    hook = spy(model.reasoner, seen)
    with torch.no_grad():
        out = model(tokens)
    hook.remove()
    pairs = seen[0][1]["q_halt"]
    assert len(pairs) == 2
    logits, leads = out.q_halt
    assert logits.shape == (2, 2, 6)
    for r in range(2):
        assert torch.equal(logits[r], pairs[r][0])
    assert leads is pairs[0][1]
    assert model(tokens[:, :1], h_cycles=1).q_halt[0].shape == (1, 2, 1)


def test_aux_is_the_mean_of_each_total_with_a_count():
    out = ModelOutput(logits=torch.zeros(1), state=None,
                      totals={"ponder": (6.0, 4), "commitment": (torch.tensor(3.0), 2), "never": (1.0, 0)})
    assert out.aux == {"ponder": 1.5, "commitment": torch.tensor(1.5)}
    assert ModelOutput(logits=torch.zeros(1), state=None).aux == {} and ModelOutput(torch.zeros(1), None).q_halt is None


def test_num_parameters_counts_the_tied_table_once_and_quantized_blocks():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    cfg = model.cfg
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    deep = sum(p.numel() for n, p in model.named_parameters() if ".deepembed." in n)
    assert model.lm_head.weight is model.embed.weight and deep > 0
    assert model.num_parameters() == total
    assert model.num_parameters(with_deepembed=False) == total - deep
    # by hand for the parts lm.py owns: embed, rosa embed, persistent, encoder, out norm
    d = cfg.context_dim
    encoder = (d + cfg.ltm_val_dim + cfg.persistent_dim) * d + d
    own = cfg.vocab_size * d + cfg.rosa_vocab * d + cfg.persistent_dim + encoder + 2 * d
    rest = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("memory", "reasoner"))
    assert model.num_parameters() == own + rest
    # quantized blocks count through quantized_numel, except the head (the table's twin) ...
    model.memory.quantized_numel = 1000
    model.lm_head.quantized_numel = 7
    assert model.num_parameters() == total + 1000
    # ... and DeepEmbed's only with it
    model.reasoner.manager.deepembed[0].quantized_numel = 50
    assert model.num_parameters() == total + 1050 and model.num_parameters(with_deepembed=False) == total - deep + 1000
    # a separate (untied) head is a quantized model's: its own parameters are not counted
    model.lm_head = torch.nn.Linear(d, cfg.vocab_size, bias=False)
    assert model.num_parameters() == total + 1050


def test_gradient_checkpointing_switch_reaches_both_stacks():
    model = HierarchosLM(tiny_config())
    model.set_gradient_checkpointing()
    assert model.reasoner.manager.gradient_checkpointing is True and model.reasoner.worker.gradient_checkpointing is True
    model.set_gradient_checkpointing(False)
    assert model.reasoner.manager.gradient_checkpointing is False and model.reasoner.worker.gradient_checkpointing is False


def test_initial_values_and_initial_state():
    torch.manual_seed(fresh_seed())
    cfg = tiny_config(vocab_size=512, context_dim=64, persistent_dim=256)
    model = HierarchosLM(cfg)
    for table, std in ((model.embed.weight, 0.02), (model.rosa_embed.weight, 0.002), (model.persistent, 0.02)):
        n = table.numel()  # bounds 8 standard errors wide: never hit by sampling, far from a wrong scale
        assert abs(float(table.detach().std()) / std - 1) < 8 / math.sqrt(2 * n)
        assert abs(float(table.detach().mean())) < 8 * std / math.sqrt(n)
    assert model.encoder.weight.shape == (64, 64 + cfg.ltm_val_dim + 256) and model.encoder.bias is not None
    assert model.lm_head.bias is None and model.lm_head.weight is model.embed.weight
    assert model.rosa_embed.weight.shape == (cfg.rosa_vocab, 64) and model.out_norm.normalized_shape == (64,)
    assert model.memory.values.shape[0] == cfg.ltm_slots
    state = model.init_state(3)
    assert state.pos == 0 and len(state.rosa) == 3 and len({id(a) for a in state.rosa}) == 3
    assert all(isinstance(a, RosaAutomaton) and a.window == cfg.rosa_window and a.none_id == cfg.rosa_none_id
               and a.history_len == 0 for a in state.rosa)
    assert len(state.rounds) == cfg.h_cycles and state.memory["input_sum"].shape == (3, 64)
    for name, t in state.tensors():
        assert t.dtype in (torch.float32, torch.int64, torch.bool) and t.device.type == "cpu", name
    s64 = model.double().init_state(1)
    assert all(t.dtype != torch.float32 for _, t in s64.tensors()) and len(s64.rosa) == 1
    s32 = model.init_state(1, dtype=torch.float32)
    assert any(t.dtype == torch.float32 for _, t in s32.tensors())
    # the device: as asked, else the model's
    assert all(t.device.type == "meta" for _, t in model.init_state(2, device="meta").tensors())
    assert all(t.device.type == "meta" and t.dtype != torch.float32 for _, t in model.to("meta").init_state(2).tensors())
    assert all(t.device.type == "cpu" for _, t in model.init_state(1, device="cpu").tensors())
    assert HierarchosLM(tiny_config(use_rosa=False)).init_state(2).rosa is None
    assert HierarchosLM(tiny_config(use_rosa=False)).rosa_embed is None
    assert model.init_state(2).memory["delta"].shape[0] == 2
    assert model.init_state().memory["delta"].shape[0] == 1


def test_a_state_without_automata_starts_fresh_ones_in_every_form():
    """A state whose ROSA automata are missing (None) gets fresh ones of the configured window and
    'none' id, in forward and in the sync-free step alike: the same results as from init_state."""
    seed = fresh_seed()
    model = build(seed, rosa_window=3)
    cfg = model.cfg
    tokens = torch.tensor([[1, 2, 1, 2, 1, 2, 3]])
    hints = torch.tensor([rosa_hints_bruteforce(tokens[0].tolist(), cfg.rosa_none_id, cfg.rosa_window)])
    assert (hints == cfg.rosa_none_id).any() and (hints != cfg.rosa_none_id).any()
    with torch.no_grad():
        bare = model.init_state(1)
        bare.rosa = None
        out = model(tokens, bare)
        want = model(tokens, rosa_hint_ids=hints)
        close(out.logits, want.logits, seed, "forward")
        bare = model.init_state(1)
        bare.rosa = None
        full = model.init_state(1)
        for t in range(7):
            a = model.step_sync_free(tokens[:, t], bare, torch.tensor([t]))
            b = model.step(tokens[:, t], full)
            close(a.logits, b.logits, seed, f"sync-free t={t}")
            bare, full = a.state, b.state
    for automata in (out.state.rosa, bare.rosa):
        assert len(automata) == 1 and automata[0].window == 3 and automata[0].none_id == cfg.rosa_none_id


def test_head_pads_only_a_float_head_off_the_cpu(monkeypatch):
    """The tied float head goes through padded_linear on a device other than the CPU (a meta tensor
    stands in for the GPU), and is the plain Linear on the CPU; another head module (the quantized
    model's) is called as it is everywhere."""
    from hierarchos.model import lm

    calls = []
    monkeypatch.setattr(lm, "padded_linear", lambda h, w: calls.append((h, w)) or "padded")
    model = HierarchosLM(tiny_config())
    h = torch.randn(2, 3, 16)
    torch.testing.assert_close(model.head(h), h @ model.embed.weight.T)
    assert calls == []
    meta = torch.empty(2, 3, 16, device="meta")
    assert model.head(meta) == "padded" and calls[0][0] is meta and calls[0][1] is model.embed.weight

    class OtherHead(torch.nn.Module):
        def forward(self, x):
            return ("other", x)

    model.lm_head = OtherHead()
    assert model.head(meta) == ("other", meta) and model.head(h) == ("other", h) and len(calls) == 1
