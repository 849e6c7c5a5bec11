"""ROSA hints computed one window ahead (hierarchos/train/rosa_ahead.py) against the definition.

The oracle is `rosa_hints_bruteforce` (every earlier match compared backwards, O(T^2)) over each
stream's tokens of the epoch so far: the hints of window i of an epoch are its last T values. A
window of 6 makes the automata rebuild inside windows of 10, and a small vocabulary makes matches
common. The trainer must feed the model exactly those hints, in order, out of order (resume), with
and without the carried state, in detach pieces and through the CUDA-graph wrapper's eager path."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import hierarchos.train.rosa_ahead as rosa_ahead
from hierarchos.config import tiny_config
from hierarchos.model import HierarchosLM
from hierarchos.model.rosa import rosa_hints_bruteforce
from hierarchos.train.batches import TokenStreams
from hierarchos.train.rosa_ahead import WindowHints, reference_window_hints
from hierarchos.train.trainer import TrainConfig, Trainer

WINDOW = 6  # ROSA's window: the automata rebuild every 6 tokens once 12 are held


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def streams(seed: int, shuffle: int | None = None) -> TokenStreams:
    """Two streams of 41 tokens from a vocabulary of 5 (plus EOS 7): 4 windows of 10 an epoch."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 5, (81,), generator=g).tolist()]
    return TokenStreams.from_documents(docs, eos_id=7, batch_size=2, chunk=10, shuffle_seed=shuffle)


def by_definition(s: TokenStreams, epoch: int, index: int, none_id: int, carry: bool = True) -> list[list[int]]:
    window = s.batch(index, epoch)[0]
    rows = []
    for r in range(window.shape[0]):
        earlier = s.prefix(index, epoch)[r].tolist() if carry else []
        full = earlier + window[r].tolist()
        rows.append(rosa_hints_bruteforce(full, none_id, WINDOW)[len(earlier):])
    return rows


@pytest.mark.parametrize("shuffle", [None, 3])
@pytest.mark.parametrize("carry", [True, False])
def test_the_reference_is_the_definition(shuffle, carry):
    seed = fresh_seed()
    s = streams(seed, shuffle)
    assert len(s) == 4
    for epoch in (0, 1):
        for index in range(len(s)):
            got = reference_window_hints(s, epoch, index, WINDOW, 99, carry=carry)
            assert got.dtype == torch.long and got.shape == (2, 10)
            assert got.tolist() == by_definition(s, epoch, index, 99, carry), f"seed {seed}: {epoch}, {index}"
    # not a vacuous comparison: this stream has matches; the default carries the state
    assert (reference_window_hints(s, 0, 2, WINDOW, 99) != 99).any(), f"seed {seed}"
    assert torch.equal(reference_window_hints(s, 0, 2, WINDOW, 99), reference_window_hints(s, 0, 2, WINDOW, 99, True))


@pytest.mark.parametrize("carry", [True, False])
def test_in_order_with_the_next_window_ahead_and_in_any_order(carry):
    seed = fresh_seed()
    s = streams(seed, shuffle=5)
    keys = [(e, i) for e in (0, 1) for i in range(len(s))]
    hints = WindowHints(s, WINDOW, 99, carry=carry)
    for k, key in enumerate(keys):  # the trainer's order: each call starts the next window
        upcoming = keys[k + 1:k + 3]  # two ahead, as the trainer asks
        assert hints.get(*key, upcoming).tolist() == by_definition(s, *key, 99, carry), f"seed {seed}: {key}"
    assert hints.replays == 0  # every window continued the automata of the one before
    rng = random.Random(seed)
    for _ in range(12):  # a resume, a wrong guess of the next window: the same hints every time
        key, guess = rng.choice(keys), rng.sample(keys, rng.randrange(3))
        assert hints.get(*key, guess).tolist() == by_definition(s, *key, 99, carry), f"seed {seed}: {key}"
    hints.close()
    assert hints._pool is None and not hints._queue
    # a different future than the one in flight: window 2 is dropped, window 3 computed instead
    hints.get(0, 0, [(0, 1), (0, 2)])
    assert hints.get(0, 1, [(0, 3)]).tolist() == by_definition(s, 0, 1, 99, carry)
    assert [key for key, _ in hints._queue] == [(0, 3)]
    assert hints.get(0, 3).tolist() == by_definition(s, 0, 3, 99, carry), f"seed {seed}"
    hints.get(1, 0)  # an epoch's first window: fresh automata, never a replay
    replays = hints.replays
    hints.get(0, 2)  # out of sequence: a replay of windows 0 and 1 when carrying, none otherwise
    hints.get(1, 1)
    hints.get(1, 2)  # in sequence again
    assert hints.replays == replays + (2 if carry else 0)


def test_the_next_windows_are_fed_on_one_worker_thread_in_order(monkeypatch):
    calls, busy, overlaps = [], [], []
    real = rosa_ahead.rosa_hints

    def recording(tokens, automata, window, none_id):
        overlaps.append(bool(busy))  # another window's automata still being fed: a second thread
        busy.append(1)
        time.sleep(0.02)
        calls.append((threading.get_ident(), threading.current_thread().name))
        busy.pop()
        return real(tokens, automata, window, none_id)

    monkeypatch.setattr(rosa_ahead, "rosa_hints", recording)
    s = streams(0)
    hints = WindowHints(s, WINDOW, 99, carry=True)
    first = hints.get(0, 0, [(0, 1), (0, 2), (0, 3)])
    time.sleep(0.2)  # the three upcoming windows run meanwhile
    rest = [hints.get(0, i) for i in (1, 2, 3)]
    hints.close()
    assert calls[0][0] == threading.get_ident()
    workers = {c for c in calls[1:]}
    assert len(workers) == 1 and next(iter(workers))[1].startswith("rosa-hints"), workers
    assert not any(overlaps), "two windows were fed at once"
    assert hints.replays == 0
    for i, got in enumerate([first, *rest]):
        assert got.tolist() == by_definition(s, 0, i, 99)
    assert not any(t.name.startswith("rosa-hints") for t in threading.enumerate())


