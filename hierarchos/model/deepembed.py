"""DeepEmbed tables: per-token gates on a stack's channel-mix hidden activation (DESIGN.md 3.1).

One table per stack (or one per block), `vocab_size x ffn_dim`, initialised to ones so a new table
leaves the function unchanged; only indexed, never multiplied as a matrix. Both block types use it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..ops.amp import to_autocast_dtype


class DeepEmbedTables(nn.ModuleList):
    """The tables of one stack (parameter names `deepembed.{i}.weight`, as saved models have them)."""

    def __init__(self, vocab_size: int, ffn_dim: int, n_layers: int, per_block: bool):
        super().__init__(nn.Embedding(vocab_size, ffn_dim) for _ in range(n_layers if per_block else 1))
        for table in self:
            nn.init.ones_(table.weight)

    def gates(self, tokens: torch.Tensor, n_blocks: int) -> Iterator[torch.Tensor]:
        """Each block's gate, in the dtype the channel mix runs in under autocast. A shared table is
        looked up (and cast) once per pass; per-block gates one at a time, as their block runs."""
        if len(self) == 1:
            shared = to_autocast_dtype(self[0](tokens))
            for _ in range(n_blocks):
                yield shared
        else:
            for table in self:
                yield to_autocast_dtype(table(tokens))
