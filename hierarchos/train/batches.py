"""Token streams for truncated-BPTT training.

Documents (each followed by EOS) are packed into one token sequence and cut into
`batch_size` contiguous streams. Step i reads the i-th window of `chunk` tokens of every
stream, so the recurrent state of a stream carries from one step to the next: long
documents are trained as consecutive chunks with their state carried, and a batch's
position in the data is just the step index (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenStreams:
    streams: torch.Tensor  # (B, n) token ids
    chunk: int

    @classmethod
    def from_documents(cls, docs: list[list[int]], eos_id: int, batch_size: int, chunk: int) -> "TokenStreams":
        flat: list[int] = []
        for doc in docs:
            flat.extend(doc)
            flat.append(eos_id)
        per_stream = len(flat) // batch_size
        if per_stream < 2:
            raise ValueError(f"only {len(flat)} tokens: too few for batch size {batch_size}")
        data = torch.tensor(flat[: per_stream * batch_size], dtype=torch.long)
        return cls(data.view(batch_size, per_stream), chunk)

    @property
    def num_tokens(self) -> int:
        return self.streams.numel()

    def __len__(self) -> int:
        """Steps per epoch (the last window may be shorter)."""
        usable = self.streams.shape[1] - 1  # the final token has no target
        return (usable + self.chunk - 1) // self.chunk

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = step * self.chunk
        stop = min(start + self.chunk, self.streams.shape[1] - 1)
        return self.streams[:, start:stop], self.streams[:, start + 1:stop + 1]

    def prefix(self, step: int) -> torch.Tensor:
        """All tokens the streams consumed before `step` (replayed to rebuild ROSA on resume)."""
        return self.streams[:, : min(step * self.chunk, self.streams.shape[1] - 1)]
