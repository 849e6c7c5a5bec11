"""Batched generation (generate.generate_batch) and prefill by the parallel form.

Row b of a batch equals generating prompts[b] alone with `generate` (its seed): greedy and sampled,
prompts of different lengths, rows ending at EOS or at a stop at different steps. The state after
one row equals `generate`'s. Prompts are prefilled by one parallel forward (spied), whose state equals
stepping the prompt token by token. The lm-eval wrapper's generate_until in batches equals one
request at a time, and `demo --samples N` prints what each seed gives alone.
"""

from __future__ import annotations

import random

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.generate import SamplingConfig, generate, generate_batch
from hierarchos.model import HierarchosLM

from early_exit import calibrated


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def prompts_for(seed, lengths, vocab=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(model, prompt, cfg, seed, **kw):
    cfg = SamplingConfig(**{**cfg.__dict__, "seed": seed})
    return generate(model, prompt, cfg, **kw)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_each_row_equals_generating_it_alone(temperature):
    """The calibrated model (early exit really splits, ROSA, memory writes): row b's tokens equal
    `generate` alone; one row ends at EOS (chosen as a token its solo run samples), the others run on."""
    seed = fresh_seed()
    model = calibrated(seed)
    cfg = SamplingConfig(temperature=temperature, top_k=5, top_p=0.95, repetition_penalty=1.3, max_new_tokens=7)
    prompts = prompts_for(seed, [6, 1, 9])
    seeds = [seed + i for i in range(len(prompts))]
    with torch.no_grad():
        free = [alone(model, p, cfg, s)[0] for p, s in zip(prompts, seeds)]
        # EOS: a token of row 0's run at which the rows would end at different steps (an untrained
        # model's greedy runs may all repeat one token; sampled runs always differ)
        ends = lambda token: {f.index(token) if token in f else len(f) for f in free}  # noqa: E731
        splitting = [token for token in dict.fromkeys(free[0]) if len(ends(token)) > 1]
        assert splitting or temperature == 0, f"seed={seed} {free}"
        eos = splitting[0] if splitting else free[0][0]
        ref = [alone(model, p, cfg, s, eos_id=eos)[0] for p, s in zip(prompts, seeds)]
        result = generate_batch(model, prompts, cfg, eos_id=eos, seeds=seeds)
    assert result.tokens == ref, f"seed={seed}"
    if splitting:
        assert len({len(r) for r in ref}) > 1, f"seed={seed} {ref}"


def test_rows_end_at_their_own_stop_and_keep_eos():
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=32)).double().eval()
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=8)
    prompts = prompts_for(seed, [4, 9, 2])
    seeds = [3, 4, 5]
    stop_after = {0: 2, 1: 5, 2: 100}
    calls = {b: [] for b in range(3)}

    def on_token(row, token):
        calls[row].append(token)
        return len(calls[row]) >= stop_after[row]

    with torch.no_grad():
        result = generate_batch(model, prompts, cfg, seeds=seeds, on_token=on_token)
        for b, prompt in enumerate(prompts):
            seen = []
            ref, _ = alone(model, prompt, cfg, seeds[b],
                           on_token=lambda token, _out: seen.append(token) or len(seen) >= stop_after[b])
            assert result.tokens[b] == ref == calls[b], f"seed={seed} row {b}"
        eos = result.tokens[2][1]
        kept = generate_batch(model, prompts[2:], cfg, seeds=seeds[2:], eos_id=eos, keep_eos=True)
        assert kept.tokens[0] == result.tokens[2][:2], f"seed={seed}"  # ends with the EOS, kept


def test_one_row_state_equals_generate_state():
    """B = 1 carries the conversation state like `generate` (chat's CUDA-graph path relies on it):
    the same tokens, the same state, continuing from a given state."""
    seed = fresh_seed()
    model = calibrated(seed)
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=7)
    first, second = prompts_for(seed, [5, 4])
    with torch.no_grad():
        ids, state = alone(model, first, cfg, 11)
        ids2, state2 = alone(model, second, cfg, 12, state=state.clone())
        result = generate_batch(model, [first], cfg, seeds=[11])
        result2 = generate_batch(model, [second], cfg, seeds=[12], states=[result.state])
    assert result.tokens == [ids] and result2.tokens == [ids2], f"seed={seed}"
    assert result2.state.pos == state2.pos
    for (name, a), (_, b) in zip(state2.tensors(), result2.state.tensors()):
        assert torch.equal(a, b), f"seed={seed} {name}"
    assert [a.num_tokens for a in result2.state.rosa] == [a.num_tokens for a in state2.rosa]


def test_a_kept_stepper_is_reused_and_leaves_the_callers_states_alone():
    """`steppers`: the second call with the same batch size, caps and sampling loads its start into the
    first call's stepper (one capture on a GPU) and gives what a fresh call gives; the states passed
    in are not written to (the stepper's buffers are its own)."""
    seed = fresh_seed()
    model = calibrated(seed)
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=6)
    first, second = prompts_for(seed, [4, 7]), prompts_for(seed + 1, [2, 5])
    with torch.no_grad():
        given = [model(torch.tensor([p])).state for p in first]
        kept = [dict(s.tensors()) for s in (g.clone() for g in given)]
        steppers = {}
        generate_batch(model, [[1], [2]], cfg, states=given, seeds=[1, 2], steppers=steppers, max_l_steps=1)
        for state, before in zip(given, kept):
            assert all(torch.equal(t, before[name]) for name, t in state.tensors()), f"seed={seed}"
        stepper = next(iter(steppers.values()))
        reused = generate_batch(model, second, cfg, seeds=[3, 4], steppers=steppers, max_l_steps=1)
        fresh = generate_batch(model, second, cfg, seeds=[3, 4], max_l_steps=1)
        other_caps = generate_batch(model, second, cfg, seeds=[3, 4], steppers=steppers)
    assert reused.tokens == fresh.tokens and len(steppers) == 2 and stepper.loads == 1, f"seed={seed}"
    assert other_caps.tokens == generate_batch(model, second, cfg, seeds=[3, 4]).tokens
    for (name, a), (_, b) in zip(fresh.state.tensors(), reused.state.tensors()):
        assert torch.equal(a, b), f"seed={seed} {name}"
    assert {name: float(t) for name, (t, _) in reused.totals.items()} == \
        {name: float(t) for name, (t, _) in fresh.totals.items()}


