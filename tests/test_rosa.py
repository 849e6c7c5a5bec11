"""ROSA hints: automaton vs brute-force reference, windowing, batch vs incremental, causality."""

import random

import pytest
import torch

from hierarchos.model.rosa import RosaAutomaton, rosa_hints, rosa_hints_bruteforce

NONE_ID = -1


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def fibonacci_word(length: int) -> list[int]:
    previous, word = [0], [0, 1]
    while len(word) < length:
        previous, word = word, word + previous
    return word[:length]


@pytest.mark.parametrize("vocab", [2, 3, 5, 50])
def test_matches_bruteforce_on_random_sequences(vocab):
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(60):
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 200))]
        got = RosaAutomaton(window=10_000, none_id=NONE_ID).extend(tokens)
        assert got == rosa_hints_bruteforce(tokens, NONE_ID), f"seed={seed} tokens={tokens}"


@pytest.mark.parametrize(
    "tokens",
    [[7] * 150, [0, 1] * 75, [0, 1, 2] * 50, fibonacci_word(200), [0, 0, 1] * 40 + [1] * 30],
    ids=["aaaa", "abab", "abcabc", "fibonacci", "mixed"],
)
def test_matches_bruteforce_on_adversarial_strings(tokens):
    got = RosaAutomaton(window=10_000, none_id=NONE_ID).extend(tokens)
    assert got == rosa_hints_bruteforce(tokens, NONE_ID)


def test_small_examples_by_hand():
    # a b a b c a: t=2 'a' seen at 0 -> next 'b'; t=3 'ab' at 1 -> 'a'; t=4 'c' new; t=5 'a' last at 2 -> 'b'
    assert rosa_hints_bruteforce([0, 1, 0, 1, 2, 0], NONE_ID) == [NONE_ID, NONE_ID, 1, 0, NONE_ID, 1]
    assert RosaAutomaton(16, NONE_ID).extend([0, 1, 0, 1, 2, 0]) == [NONE_ID, NONE_ID, 1, 0, NONE_ID, 1]
    # "aa": the suffix 'a' ends at j=0, followed by x_1 itself.
    assert RosaAutomaton(16, NONE_ID).extend([5, 5]) == [NONE_ID, 5]


@pytest.mark.parametrize("window", [1, 3, 8, 16])
@pytest.mark.parametrize("vocab", [2, 4, 30])
def test_windowed_matches_windowed_bruteforce(window, vocab):
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(20):
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 7 * window + 5))]
        automaton = RosaAutomaton(window, NONE_ID)
        got = []
        for token in tokens:
            got.append(automaton.push(token))
            assert automaton.history_len < 2 * window, f"seed={seed}"
        assert automaton.num_tokens == len(tokens)
        expected = rosa_hints_bruteforce(tokens, NONE_ID, window=window)
        assert got == expected, f"seed={seed} window={window} tokens={tokens}"


def test_window_is_plain_definition_below_two_windows():
    seed = fresh_seed()
    rng = random.Random(seed)
    tokens = [rng.randrange(3) for _ in range(31)]
    got = RosaAutomaton(16, NONE_ID).extend(tokens)
    assert got == rosa_hints_bruteforce(tokens, NONE_ID), f"seed={seed}"


def test_windowed_adversarial():
    for tokens in ([3] * 100, [0, 1] * 50, fibonacci_word(100)):
        got = RosaAutomaton(8, NONE_ID).extend(tokens)
        assert got == rosa_hints_bruteforce(tokens, NONE_ID, window=8)


def test_batch_equals_incremental_and_carries_state():
    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    batch, length, split, window = 3, 90, 37, 8
    tokens = torch.randint(0, 4, (batch, length), generator=generator)

    hints, automata = rosa_hints(tokens, None, window, NONE_ID)
    assert hints.shape == (batch, length) and hints.dtype == torch.long

    for row in range(batch):
        automaton = RosaAutomaton(window, NONE_ID)
        incremental = [automaton.push(token) for token in tokens[row].tolist()]
        assert hints[row].tolist() == incremental, f"seed={seed} row={row}"
        assert automata[row].num_tokens == length

    first, carried = rosa_hints(tokens[:, :split], None, window, NONE_ID)
    second, carried_again = rosa_hints(tokens[:, split:], carried, window, NONE_ID)
    assert carried_again is carried  # extended in place
    assert torch.equal(torch.cat([first, second], dim=1), hints), f"seed={seed}"


def test_batch_rejects_wrong_number_of_automata():
    with pytest.raises(ValueError):
        rosa_hints(torch.zeros(2, 4, dtype=torch.long), [RosaAutomaton(4, NONE_ID)], 4, NONE_ID)


def test_copy_is_independent():
    seed = fresh_seed()
    rng = random.Random(seed)
    prefix = [rng.randrange(3) for _ in range(20)]
    tail_a = [rng.randrange(3) for _ in range(30)]
    tail_b = [rng.randrange(3) for _ in range(30)]
    original = RosaAutomaton(8, NONE_ID)
    original.extend(prefix)
    duplicate = original.copy()
    hints_b = duplicate.extend(tail_b)
    hints_a = original.extend(tail_a)
    assert hints_a == rosa_hints_bruteforce(prefix + tail_a, NONE_ID, window=8)[20:], f"seed={seed}"
    assert hints_b == rosa_hints_bruteforce(prefix + tail_b, NONE_ID, window=8)[20:], f"seed={seed}"
    assert original.num_tokens == duplicate.num_tokens == 50


@pytest.mark.parametrize("window", [6, 10_000])
def test_hints_depend_only_on_the_past(window):
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(20):
        tokens = [rng.randrange(3) for _ in range(60)]
        changed_at = rng.randrange(60)
        altered = tokens.copy()
        altered[changed_at] = (altered[changed_at] + 1 + rng.randrange(2)) % 3
        before = RosaAutomaton(window, NONE_ID).extend(tokens)
        after = RosaAutomaton(window, NONE_ID).extend(altered)
        assert before[:changed_at] == after[:changed_at], f"seed={seed} changed_at={changed_at}"
