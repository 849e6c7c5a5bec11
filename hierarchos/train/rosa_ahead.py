"""ROSA hints of the trainer's windows, computed one window ahead on a worker thread.

A window's hints depend only on tokens (DESIGN 3.1): each stream row's automaton consumes that
stream's windows of an epoch in order, starting empty at the epoch's first window (and at every
window when the recurrent state is not carried). They do not depend on the model, so while the
device runs window i, a worker thread feeds the next windows through the automata. The automata are
CPU objects whose periodic rebuild (every `rosa_window` tokens once twice that many are held) costs
a whole window's time in the pure-Python automaton; in the C++ one the thread runs without the GIL.

`WindowHints.get(epoch, index, upcoming)` returns the (B, T) hints of that window and keeps the
upcoming windows' in flight (the trainer asks for two, so a rebuild of up to two steps' time is still
hidden). Asked for a window out of sequence (a resume, a window that was not predicted), it rebuilds
the automata by replaying the epoch's earlier windows, so the hints are the same whatever order the
calls come in: `reference_window_hints` is the plain definition they match.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..model.rosa import RosaAutomaton, rosa_hints
from .batches import TokenStreams


def reference_window_hints(streams: TokenStreams, epoch: int, index: int, window: int, none_id: int,
                           carry: bool = True) -> torch.Tensor:
    """The hints of window `index` of `epoch` from fresh automata fed the epoch's earlier windows
    (none when the state is not carried): what the trainer's model must see."""
    tokens = streams.batch(index, epoch)[0]
    automata = [RosaAutomaton(window, none_id) for _ in range(tokens.shape[0])]
    if carry and index > 0:
        rosa_hints(streams.prefix(index, epoch), automata, window, none_id)
    return rosa_hints(tokens, automata, window, none_id)[0]


def _pin(hints: torch.Tensor) -> torch.Tensor:
    """Page-locked memory, so the copy to the GPU runs asynchronously."""
    return hints.pin_memory()


class WindowHints:
    """The hints of a trainer's windows, each computed while earlier ones train (module doc)."""

    def __init__(self, streams: TokenStreams, window: int, none_id: int, carry: bool, pin: bool = False):
        self.streams, self.window, self.none_id, self.carry, self.pin = streams, window, none_id, carry, pin
        self._automata: list[RosaAutomaton] | None = None
        self._fed: tuple[int, int] | None = None  # (epoch, index) of the last window the automata consumed
        self._pool: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[tuple[int, int], Future]] = deque()  # windows in flight, in order
        self.replays = 0  # out-of-sequence windows (automata rebuilt from the epoch's earlier windows)

    def _compute(self, epoch: int, index: int) -> torch.Tensor:
        """The window's hints, feeding the automata; one caller at a time (the worker thread, or the
        caller's once nothing is in flight)."""
        tokens = self.streams.batch(index, epoch)[0]
        if not self.carry or index == 0 or self._fed != (epoch, index - 1):
            self._automata = [RosaAutomaton(self.window, self.none_id) for _ in range(tokens.shape[0])]
            if self.carry and index > 0:
                self.replays += 1
                rosa_hints(self.streams.prefix(index, epoch), self._automata, self.window, self.none_id)
        hints, _ = rosa_hints(tokens, self._automata, self.window, self.none_id)
        self._fed = (epoch, index)
        return _pin(hints) if self.pin else hints

    def _drain(self) -> None:
        """Wait for every window in flight (the automata must never be fed by two threads)."""
        while self._queue:
            self._queue.popleft()[1].exception()

    def get(self, epoch: int, index: int, upcoming: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """(B, T) int64 CPU hints of window `index` of `epoch`; then makes sure the `upcoming`
        (epoch, index) windows, in that order, are in flight on the worker thread (windows already
        in flight beyond them stay)."""
        if self._queue and self._queue[0][0] == (epoch, index):
            hints = self._queue.popleft()[1].result()
        else:
            self._drain()
            hints = self._compute(epoch, index)
        upcoming = [tuple(key) for key in upcoming]
        queued = [key for key, _ in self._queue]
        shared = min(len(queued), len(upcoming))
        if queued[:shared] != upcoming[:shared]:  # a different future than the one in flight
            self._drain()
            queued = []
        for key in upcoming[len(queued):]:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosa-hints")
            self._queue.append((key, self._pool.submit(self._compute, *key)))
        return hints

    def close(self) -> None:
        """Wait for the windows in flight (if any) and stop the worker thread."""
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
