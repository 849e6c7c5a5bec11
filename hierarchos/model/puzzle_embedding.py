"""Per-puzzle embeddings (seed 003, Sapient HRM's `CastedSparseEmbedding`): one learned vector per puzzle id.

Row 0 is the shared "no identifier" vector (test puzzles): it is zero and never moves (padding row,
no gradient). The table emits sparse gradients, so an optimizer for sparse rows
(`hierarchos.train.sign_sgd.SparseSignSGD`) moves only the rows of the ids in a batch; the rest of
the table is never read or written by a step. Used by the puzzle model only: language models have
no puzzle ids and no such table.
"""

from __future__ import annotations

import torch
from torch import nn


class PuzzleEmbedding(nn.Module):
    def __init__(self, num_ids: int, dim: int):
        """num_ids: the largest puzzle id P (rows 1..P are learned; row 0 is the zero 'none' row)."""
        super().__init__()
        self.num_ids = int(num_ids)
        # zero start as in seed 003 (init_std 0): an unseen id and id 0 begin identical
        self.table = nn.Embedding(self.num_ids + 1, dim, padding_idx=0, sparse=True)
        with torch.no_grad():
            self.table.weight.zero_()

    def forward(self, puzzle_ids: torch.Tensor) -> torch.Tensor:
        """puzzle_ids (B,) int in [0, P] -> (B, dim). Ids above P (a test set with more ids than the
        training set had) read the 'none' row: a model cannot know a puzzle it never trained on."""
        ids = torch.where(puzzle_ids > self.num_ids, torch.zeros_like(puzzle_ids), puzzle_ids)
        return self.table(ids.long())
