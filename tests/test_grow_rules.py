"""Rules of hierarchos.model.grow that tests/test_grow.py (each growth keeps the function) does not pin:
which slots `activate_slots` turns into ordinary ones, and its one-line error. Tiny models, CPU."""

from __future__ import annotations

import pytest
import torch

from hierarchos.config import tiny_config
from hierarchos.errors import HierarchosError
from hierarchos.model import HierarchosLM
from hierarchos.model.grow import activate_slots, grow_slots
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
