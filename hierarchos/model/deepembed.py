"""DeepEmbed tables: per-token gates on a stack's channel-mix hidden activation (DESIGN.md 3.1).

One table per stack (or one per block), `vocab_size x ffn_dim`, initialised to ones so a new table
leaves the function unchanged; only indexed, never multiplied as a matrix. Both block types use it.
"""

from __future__ import annotations

from torch import nn


def deepembed_tables(vocab_size: int, ffn_dim: int, n_layers: int, per_block: bool) -> nn.ModuleList:
    tables = nn.ModuleList(nn.Embedding(vocab_size, ffn_dim) for _ in range(n_layers if per_block else 1))
    for table in tables:
        nn.init.ones_(table.weight)
    return tables
