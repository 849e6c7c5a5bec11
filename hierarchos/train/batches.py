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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SEGMENT_WINDOWS = 64


@dataclass
class TokenStreams:
    streams: torch.Tensor | np.ndarray  # (B, n) token ids
    chunk: int
    shuffle_seed: int | None = None
    _orders: dict = field(default_factory=dict, repr=False)

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
        return cls(data.view(batch_size, per_stream), chunk, shuffle_seed)

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, batch_size: int, chunk: int,
                    shuffle_seed: int | None = None) -> "TokenStreams":
        """Streams over a flat array of ids that already holds the EOS tokens (a memory map: a view, no copy)."""
        per_stream = len(tokens) // batch_size
        if per_stream < 2:
            raise ValueError(f"only {len(tokens)} tokens: too few for batch size {batch_size}")
        return cls(tokens[: per_stream * batch_size].reshape(batch_size, per_stream), chunk, shuffle_seed)

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

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(source row of each stream, (B, steps) start offset of each step's window) for `epoch`."""
        if epoch not in self._orders:
            rows, windows = self.streams.shape[0], self._full_windows
            rng = np.random.default_rng([int(self.shuffle_seed), int(epoch)])
            source_rows = rng.permutation(rows)
            seg = max(1, min(SEGMENT_WINDOWS, windows // 4))
            segments = [np.arange(s, min(s + seg, windows)) for s in range(0, windows, seg)]
            starts = np.stack([np.concatenate([segments[k] for k in rng.permutation(len(segments))])
                               for _ in range(rows)]) * self.chunk
            self._orders = {epoch: (source_rows, starts)}  # one epoch at a time
        return self._orders[epoch]

    def _rows(self, rows, starts, length: int) -> torch.Tensor:
        block = np.stack([np.asarray(self.streams[r, s:s + length]) for r, s in zip(rows, starts)])
        return torch.from_numpy(block.astype(np.int64))

    def batch(self, step: int, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shuffled:
            rows, starts = self.order(epoch)
            window = self._rows(rows, starts[:, step], self.chunk + 1)
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
            rows, starts = self.order(epoch)
            if step == 0:
                return torch.zeros(len(rows), 0, dtype=torch.long)
            return torch.cat([self._rows(rows, starts[:, i], self.chunk) for i in range(step)], dim=1)
        stop = min(step * self.chunk, self.streams.shape[1] - 1)
        if isinstance(self.streams, torch.Tensor):
            return self.streams[:, :stop]
        return torch.from_numpy(np.asarray(self.streams[:, :stop]).astype(np.int64))
