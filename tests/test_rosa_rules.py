"""ROSA rules on the Python reference automaton too (test_rosa.py runs the default backend, the C++
port when it is built): `PyRosaAutomaton` against the brute-force definition, windowed and not, by
push / extend / copy; the rebuild schedule (`history_start`, the held history) by hand; the
backend choice and its errors; `rosa_hints` over Python automata; pickling (found by mutation
testing, TESTING.md)."""

import pickle
import random

import numpy as np
import pytest
import torch

from hierarchos.errors import HierarchosError
from hierarchos.model import rosa as R
from hierarchos.model.rosa import PyRosaAutomaton, RosaAutomaton, history_start, rosa_hints, rosa_hints_bruteforce

NONE_ID = -1
BACKENDS = ["python"] + (["cpp"] if R._kernels is not None else [])


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def test_history_start_by_hand():
    # window 4: the history is rebuilt from the last 4 tokens right after the 8th, 12th, 16th, ...
    assert [history_start(n, 4) for n in range(14)] == [0] * 8 + [4] * 4 + [8] * 2
    assert [history_start(n, 1) for n in range(5)] == [0, 0, 1, 2, 3]


def test_bruteforce_by_hand():
    # longest earlier suffix, latest occurrence on ties, the token after it
    assert rosa_hints_bruteforce([], NONE_ID) == []
    assert rosa_hints_bruteforce([4], 9) == [9]
    assert rosa_hints_bruteforce([1, 2, 3, 1, 2, 1, 2], NONE_ID) == [NONE_ID, NONE_ID, NONE_ID, 2, 3, 2, 1]
    # 'a b a b': t=3 suffix 'ab' at j=1 -> x_2 = a; 'aaa': t=2 'aa' ends at j=1 -> x_2
    assert rosa_hints_bruteforce([0, 1, 0, 1], NONE_ID) == [NONE_ID, NONE_ID, 1, 0]
    assert rosa_hints_bruteforce([5, 5, 5], NONE_ID) == [NONE_ID, 5, 5]
    # unwindowed, token 5 matches '7 8' at index 1 -> 9; windowed (window 2) tokens 4 and 5 see only
    # the history from index 2 = history_start(4, 2): the 7 at index 0 is gone, and token 5 matches
    # the single 8 at index 3 -> 7
    tokens = [7, 8, 9, 8, 7, 8]
    assert rosa_hints_bruteforce(tokens, NONE_ID) == [NONE_ID, NONE_ID, NONE_ID, 9, 8, 9]
    assert rosa_hints_bruteforce(tokens, NONE_ID, window=2) == [NONE_ID, NONE_ID, NONE_ID, 9, NONE_ID, 7]


@pytest.mark.parametrize("window", [1, 2, 5, 10_000])
def test_python_automaton_equals_the_definition(window):
    seed = fresh_seed()
    rng = random.Random(seed)
    for vocab in (2, 3, 7):
        for _ in range(8):
            tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
            expected = rosa_hints_bruteforce(tokens, NONE_ID, window=None if window == 10_000 else window)
            automaton = PyRosaAutomaton(window, NONE_ID)
            split = rng.randint(0, len(tokens))
            got = automaton.extend(tokens[:split]) + [automaton.push(t) for t in tokens[split:]]
            assert got == expected, f"seed={seed} window={window} tokens={tokens}"
            assert automaton.num_tokens == len(tokens)
            assert automaton.history_len == len(tokens) - history_start(len(tokens), window) < 2 * window
            # a suffix automaton of n tokens has at most 2n - 1 states (n >= 2), plus nothing else
            assert automaton.num_states <= max(2 * automaton.history_len, 1) + (automaton.history_len == 0)


@pytest.mark.parametrize("tokens", [[7] * 40, [0, 1] * 20, [0, 1, 2] * 13, [0, 0, 1] * 12 + [1] * 5])
def test_python_automaton_on_repetitive_strings(tokens):
    for window in (3, 8, 10_000):
        got = PyRosaAutomaton(window, NONE_ID).extend(tokens)
        assert got == rosa_hints_bruteforce(tokens, NONE_ID, window=None if window == 10_000 else window)


