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