def test_greedy_rows_float32_equal_alone():
    """float32: the batched matmuls may round differently from B = 1 in the last bit, so only the
    greedy tokens are compared (a near-tie could flip; none at these sizes in practice)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=40)).eval()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=8)
    prompts = prompts_for(seed, [3, 8, 1], vocab=40)
    with torch.no_grad():
        ref = [generate(model, p, cfg)[0] for p in prompts]
        assert generate_batch(model, prompts, cfg).tokens == ref, f"seed={seed}"


def test_full_attention_batches_are_refused_in_one_line():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(l_block="attention", window_size=0)).eval()
    with pytest.raises(HierarchosError, match="batched generation needs fixed-size states"):
        generate_batch(model, [[1, 2], [3]], SamplingConfig(max_new_tokens=2))


# ---- prefill is the parallel form ----------------------------------------------------------------------

def test_prefill_is_one_parallel_forward_and_its_state_equals_stepping():
    seed = fresh_seed()
    model = calibrated(seed)
    prompt = prompts_for(seed, [13])[0]
    shapes, forward = [], model.forward

    def spy(tokens, *args, **kwargs):  # the instance attribute serves model(...) and model.step alike
        shapes.append(tuple(tokens.shape))
        return forward(tokens, *args, **kwargs)

    model.forward = spy
    with torch.no_grad():
        generate(model, prompt, SamplingConfig(temperature=0.0, max_new_tokens=3))
        generate_batch(model, [prompt, prompt[:4]], SamplingConfig(temperature=0.0, max_new_tokens=2))
    del model.forward
    # generate: the prompt in one call, then one token per call (3 tokens sampled, 3 fed);
    # generate_batch: one call per prompt (its steps are step_sync_free, not forward)
    assert shapes == [(1, 13), (1, 1), (1, 1), (1, 1), (1, 13), (1, 4)], shapes
    with torch.no_grad():
        prefilled = model(torch.tensor([prompt])).state
        stepped = model.init_state(1)
        for token in prompt:
            stepped = model.step(torch.tensor([token]), stepped).state
    assert prefilled.pos == stepped.pos == len(prompt)
    for (name, a), (_, b) in zip(prefilled.tensors(), stepped.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed={seed} {name}: {m}")


# ---- users of batches -----------------------------------------------------------------------------------

def test_lm_eval_generate_until_in_batches_equals_one_at_a_time():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from hierarchos import evaluate
    from hierarchos.data.tokenizers import load_tokenizer

    seed = fresh_seed()
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=260)).double().eval()
    tokenizer = load_tokenizer("byte")
    contexts = ["Once", "The king", "A", "Why not?", "x" * 11]
    kwargs = [{"until": ["\n"], "max_gen_toks": 6}, {"until": ["e"], "max_gen_toks": 6},
              {"until": ["\n"], "max_gen_toks": 6}, {"max_gen_toks": 4, "do_sample": True, "temperature": 0.9},
              {"until": ["\n"], "max_gen_toks": 6}]
    requests = [Instance(request_type="generate_until", doc={}, arguments=(c, k), idx=0)
                for c, k in zip(contexts, kwargs)]
    one = evaluate.make_lm(model, tokenizer, batch_size=1, progress=False).generate_until(requests)
    batched_lm = evaluate.make_lm(model, tokenizer, batch_size=3, progress=False)
    calls = []
    real = evaluate._HierarchosLMMethods.generate_many
    batched_lm.generate_many = lambda cs, **kw: calls.append(len(cs)) or real(batched_lm, cs, **kw)
    assert batched_lm.generate_until(requests) == one, seed
    assert sorted(calls) == [1, 1, 3], calls  # three requests share their arguments: one batch of 3


def test_demo_samples_are_what_each_seed_gives_alone(tmp_path, capsys):
    from hierarchos.cli import main
    from hierarchos.data.tokenizers import load_tokenizer
    from hierarchos.io import load_model_dir, save_model_dir

    torch.manual_seed(fresh_seed())
    tokenizer = load_tokenizer("byte")
    path = save_model_dir(tmp_path / "model", HierarchosLM(tiny_config(vocab_size=260)), tokenizer)
    assert main(["demo", "--model-path", str(path), "--samples", "3", "--tokens", "6", "--seed", "7",
                 "--prompt", "ab"]) == 0
    out = capsys.readouterr().out
    model, _ = load_model_dir(path)
    cfg = SamplingConfig(temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.2, max_new_tokens=6)
    for i in range(3):
        ids, _ = alone(model.eval(), tokenizer.encode("ab"), cfg, 7 + i, eos_id=tokenizer.eos_id)
        assert f"--- sample {i + 1} (seed {7 + i}) ---\nab{tokenizer.decode(ids)}\n" in out, out
    assert "3 samples" in out


def test_demo_samples_flag_errors(capsys):
    from hierarchos.cli import main

    assert main(["demo", "--samples", "0"]) == 2
    assert main(["demo", "--samples", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--samples must be >= 1" in err[0] and "--samples applies to --model-path" in err[-1], err