def test_python_automaton_rebuilds_from_the_last_window():
    automaton = PyRosaAutomaton(3, 99)
    assert automaton.extend([1, 2, 3, 4, 5]) == [99] * 5
    assert automaton.history_len == 5 and automaton.num_states == 6        # root + one per token
    assert automaton.push(6) == 99                                          # 6 tokens = 2 windows: rebuild
    assert automaton.history_len == 3 and automaton._history == [4, 5, 6]
    assert automaton.push(5) == 6                                           # 5 held at index 1 -> 6
    assert automaton.push(1) == 99                                          # 1 fell out of the history
    assert automaton.num_tokens == 8


def test_python_copy_is_deep():
    seed = fresh_seed()
    rng = random.Random(seed)
    prefix = [rng.randrange(3) for _ in range(13)]
    tails = [[rng.randrange(3) for _ in range(20)] for _ in range(2)]
    original = PyRosaAutomaton(5, NONE_ID)
    original.extend(prefix)
    duplicate = original.copy()
    assert (duplicate.window, duplicate.none_id, duplicate.num_tokens) == (5, NONE_ID, 13)
    got_b = duplicate.extend(tails[1])
    got_a = original.extend(tails[0])
    for got, tail in ((got_a, tails[0]), (got_b, tails[1])):
        assert got == rosa_hints_bruteforce(prefix + tail, NONE_ID, window=5)[13:], f"seed={seed}"


def test_window_must_be_positive_and_ids_are_ints():
    with pytest.raises(ValueError, match=r"^window must be >= 1, got 0$"):
        PyRosaAutomaton(0, NONE_ID)
    automaton = PyRosaAutomaton(np.int64(4), np.int32(-1))
    assert type(automaton.window) is int and type(automaton.none_id) is int
    assert PyRosaAutomaton(1, 5).extend([3, 3, 3]) == [5, 3, 3]


# ---- the wrapper: backend choice, properties, pickling -----------------------------------------


