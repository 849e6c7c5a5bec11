"""TokenStreams' shuffled window order (hierarchos/train/batches.py): the lazy EpochOrder against its
listed definition and against the properties that define the shuffle (each window once per epoch,
consecutive windows inside a segment, seeded, per epoch, disjoint DDP shards, exact resume), on both
of its permutations (listed for few segments, Feistel for many)."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
import torch

from hierarchos.train import batches
from hierarchos.train.batches import EpochOrder, TokenStreams, reference_order


@pytest.fixture
def seed():
    value = random.randrange(2**31)
    print(f"seed {value}")
    return value


@pytest.fixture(params=["listed", "feistel"])
def permutation(request, monkeypatch):
    if request.param == "feistel":  # every order, however small, through the Feistel network
        monkeypatch.setattr(batches, "EXPLICIT_SEGMENTS", 0)
    return request.param


def _eager_old_order(seed: int, epoch: int, rows: int, windows: int) -> tuple[np.ndarray, np.ndarray]:
    """The order as it was built before it became lazy (every window's start listed up front, one
    uniform segment permutation per row): a different permutation, kept to test that the lazy
    one has the same structure (segment length, segment count, row permutation)."""
    rng = np.random.default_rng([int(seed), int(epoch)])
    source_rows = rng.permutation(rows)
    seg = max(1, min(batches.SEGMENT_WINDOWS, windows // 4))
    segments = [np.arange(s, min(s + seg, windows)) for s in range(0, windows, seg)]
    starts = np.stack([np.concatenate([segments[k] for k in rng.permutation(len(segments))])
                       for _ in range(rows)])
    return source_rows, starts


def _runs(row: np.ndarray) -> list[list[int]]:
    """A row's window indices cut where the next is not the following window (segment boundaries)."""
    runs = [[int(row[0])]]
    for w in row[1:]:
        if int(w) == runs[-1][-1] + 1:
            runs[-1].append(int(w))
        else:
            runs.append([int(w)])
    return runs


def test_lazy_order_equals_its_listed_definition(seed, permutation):
    rng = np.random.default_rng(seed)
    for windows in [1, 2, 3, 5, 8, 63, 64, 65, 257, int(rng.integers(2, 5000)), int(rng.integers(5000, 40000))]:
        rows = int(rng.integers(1, 5))
        order = EpochOrder(seed, 3, rows, windows)
        source, listed = reference_order(seed, 3, rows, windows)
        assert np.array_equal(order.source_rows, source)
        steps = rng.permutation(windows)[: min(windows, 300)]  # any steps, in any order
        assert np.array_equal(order.window_index(steps), listed[:, steps]), windows
        assert np.array_equal(np.stack([order.step_windows(int(s)) for s in steps], axis=1), listed[:, steps])
        for row in listed:  # each of the row's windows exactly once
            assert np.array_equal(np.sort(row), np.arange(windows))


