"""HierarchosState: the names and sizes of its tensors, and map / detach / clone / to on a hand-built tree."""

import torch

from hierarchos.model.state import HierarchosState


class Automaton:
    """Stands in for a ROSA automaton: only copy() is used by the state."""

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def copy(self):
        return Automaton(self.tokens)


def hand_state(requires_grad=False):
    memory = {"values": torch.arange(6.0).view(2, 3).requires_grad_(requires_grad),
              "count": torch.tensor([1, 2], dtype=torch.int64), "note": "kept as it is"}
    rounds = [{"plan": torch.ones(2, 4, dtype=torch.float64), "workers": [torch.zeros(2, 5), None]},
              {"plan": torch.full((2, 4), 2.0, dtype=torch.float64), "workers": []}]
    return HierarchosState(pos=7, memory=memory, rounds=rounds, rosa=[Automaton([1]), Automaton([2, 3])])


def test_tensors_names_every_leaf_by_its_path_in_order():
    state = hand_state()
    names = [name for name, _ in state.tensors()]
    assert names == ["memory.values", "memory.count", "rounds.0.plan", "rounds.0.workers.0", "rounds.1.plan"]
    assert state.shapes() == {"memory.values": (2, 3), "memory.count": (2,), "rounds.0.plan": (2, 4),
                              "rounds.0.workers.0": (2, 5), "rounds.1.plan": (2, 4)}
    # 6 float32 + 2 int64 + 8 float64 + 10 float32 + 8 float64 bytes
    assert state.nbytes() == 6 * 4 + 2 * 8 + 8 * 8 + 10 * 4 + 8 * 8


def test_map_applies_to_every_tensor_and_keeps_the_rest():
    state = hand_state()
    mapped = state.map(lambda t: t * 2 if t.is_floating_point() else t + 100)
    assert mapped.pos == 7 and mapped.memory["note"] == "kept as it is"
    assert torch.equal(mapped.memory["values"], torch.arange(6.0).view(2, 3) * 2)
    assert torch.equal(mapped.memory["count"], torch.tensor([101, 102]))
    assert torch.equal(mapped.rounds[1]["plan"], torch.full((2, 4), 4.0, dtype=torch.float64))
    assert mapped.rounds[0]["workers"][1] is None and mapped.rounds[1]["workers"] == []
    assert isinstance(mapped.rounds, list) and isinstance(mapped.rounds[0]["workers"], list)
    assert mapped.rosa is state.rosa  # shared unless asked to copy
    assert torch.equal(state.memory["values"], torch.arange(6.0).view(2, 3))  # the original untouched


def test_map_copy_rosa_copies_each_automaton():
    state = hand_state()
    copied = state.map(lambda t: t, copy_rosa=True)
    assert copied.rosa is not state.rosa and len(copied.rosa) == 2
    assert all(a is not b and a.tokens == b.tokens for a, b in zip(copied.rosa, state.rosa))
    assert HierarchosState(0, {}, [], None).map(lambda t: t, copy_rosa=True).rosa is None


def test_detach_cuts_the_graph_and_shares_the_automata():
    state = hand_state(requires_grad=True)
    state.memory["values"] = state.memory["values"] * 3  # a tensor with history
    detached = state.detach()
    assert state.memory["values"].grad_fn is not None and detached.memory["values"].grad_fn is None
    assert not detached.memory["values"].requires_grad
    assert torch.equal(detached.memory["values"], state.memory["values"].detach())
    assert detached.rosa is state.rosa


def test_clone_is_independent_of_the_original():
    state = hand_state()
    twin = state.clone()
    twin.memory["values"].add_(1)
    twin.rounds[0]["workers"][0].fill_(9)
    twin.rosa[0].tokens.append(99)
    assert torch.equal(state.memory["values"], torch.arange(6.0).view(2, 3))
    assert torch.equal(state.rounds[0]["workers"][0], torch.zeros(2, 5))
    assert state.rosa[0].tokens == [1] and twin.rosa[0].tokens == [1, 99]
    assert twin.pos == state.pos


def test_to_moves_every_tensor():
    moved = hand_state().to("meta")
    assert all(t.device.type == "meta" for _, t in moved.tensors())
    assert [t.dtype for _, t in moved.tensors()] == [t.dtype for _, t in hand_state().tensors()]