def test_backend_choice_and_errors(monkeypatch):
    monkeypatch.delenv("HIERARCHOS_ROSA", raising=False)
    assert RosaAutomaton(4, NONE_ID, backend="python").backend == "python"
    assert RosaAutomaton(4, NONE_ID).backend == ("cpp" if R._kernels is not None else "python")
    monkeypatch.setenv("HIERARCHOS_ROSA", "python")
    assert RosaAutomaton(4, NONE_ID).backend == "python"
    monkeypatch.setenv("HIERARCHOS_ROSA", "fast")
    with pytest.raises(ValueError, match=r"^ROSA backend must be one of \('auto', 'cpp', 'python'\), got 'fast'$"):
        RosaAutomaton(4, NONE_ID)
    monkeypatch.delenv("HIERARCHOS_ROSA")
    monkeypatch.setattr(R, "_kernels", None)
    assert RosaAutomaton(4, NONE_ID).backend == "python"
    assert RosaAutomaton(4, NONE_ID, backend="auto").backend == "python"
    with pytest.raises(HierarchosError, match=r"^ROSA backend 'cpp' needs the C\+\+ kernel, which is not built; "
                                              r"build it with `bash setup.sh`$"):
        RosaAutomaton(4, NONE_ID, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapper_interface(backend):
    seed = fresh_seed()
    rng = random.Random(seed)
    tokens = [rng.randrange(3) for _ in range(25)]
    expected = rosa_hints_bruteforce(tokens, NONE_ID, window=4)
    automaton = RosaAutomaton(4, NONE_ID, backend=backend)
    assert (automaton.window, automaton.none_id, automaton.num_tokens) == (4, NONE_ID, 0)
    assert automaton.extend(tokens[:5]) == expected[:5]
    hints = automaton.extend_array(np.array(tokens[5:20], dtype=np.int64))
    assert hints.dtype == np.int64 and hints.tolist() == expected[5:20], f"seed={seed}"
    assert isinstance(automaton.push(tokens[20]), int)
    restored = pickle.loads(pickle.dumps(automaton))
    assert restored.backend == backend and restored.num_tokens == automaton.num_tokens == 21
    assert restored.history_len == automaton.history_len == 21 - history_start(21, 4)
    assert restored.extend(tokens[21:]) == expected[21:], f"seed={seed}"
    assert automaton.extend(tokens[21:]) == expected[21:], f"seed={seed}"
    assert automaton.num_states >= automaton.history_len + 1
    duplicate = automaton.copy()
    duplicate.num_tokens = 7
    assert duplicate.num_tokens == 7 and automaton.num_tokens == 25


def test_rosa_hints_over_python_automata_continues_each_row():
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed % 2**63)
    tokens = torch.randint(0, 3, (2, 30), generator=gen)
    automata = [PyRosaAutomaton(4, NONE_ID), RosaAutomaton(4, NONE_ID, backend="python")]
    first, same = rosa_hints(tokens[:, :11], automata, 4, NONE_ID)
    second, _ = rosa_hints(tokens[:, 11:], automata, 4, NONE_ID)
    assert same is automata
    for row in range(2):
        expected = rosa_hints_bruteforce(tokens[row].tolist(), NONE_ID, window=4)
        assert torch.cat([first, second], dim=1)[row].tolist() == expected, f"seed={seed}"
    with pytest.raises(ValueError, match=r"^tokens must be \(B, T\), got shape \(30,\)$"):
        rosa_hints(tokens[0], None, 4, NONE_ID)
    with pytest.raises(ValueError, match=r"^1 automata for a batch of 2 rows$"):
        rosa_hints(tokens, automata[:1], 4, NONE_ID)


def endpos_classes(tokens: list[int]) -> int:
    """States of the minimal suffix automaton of `tokens`, from its definition: one per distinct
    set of end positions among the nonempty substrings, plus the root (the empty string)."""
    classes = set()
    n = len(tokens)
    for i in range(n):
        for j in range(i + 1, n + 1):
            sub = tokens[i:j]
            size = j - i
            classes.add(frozenset(e for e in range(size - 1, n) if tokens[e - size + 1:e + 1] == sub))
    return len(classes) + 1


def test_python_automaton_is_the_minimal_suffix_automaton():
    """Correct hints do not need a minimal automaton (a needless clone still answers right), so the
    state count is checked against the endpos classes of the held history, by brute force."""
    seed = fresh_seed()
    rng = random.Random(seed)
    assert endpos_classes([0, 1, 0]) == 4 and endpos_classes([5, 5, 5]) == 4 and endpos_classes([0, 1, 1]) == 5
    for _ in range(12):
        tokens = [rng.randrange(rng.choice([2, 3])) for _ in range(rng.randint(1, 22))]
        window = rng.choice([4, 7, 100])
        automaton = PyRosaAutomaton(window, NONE_ID)
        automaton.extend(tokens)
        held = tokens[history_start(len(tokens), window):]
        assert automaton._history == held, f"seed={seed}"
        assert automaton.num_states == endpos_classes(held), f"seed={seed} tokens={tokens} window={window}"


@pytest.mark.skipif(R._kernels is None, reason="the C++ port is not built")
def test_cpp_extend_takes_any_array_of_ids_in_order():
    tokens = np.array([[1, 2, 1], [2, 3, 1]], dtype=np.int32)               # read row after row
    want = rosa_hints_bruteforce(tokens.reshape(-1).tolist(), NONE_ID)
    assert RosaAutomaton(16, NONE_ID, backend="cpp").extend(tokens) == want
    assert RosaAutomaton(16, NONE_ID, backend="cpp").extend(torch.tensor(tokens)) == want