def test_segments_have_the_old_orders_structure(seed, permutation):
    rng = np.random.default_rng(seed)
    rows, windows = int(rng.integers(1, 5)), int(rng.integers(3000, 20000))  # >= 47 segments
    new_rows, new = reference_order(seed, 0, rows, windows)
    old_rows, old = _eager_old_order(seed, 0, rows, windows)
    assert np.array_equal(new_rows, old_rows)  # the same row permutation (the same first draw)
    seg = max(1, min(batches.SEGMENT_WINDOWS, windows // 4))
    for new_row, old_row in zip(new, old):
        new_runs, old_runs = _runs(new_row), _runs(old_row)
        # the same segments: runs of seg consecutive windows that start at multiples of seg
        # (two neighbouring segments may happen to follow each other: then they form one run)
        assert sorted(w for r in new_runs for w in r) == sorted(w for r in old_runs for w in r)
        for run in new_runs:
            assert run[0] % seg == 0 and (len(run) % seg == 0 or run[-1] == windows - 1)
    assert len(_runs(new[0])) > 0.8 * -(-windows // seg)  # shuffled: few segments still follow their neighbour


def test_feistel_permutation_looks_random(seed):
    rows, segments = 3, 20000
    order = EpochOrder(seed, 0, rows, segments * batches.SEGMENT_WINDOWS)
    assert order.perms is None and order.segments == segments
    slots = np.arange(segments)
    for b in range(rows):
        perm = order._walk(slots.astype(np.uint64), np.full(segments, b)).astype(np.int64)
        assert np.array_equal(np.sort(perm), slots)
        # rank correlation of slot and segment: ~N(0, 1/sqrt(n)) for a uniform permutation (sd 0.007)
        assert abs(np.corrcoef(slots, perm)[0, 1]) < 0.05
        steps = np.diff(perm)  # not an arithmetic progression or a few shifted blocks
        assert len(np.unique(steps)) > segments // 4
        assert np.mean(perm == slots) < 0.01  # few fixed points (1/n expected)


def test_setting_up_an_epoch_costs_memory_per_row_not_per_window(seed):
    tracemalloc.start()
    try:
        order = EpochOrder(seed, 0, 4, 10**9)  # a listed order would need 32 GB
        order.step_windows(10**9 - 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak


def stream_windows(streams: TokenStreams, epoch: int, steps=None) -> np.ndarray:
    """(B, steps) first token of each step's window of each batch row (token i of the corpus is i)."""
    steps = range(len(streams)) if steps is None else steps
    return np.stack([streams.batch(i, epoch)[0][:, 0].numpy() for i in steps], axis=1)


def corpus_streams(rng, seed, batch_size=None, chunk=None, per_stream=None):
    B = batch_size or int(rng.integers(1, 6))
    T = chunk or int(rng.integers(2, 9))
    n = per_stream or int(rng.integers(4 * T, 300 * T))
    flat = np.arange(B * n, dtype=np.int64)
    return TokenStreams.from_tokens(flat, B, T, shuffle_seed=seed), flat, B, T, n


def test_each_window_once_per_epoch_and_consecutive_inside_segments(seed, permutation):
    rng = np.random.default_rng(seed)
    streams, _, B, T, n = corpus_streams(rng, seed)
    W = (n - 1) // T
    assert len(streams) == W
    for epoch in range(2):
        starts = stream_windows(streams, epoch)
        order = streams.order(epoch)
        for b in range(B):
            x, y = streams.batch(int(rng.integers(0, W)), epoch)
            assert torch.equal(y, x + 1) and x.shape == (B, T) and x.dtype == torch.long
            row = int(order.source_rows[b])
            # batch row b reads one source row, each of its full windows exactly once
            assert np.array_equal(np.sort(starts[b]), row * n + np.arange(W) * T)
            # the stream moves on to the next window (carried state sees continuous text)
            # except at segment boundaries: one per segment
            runs = _runs((starts[b] - row * n) // T)
            assert len(runs) <= order.segments
            assert sum(len(r) for r in runs) == W
        assert sorted(order.source_rows) == list(range(B))


def test_seeded_and_new_per_epoch(seed, permutation):
    rng = np.random.default_rng(seed)
    streams, flat, B, T, n = corpus_streams(rng, seed, chunk=2, per_stream=2 * 64 * 12 + 1)  # 12 segments
    again = TokenStreams.from_tokens(flat, B, T, shuffle_seed=seed)
    other = TokenStreams.from_tokens(flat, B, T, shuffle_seed=seed + 1)
    first = stream_windows(streams, 0)
    assert np.array_equal(stream_windows(again, 0), first)  # a new process, the same seed: the same order
    # 12! segment orders per row: two draws agree with probability ~1e-9
    assert not np.array_equal(stream_windows(streams, 1), first)
    assert not np.array_equal(stream_windows(other, 0), first)
    assert np.array_equal(stream_windows(streams, 0), first)  # back to epoch 0 after epoch 1


def test_ddp_shards_are_disjoint_and_cover_every_window(seed, permutation):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(2, 4))
    streams, flat, B, T, n = corpus_streams(rng, seed, batch_size=world * int(rng.integers(1, 3)))
    W = (n - 1) // T
    seen = []
    for rank in range(world):
        shard = TokenStreams.from_tokens(flat, B, T, shuffle_seed=seed)
        shard.order(0)  # an order made before sharding must not be reused after it
        shard.streams = shard.streams[rank::world]  # what hierarchos.train.distributed.shard_rows does
        assert len(shard) == W  # every rank takes the same number of steps
        seen.append(stream_windows(shard, 0).ravel())
    everything = np.concatenate(seen)
    assert len(set(everything.tolist())) == len(everything)  # disjoint
    assert np.array_equal(np.sort(everything), np.sort((np.arange(B)[:, None] * n + np.arange(W) * T).ravel()))


def test_resume_restarts_at_the_exact_window(seed, permutation):
    rng = np.random.default_rng(seed)
    streams, flat, B, T, n = corpus_streams(rng, seed)
    epoch, step = int(rng.integers(0, 3)), int(rng.integers(0, len(streams)))
    straight = [streams.batch(i, epoch) for i in range(len(streams))]
    resumed = TokenStreams.from_tokens(flat, B, T, shuffle_seed=seed)  # a fresh process at (epoch, step)
    for i in range(step, len(streams)):
        for a, b in zip(resumed.batch(i, epoch), straight[i]):
            assert torch.equal(a, b)
    # what the streams consumed before `step` (replayed on resume to rebuild ROSA)
    consumed = torch.cat([x for x, _ in straight[:step]], dim=1) if step else torch.zeros(B, 0, dtype=torch.long)
    assert torch.equal(resumed.prefix(step, epoch), consumed)


def test_a_step_past_the_epoch_is_an_error(seed):
    order = EpochOrder(seed, 0, 2, 10)
    with pytest.raises(IndexError):
        order.step_windows(10)
