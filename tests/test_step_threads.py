"""Torch's intra-op threads around a step: `ops.threads.intra_op_threads` and the quantized model's
one-thread step (its matmuls run on the kernel's pool; BENCHMARKS.md says why)."""

from __future__ import annotations

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.ops.threads import intra_op_threads
from hierarchos.quant import model as qmodel


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_region_sets_and_restores_the_count(two_threads):
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        with intra_op_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2  # restored on the way out of an exception too
    for unchanged in (None, 2):
        with intra_op_threads(unchanged):
            assert torch.get_num_threads() == 2


def _threads_seen_by_the_encoder(model) -> list[int]:
    seen = []
    model.encoder.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    return seen


@pytest.mark.parametrize("path", ["step", "step_sync_free"])
def test_quantized_step_runs_torch_on_one_thread_and_computes_the_same(two_threads, path):
    cfg = tiny_config(vocab_size=64, context_dim=64, h_hidden=64, l_hidden=64, head_size=32, persistent_dim=32,
                      ltm_slots=16, ltm_key_dim=32, ltm_val_dim=32, ltm_chunk=4, wkv_chunk_size=4)
    torch.manual_seed(0)
    model = qmodel.build_quantized_model(cfg, qmodel.quantize_tensors(HierarchosLM(cfg).eval(), "Q8_0"))
    assert model.step_threads == 1
    seen = _threads_seen_by_the_encoder(model)
    token = torch.tensor([3])

    def run():
        state = model.init_state(1)
        if path == "step":
            return model.step(token, state).logits
        return model.step_sync_free(token, state, torch.zeros(1, dtype=torch.long)).logits

    with torch.no_grad():
        one = run()
        assert seen == [1] and torch.get_num_threads() == 2
        model.step_threads = None  # torch's own setting: the same function
        torch.testing.assert_close(run(), one)
        assert seen == [1, 2]
        model(token.view(1, 1), model.init_state(1))  # a prompt (forward) keeps torch's setting
        assert seen == [1, 2, 2]


def test_float_model_leaves_torch_threads_alone(two_threads):
    model = HierarchosLM(tiny_config(vocab_size=64)).eval()
    assert model.step_threads is None
    seen = _threads_seen_by_the_encoder(model)
    with torch.no_grad():
        model.step(torch.tensor([1]), model.init_state(1))
    assert seen == [2]


def test_one_thread_sync_free_step_passes_its_hints_and_caps_on(two_threads):
    """With step_threads set, `step_sync_free` runs in the one-thread region and still hands the model
    the ROSA hints and the caps it was given: the same logits and state as without the region, and the
    hints and caps change the result (so dropping either would show)."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=64)).double().eval()
    seen = _threads_seen_by_the_encoder(model)
    token, row_pos = torch.tensor([5, 9]), torch.tensor([1, 1])
    hints = torch.tensor([3, 7])  # not what the automata would give (they have seen nothing)

    def run(**kwargs):
        state = model.init_state(2)
        state.rounds[0]["plan_last"] = torch.randn(2, model.cfg.context_dim, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            return model.step_sync_free(token, state, row_pos, **kwargs)

    model.step_threads = 1
    threaded = run(rosa_hint_ids=hints, h_cycles=1)
    assert seen == [1] and torch.get_num_threads() == 2
    model.step_threads = None
    plain = run(rosa_hint_ids=hints, h_cycles=1)
    torch.testing.assert_close(threaded.logits, plain.logits, rtol=0, atol=0)
    for (name, a), (_, b) in zip(plain.state.tensors(), threaded.state.tensors()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert not torch.allclose(run(h_cycles=1).logits, plain.logits)          # the hints count
    assert not torch.allclose(run(rosa_hint_ids=hints).logits, plain.logits)  # the cap counts


def test_one_thread_step_passes_its_state_and_caps_on(two_threads):
    """`step` in the one-thread region hands the model the state and the caps it was given: the same
    logits as without the region, and a carried state and a cap change the result."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=64)).double().eval()
    token = torch.tensor([5, 9])

    def carried():  # a new one each time: a step extends the state's ROSA automata in place
        with torch.no_grad():
            return model(torch.tensor([[1, 2, 3], [4, 5, 6]])).state

    def run(state, **caps):
        with torch.no_grad():
            return model.step(token, state, **caps).logits

    model.step_threads = 1
    threaded = run(carried(), h_cycles=1)
    model.step_threads = None
    plain = run(carried(), h_cycles=1)
    torch.testing.assert_close(threaded, plain, rtol=0, atol=0)
    assert not torch.allclose(run(model.init_state(2), h_cycles=1), plain)  # the state counts
    assert not torch.allclose(run(carried()), plain)                        # the cap counts


def test_generate_samples_at_the_step_thread_count_and_prefills_at_torch_s(two_threads, monkeypatch):
    """`generate`'s whole token loop (the sampler too, not only the step) runs at `step_threads`: torch's
    workers woken by a two-thread sampling op would spin on the kernel pool's cores between steps; the
    prompt's forward keeps torch's own count, which is restored after."""
    import hierarchos.generate as gen

    cfg = tiny_config(vocab_size=64, context_dim=64, h_hidden=64, l_hidden=64, head_size=32, persistent_dim=32,
                      ltm_slots=16, ltm_key_dim=32, ltm_val_dim=32, ltm_chunk=4, wkv_chunk_size=4)
    torch.manual_seed(0)
    model = qmodel.build_quantized_model(cfg, qmodel.quantize_tensors(HierarchosLM(cfg).eval(), "Q8_0"))
    seen = _threads_seen_by_the_encoder(model)
    sampled, real = [], gen.sample_next

    def spy(*a, **k):
        sampled.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(gen, "sample_next", spy)
    tokens, _ = gen.generate(model, [1, 2, 3], gen.SamplingConfig(temperature=0.0, max_new_tokens=4))
    assert len(tokens) == 4 and sampled == [1] * 4 and seen == [2] + [1] * 4
    assert torch.get_num_threads() == 2
