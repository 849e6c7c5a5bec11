"""Long-term memory: closed-form surprise, threshold gating, chunk boundaries, metadata, filtered reads."""

from __future__ import annotations

import random

import torch

from hierarchos.model.memory import LongTermMemory


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make(seed, threshold=0.0, chunk=4):
    torch.manual_seed(seed)
    return LongTermMemory(dim=6, slots=10, key_dim=5, val_dim=3, topk=3, chunk=chunk,
                          write_threshold=threshold).double()


def test_closed_form_surprise_equals_autograd():
    seed = fresh_seed()
    mem = make(seed)
    e = torch.randn(2, 4, 6, dtype=torch.float64)
    values = mem.values.detach().unsqueeze(0).expand(2, -1, -1).clone().requires_grad_(True)
    read, _, _ = mem.read(mem.query(e), values)
    loss = (read - mem.target(e)).pow(2).sum()
    (expected,) = torch.autograd.grad(loss, values)
    # the open-chunk accumulator after 3 of 4 tokens holds the closed-form gradient of those tokens
    state = mem.init_state(2, 6, dtype=torch.float64)
    _, state = mem(e[:, :3], state, pos0=0)
    read3, _, _ = mem.read(mem.query(e[:, :3]), values)
    (expected3,) = torch.autograd.grad((read3 - mem.target(e[:, :3])).pow(2).sum(), values)
    torch.testing.assert_close(state["surprise"], expected3, msg=lambda m: f"seed={seed}: {m}")
    assert expected.abs().sum() > 0


def test_write_happens_at_chunk_boundaries_only():
    seed = fresh_seed()
    mem = make(seed)
    e = torch.randn(1, 9, 6, dtype=torch.float64)
    state = mem.init_state(1, 6, dtype=torch.float64)
    with torch.no_grad():
        _, s3 = mem(e[:, :3], state, pos0=0)
        assert torch.equal(s3["delta"], torch.zeros_like(s3["delta"])), f"seed={seed}"
        assert s3["writes"].sum() == 0
        _, s4 = mem(e[:, 3:4], s3, pos0=3)
        assert s4["writes"].sum() > 0, f"seed={seed}: no write at the boundary"
        assert s4["surprise"].abs().sum() == 0 and s4["input_sum"].abs().sum() == 0


def test_below_threshold_changes_nothing():
    seed = fresh_seed()
    mem = make(seed, threshold=1e9)
    e = torch.randn(2, 12, 6, dtype=torch.float64)
    with torch.no_grad():
        _, state = mem(e, mem.init_state(2, 6, dtype=torch.float64), pos0=0)
    assert torch.equal(state["delta"], torch.zeros_like(state["delta"])), f"seed={seed}"
    assert torch.equal(state["momentum"], torch.zeros_like(state["momentum"]))
    assert state["writes"].sum() == 0


def test_commit_stamps_metadata_and_filters_reads():
    seed = fresh_seed()
    mem = make(seed)
    e = torch.randn(1, 8, 6, dtype=torch.float64)
    with torch.no_grad():
        _, state = mem(e, mem.init_state(1, 6, dtype=torch.float64), pos0=0)
    written = state["writes"][0] > 0
    expected = (mem.values + state["delta"][0])[written].detach().clone()
    assert mem.commit(state, source="chat:test", now=1234.5) == int(written.sum())
    torch.testing.assert_close(mem.values[written], expected)
    assert (mem.slot_time[written] == 1234.5).all() and (mem.slot_time[~written] == 0).all()
    assert (mem.slot_source[written] == mem.source_names.index("chat:test")).all()
    attn, idx = mem.query_slots(e, sources=["chat:test"])
    assert written[idx[attn > 0]].all(), f"seed={seed}: a filtered read used a slot of another source"
    attn, idx = mem.query_slots(e, since=1000.0)
    assert written[idx[attn > 0]].all(), f"seed={seed}: a filtered read used an older slot"
    mask = mem.slot_mask(sources=["nobody"])
    assert mask is not None and not mask.any()
