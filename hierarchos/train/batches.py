"""Token streams for truncated-BPTT training.

Documents (each followed by EOS) are packed into one token sequence and cut into
`batch_size` contiguous streams. Step i reads the i-th window of `chunk` tokens of every
stream, so the recurrent state of a stream carries from one step to the next: long
documents are trained as consecutive chunks with their state carried, and a batch's
position in the data is just the (epoch, step) pair (exact resume).

The sequence may be a torch tensor or a memory-mapped numpy array (the token cache): windows
are read from it per step, so memory does not grow with the corpus. With `shuffle_seed`, each
epoch reads the streams in a seeded order: the rows are permuted and each row's full windows
are read as its segments (runs of up to SEGMENT_WINDOWS consecutive windows) in a permuted
order. Inside a segment the state carries as before; a segment boundary is one more place
where unrelated text follows, as at every EOS. The last, shorter window of a row is dropped then.
The order is never listed: `EpochOrder` keeps a few numbers per row and computes a step's
windows when asked, so setting it up costs the same on a corpus of billions of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SEGMENT_WINDOWS = 64
EXPLICIT_SEGMENTS = 1024  # rows with at most this many segments get a uniform permutation, listed
FEISTEL_ROUNDS = 6
STEP_BLOCK = 256  # steps whose windows are computed together (numpy's per-call cost, paid once per block)

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit (uint64 arrays wrap)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class EpochOrder:
    """One epoch's shuffled window order, in O(rows) memory.

    Row b of the batch reads source row `source_rows[b]`. A row's W full windows form segments
    of `seg` consecutive windows (the last one shorter when seg does not divide W); slot s of
    the epoch holds segment perm_b(s), a seeded permutation of the segments: listed (uniform)
    when there are at most EXPLICIT_SEGMENTS, else a keyed Feistel network on the segment index,
    cycle-walked into range (a bijection; no list). Step i of row b is the window at offset
    i - (start of slot s) of the segment in slot s, so consecutive steps read consecutive windows
    inside a segment: the recurrent state carries along them as in the unshuffled order.
    """

    def __init__(self, seed: int, epoch: int, rows: int, windows: int):
        rng = np.random.default_rng([int(seed), int(epoch)])
        self.rows, self.windows = rows, windows
        self.source_rows = rng.permutation(rows)
        self.seg = max(1, min(SEGMENT_WINDOWS, windows // 4))
        self.segments = -(-windows // self.seg)
        self.last_len = windows - (self.segments - 1) * self.seg  # the last segment's windows (1..seg)
        self.perms = self.keys = None
        self._block_id, self._block = -1, None
        if self.segments <= EXPLICIT_SEGMENTS:
            self.perms = rng.permuted(np.tile(np.arange(self.segments), (rows, 1)), axis=1)  # (rows, segments)
            self.last_slot = np.argmax(self.perms == self.segments - 1, axis=1)
        else:
            self.half_bits = max(1, ((self.segments - 1).bit_length() + 1) // 2)
            self.keys = rng.integers(0, 2**63, size=(rows, FEISTEL_ROUNDS), dtype=np.uint64)
            self.last_slot = self._walk(np.full(rows, self.segments - 1, dtype=np.uint64),
                                        np.arange(rows), inverse=True).astype(np.int64)

    def _feistel(self, x: np.ndarray, keys: np.ndarray, inverse: bool) -> np.ndarray:
        """A permutation of [0, 4**half_bits): balanced Feistel rounds, one key per round and row."""
        h = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> h, x & mask
        rounds = range(FEISTEL_ROUNDS - 1, -1, -1) if inverse else range(FEISTEL_ROUNDS)
        for k in rounds:
            if inverse:  # undo (L, R) -> (R, L ^ F(R))
                left, right = right ^ (_mix(left ^ keys[:, k]) & mask), left
            else:
                left, right = right, left ^ (_mix(right ^ keys[:, k]) & mask)
        return (left << h) | right

    def _walk(self, x: np.ndarray, rows: np.ndarray, inverse: bool = False) -> np.ndarray:
        """The Feistel permutation restricted to [0, segments) by cycle walking: apply it again to
        the values that left the range (they come back: a permutation's cycles are closed)."""
        keys = self.keys[rows]
        out = self._feistel(x, keys, inverse)
        outside = np.flatnonzero(out >= np.uint64(self.segments))
        while outside.size:
            out[outside] = self._feistel(out[outside], keys[outside], inverse)
            outside = outside[out[outside] >= np.uint64(self.segments)]
        return out

    def window_index(self, steps) -> np.ndarray:
        """(rows, len(steps)) index of the window (in its source row) that each row reads at each step."""
        steps = np.asarray(steps, dtype=np.int64).reshape(1, -1)
        last = self.last_slot.reshape(-1, 1)
        # steps after the short last segment's slot are shifted as if that slot were full length
        padded = np.where(steps < last * self.seg + self.last_len, steps, steps + (self.seg - self.last_len))
        slot, offset = padded // self.seg, padded % self.seg  # (rows, n)
        if self.perms is not None:
            segment = np.take_along_axis(self.perms, slot, axis=1)
        else:
            rows = np.broadcast_to(np.arange(self.rows).reshape(-1, 1), slot.shape)
            segment = self._walk(slot.astype(np.uint64).ravel(), rows.ravel()).reshape(slot.shape).astype(np.int64)
        return segment * self.seg + offset

    def step_windows(self, step: int) -> np.ndarray:
        """(rows,) window index each row reads at `step`; the windows of STEP_BLOCK steps are computed at once."""
        if not 0 <= step < self.windows:
            raise IndexError(f"step {step} outside the epoch's {self.windows} steps")
        block, at = divmod(step, STEP_BLOCK)
        if block != self._block_id:
            first = block * STEP_BLOCK
            self._block = self.window_index(np.arange(first, min(first + STEP_BLOCK, self.windows)))
            self._block_id = block
        return self._block[:, at]


def reference_order(seed: int, epoch: int, rows: int, windows: int) -> tuple[np.ndarray, np.ndarray]:
    """The same order as `EpochOrder`, listed eagerly from its definition: (source rows, (rows, windows)
    window index of each step), every row's permuted segments concatenated. O(windows) time and memory;
    the tests' oracle for EpochOrder's slot arithmetic, and what the order cost before it was lazy."""
    order = EpochOrder(seed, epoch, rows, windows)
    segments = [np.arange(s * order.seg, min((s + 1) * order.seg, windows)) for s in range(order.segments)]
    listed = []
    for b in range(rows):
        if order.perms is not None:
            perm = order.perms[b]
        else:
            perm = order._walk(np.arange(order.segments, dtype=np.uint64),
                               np.full(order.segments, b)).astype(np.int64)
        listed.append(np.concatenate([segments[k] for k in perm]))
    return order.source_rows, np.stack(listed)


@dataclass
class TokenStreams:
    streams: torch.Tensor | np.ndarray  # (B, n) token ids
    chunk: int
    shuffle_seed: int | None = None
    _orders: dict = field(default_factory=dict, repr=False)
    # tokens of the text before its split into rows (the split drops a tail shorter than a row);
    # None: the rows hold the whole text. Validation scales its summed NLL to the whole text by it.
    source_tokens: int | None = None

    @classmethod
    def from_documents(cls, docs: list[list[int]], eos_id: int, batch_size: int, chunk: int,
                       shuffle_seed: int | None = None) -> "TokenStreams":
        flat: list[int] = []
        for doc in docs:
            flat.extend(doc)
            flat.append(eos_id)
        per_stream = len(flat) // batch_size
        if per_stream < 2:
            raise ValueError(f"only {len(flat)} tokens: too few for batch size {batch_size}")
        data = torch.tensor(flat[: per_stream * batch_size], dtype=torch.long)
        return cls(data.view(batch_size, per_stream), chunk, shuffle_seed, source_tokens=len(flat))

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, batch_size: int, chunk: int,
                    shuffle_seed: int | None = None) -> "TokenStreams":
        """Streams over a flat array of ids that already holds the EOS tokens (a memory map: a view, no copy)."""
        per_stream = len(tokens) // batch_size
        if per_stream < 2:
            raise ValueError(f"only {len(tokens)} tokens: too few for batch size {batch_size}")
        return cls(tokens[: per_stream * batch_size].reshape(batch_size, per_stream), chunk, shuffle_seed,
                   source_tokens=len(tokens))

    @property
    def num_tokens(self) -> int:
        return int(self.streams.shape[0] * self.streams.shape[1])

    @property
    def _full_windows(self) -> int:
        return (self.streams.shape[1] - 1) // self.chunk

    @property
    def shuffled(self) -> bool:
        return self.shuffle_seed is not None and self._full_windows >= 1

    def __len__(self) -> int:
        """Steps per epoch (unshuffled, the last window may be shorter)."""
        if self.shuffled:
            return self._full_windows
        usable = self.streams.shape[1] - 1  # the final token has no target
        return (usable + self.chunk - 1) // self.chunk

    def order(self, epoch: int) -> EpochOrder:
        """The shuffled window order of `epoch` (O(rows) to set up; steps are computed when read)."""
        # keyed by the shape too: DDP replaces `streams` by this rank's rows after construction
        key = (epoch, self.streams.shape[0], self._full_windows)
        if key not in self._orders:
            self._orders = {key: EpochOrder(self.shuffle_seed, epoch, key[1], key[2])}  # one epoch at a time
        return self._orders[key]

    def _rows(self, rows, starts, length: int) -> torch.Tensor:
        block = np.stack([np.asarray(self.streams[r, s:s + length]) for r, s in zip(rows, starts)])
        return torch.from_numpy(block.astype(np.int64))

    def batch(self, step: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shuffled:
            order = self.order(epoch)
            starts = order.step_windows(step) * self.chunk
            window = self._rows(order.source_rows, starts, self.chunk + 1)
            return window[:, :-1], window[:, 1:]
        start = step * self.chunk
        stop = min(start + self.chunk, self.streams.shape[1] - 1)
        if isinstance(self.streams, torch.Tensor):
            return self.streams[:, start:stop], self.streams[:, start + 1:stop + 1]
        window = torch.from_numpy(np.asarray(self.streams[:, start:stop + 1]).astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def prefix(self, step: int, epoch: int = 0) -> torch.Tensor:
        """All tokens the streams consumed before `step` of `epoch` (replayed to rebuild ROSA on resume)."""
        if self.shuffled:
            order = self.order(epoch)
            if step == 0:
                return torch.zeros(order.rows, 0, dtype=torch.long)
            starts = order.window_index(np.arange(step)) * self.chunk  # (rows, step)
            return torch.cat([self._rows(order.source_rows, starts[:, i], self.chunk) for i in range(step)], dim=1)
        stop = min(step * self.chunk, self.streams.shape[1] - 1)
        if isinstance(self.streams, torch.Tensor):
            return self.streams[:, :stop]
        return torch.from_numpy(np.asarray(self.streams[:, :stop]).astype(np.int64))