def test_hints_for_the_gpu_are_pinned(monkeypatch):
    pinned = []
    monkeypatch.setattr(rosa_ahead, "_pin", lambda t: pinned.append(t) or t)
    s = streams(0)
    plain = WindowHints(s, WINDOW, 99, carry=True).get(0, 0)
    pinning = WindowHints(s, WINDOW, 99, carry=True, pin=True)
    got = pinning.get(0, 0, [(0, 1)])
    pinning.get(0, 1)
    pinning.close()
    assert not pinned[:0] and len(pinned) == 2 and pinned[0] is got and torch.equal(got, plain)


def _trainer(seed: int, **cfg) -> Trainer:
    torch.manual_seed(seed)
    model = HierarchosLM(tiny_config(vocab_size=8, rosa_window=WINDOW))
    config = TrainConfig(**{"epochs": 2, "batch_size": 2, "starting_lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                            "eval_every_epoch": 0, **cfg})
    return Trainer(model, streams(seed, shuffle=9), config, torch.device("cpu"), log=lambda line: None)


def _seen_hints(trainer: Trainer) -> list[torch.Tensor]:
    """The hints each forward of the model received, in order."""
    seen, forward = [], trainer.model.forward

    def recording(x, state=None, rosa_hint_ids=None, **kw):
        seen.append(rosa_hint_ids.clone())
        return forward(x, state, rosa_hint_ids=rosa_hint_ids, **kw)

    trainer.model.forward = recording
    return seen


@pytest.mark.parametrize("cfg", [{}, {"persist_state": False}, {"detach_every": 4}, {"cuda_graphs": True}])
def test_the_trainer_feeds_the_model_the_defined_hints(cfg):
    seed = fresh_seed()
    trainer = _trainer(seed, **cfg)
    seen = _seen_hints(trainer)
    trainer.run()
    carry = cfg.get("persist_state", True)
    keys = [(e, i) for e in (0, 1) for i in range(4)]
    pieces = 3 if "detach_every" in cfg else 1  # pieces of 4, 4 and 2 tokens
    assert len(seen) == len(keys) * pieces, f"seed {seed}"
    for k, key in enumerate(keys):
        window = torch.cat(seen[k * pieces:(k + 1) * pieces], dim=1)
        assert window.tolist() == by_definition(trainer.train_streams, *key, trainer.model.cfg.rosa_none_id,
                                                carry), f"seed {seed}: window {key}"
    assert trainer.hints.replays == 0 and trainer.hints._pool is None  # in order; closed at the end
    assert trainer.state is None or trainer.state.rosa is None  # no second set of automata


def test_a_resumed_trainer_sees_the_hints_of_an_uninterrupted_run():
    seed = fresh_seed()
    whole = _trainer(seed)
    seen_whole = _seen_hints(whole)
    whole.run()
    first = _trainer(seed)
    first.run(stop_requested=lambda: first.opt_step >= 3)  # stops inside epoch 0, after window 2
    resumed = _trainer(seed)
    resumed.load_trainer_state(first.trainer_state())
    resumed.load_state_tensors(first.state_tensors())
    seen_resumed = _seen_hints(resumed)
    resumed.run()
    assert resumed.hints.replays == 1  # the window after the resume replays the epoch's first three
    assert len(seen_resumed) == 5
    for got, want in zip(seen_resumed, seen_whole[3:]):
        assert torch.equal(got, want), f"seed {seed}"


def test_run_stops_the_worker_when_a_window_fails():
    trainer = _trainer(0)
    forward, calls = trainer.model.forward, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return forward(*args, **kw)

    trainer.model.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        trainer.run()
    assert trainer.hints._pool is None and not trainer.hints._queue


def test_a_rosa_window_without_hints_is_refused():
    trainer = _trainer(0)
    x, y = trainer.train_streams.batch(0)
    with pytest.raises(ValueError, match="pass the window's hints"):
        trainer._window_loss(x, y)


@pytest.mark.parametrize("built", [True, False])
def test_train_says_when_rosa_runs_on_the_python_automaton(tmp_path, capsys, monkeypatch, built):
    """Without the C++ kernel `train` feeds ROSA from the Python automaton (slower on a fast device):
    it says so in one line, and only then."""
    from hierarchos.cli import main
    from hierarchos.model import rosa as rosa_mod

    if built and not rosa_mod.cpp_automaton_available():
        pytest.skip("the C++ kernel is not built here")  # CI builds it (setup.sh); this case needs it
    if not built:
        monkeypatch.setattr(rosa_mod, "_kernels", None)
    code = main(["train", "--tiny", "--tokenizer-path", "byte", "--max_length", "16", "--batch_size", "2",
                 "--max-steps", "1", "--out-dir", str(tmp_path / "m")])
    assert code in (0, None)
    said = "rosa: the C++ kernel is not built" in capsys.readouterr().out
    assert said == (not built)
