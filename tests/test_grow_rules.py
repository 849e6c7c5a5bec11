"""Rules of hierarchos.model.grow that tests/test_grow.py (each growth keeps the function) does not pin:
which slots `activate_slots` turns into ordinary ones, a new token's row (the mean row plus seeded
float64 noise), per-block DeepEmbed tables as copies of a trained shared table, a feature left off
on request, and the one-line errors. Tiny models, CPU."""

from __future__ import annotations

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM
from hierarchos.model.grow import NEW_TOKEN_NOISE, activate_slots, enable_features, grow_slots, grow_vocab
from hierarchos.model.memory import DORMANT_SOURCE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def grown(slots=12):
    """A tiny model (8 slots, slot 3 and 5 holding memories from sources 4 and 0) grown to `slots`."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    with torch.no_grad():
        model.memory.slot_source[3], model.memory.slot_source[5] = 4, 0
    return grow_slots(model, slots)


def sources(model):
    return model.memory.slot_source.tolist()


def test_activate_slots_turns_only_the_given_dormant_slots_into_ordinary_ones():
    model = grown()
    before = sources(model)
    assert before == [-1, -1, -1, 4, -1, 0, -1, -1] + [DORMANT_SOURCE] * 4
    live = activate_slots(model, (s for s in (9, 11, 3, 0)))  # any iterable; non-dormant slots keep their source
    assert sources(live) == [-1, -1, -1, 4, -1, 0, -1, -1, DORMANT_SOURCE, -1, DORMANT_SOURCE, -1]
    assert sources(model) == before  # the input model is not modified
    assert sources(activate_slots(model, [])) == before
    assert sources(activate_slots(model)) == [-1, -1, -1, 4, -1, 0, -1, -1, -1, -1, -1, -1]
    for name, tensor in live.state_dict().items():  # nothing but the slot sources changes
        if name != "memory.slot_source":
            assert torch.equal(tensor, model.state_dict()[name]), name


@pytest.mark.parametrize("slots", [[-1], [12], [0, 12], [-3, 5]])
def test_activate_slots_outside_the_memory_is_one_line_error(slots):
    with pytest.raises(HierarchosError) as err:
        activate_slots(grown(), slots)
    assert str(err.value) == "activate_slots: slot indices must be in 0..11"


def test_activate_slots_takes_the_first_and_last_slot():
    assert sources(activate_slots(grown(), [0, 11]))[11] == -1


def test_a_new_tokens_row_is_the_mean_row_plus_noise_from_the_seed():
    """Rows past the old vocabulary: mean of the old rows + N(0, NEW_TOKEN_NOISE^2) drawn in float64
    from a generator seeded with seed + 1 (the same rows for the same seed, whatever the global RNG)."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(vocab_size=32))
    table = model.embed.weight.detach()
    for seed in (0, 5):
        torch.manual_seed(123 + seed)  # the global RNG must not matter
        new = grow_vocab(model, 35) if seed == 0 else grow_vocab(model, 35, seed=seed)
        noise = torch.randn(3, table.shape[1], generator=torch.Generator().manual_seed(seed + 1),
                            dtype=torch.float64) * NEW_TOKEN_NOISE
        assert torch.equal(new.embed.weight[:32], table)
        assert torch.equal(new.embed.weight[32:], table.mean(0, keepdim=True) + noise.to(table))


def test_per_block_deepembed_tables_start_as_copies_of_the_trained_shared_table():
    torch.manual_seed(0)
    shared = HierarchosLM(tiny_config(use_deepembed=True, l_layers=2))
    with torch.no_grad():
        for stack in (shared.reasoner.manager, shared.reasoner.worker):
            stack.deepembed[0].weight.uniform_(0.5, 1.5)  # trained: no longer the ones of a fresh table
    per_block = enable_features(shared, deepembed_per_block=True)
    for stack, old in ((per_block.reasoner.manager, shared.reasoner.manager),
                       (per_block.reasoner.worker, shared.reasoner.worker)):
        assert len(stack.deepembed) == len(stack.blocks)
        for table in stack.deepembed:
            assert torch.equal(table.weight, old.deepembed[0].weight)
    with torch.no_grad():  # already per block: every block keeps its own table
        per_block.reasoner.worker.deepembed[1].weight.mul_(2.0)
    again = enable_features(per_block, deepembed_per_block=True)
    for a, b in zip(again.reasoner.worker.deepembed, per_block.reasoner.worker.deepembed):
        assert torch.equal(a.weight, b.weight)


def test_a_feature_asked_off_that_is_off_is_no_change_and_off_from_on_is_one_line_error():
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config(use_rosa=False, use_deepembed=False))
    same = enable_features(model, use_rosa=False, use_deepembed=False, deepembed_per_block=False)
    assert not same.cfg.use_rosa and not same.cfg.use_deepembed
    for name, tensor in same.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with pytest.raises(HierarchosError) as err:
        enable_features(HierarchosLM(tiny_config(use_rosa=True)), use_rosa=False)
    assert str(err.value) == ("use_rosa: cannot turn a feature off by growing a model (it changes what the "
                              "model computes); train a new model without it")


def test_new_slots_get_the_fresh_init_of_the_seed_default_0():
    """The new slots' keys and values are those of a new model initialised under the seed (default 0):
    the same seed gives the same slots, another seed other ones; the old slots are kept as they are."""
    torch.manual_seed(0)
    model = HierarchosLM(tiny_config())
    default, zero, other = grow_slots(model, 12), grow_slots(model, 12, seed=0), grow_slots(model, 12, seed=1)
    assert torch.equal(default.memory.keys, zero.memory.keys) and torch.equal(default.memory.values, zero.memory.values)
    assert not torch.equal(default.memory.keys[8:], other.memory.keys[8:])
    assert torch.equal(default.memory.keys[:8], model.memory.keys)
