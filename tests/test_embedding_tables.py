"""DeepEmbed tables (hierarchos/model/deepembed.py) and the per-puzzle embedding
(hierarchos/model/puzzle_embedding.py), by hand on tiny tables: how many tables, their initial values,
which row each block's gate reads and in which dtype; the puzzle table's zero 'none' row, ids past the
table, and sparse gradients that never reach row 0.
"""

from __future__ import annotations

import torch

from hierarchos.model.deepembed import DeepEmbedTables
from hierarchos.model.puzzle_embedding import PuzzleEmbedding


def test_deepembed_tables_count_shape_and_init():
    shared = DeepEmbedTables(7, 5, 3, per_block=False)
    per_block = DeepEmbedTables(7, 5, 3, per_block=True)
    assert len(shared) == 1 and len(per_block) == 3
    for table in (*shared, *per_block):
        assert isinstance(table, torch.nn.Embedding) and table.weight.shape == (7, 5)
        assert torch.equal(table.weight, torch.ones(7, 5))  # a new table leaves the function unchanged
    assert [n for n, _ in per_block.named_parameters()] == ["0.weight", "1.weight", "2.weight"]


def test_deepembed_gates_read_each_blocks_row():
    tokens = torch.tensor([[2, 0, 6], [1, 1, 3]])
    with torch.no_grad():
        shared = DeepEmbedTables(7, 4, 3, per_block=False)
        shared[0].weight.copy_(torch.arange(28.0).view(7, 4))
        gates = list(shared.gates(tokens, 3))
        assert len(gates) == 3 and gates[0] is gates[1] is gates[2]  # looked up once
        assert torch.equal(gates[0], torch.arange(28.0).view(7, 4)[tokens])
        per_block = DeepEmbedTables(7, 4, 2, per_block=True)
        for i, table in enumerate(per_block):
            table.weight.copy_(torch.arange(28.0).view(7, 4) + 100 * i)
        gates = list(per_block.gates(tokens, 2))
    assert len(gates) == 2
    for i, gate in enumerate(gates):
        assert torch.equal(gate, torch.arange(28.0).view(7, 4)[tokens] + 100 * i) and gate.dtype == torch.float32
    # a shared table yields as many gates as blocks asked for
    assert len(list(shared.gates(tokens, 5))) == 5 and len(list(shared.gates(tokens, 0))) == 0


def test_deepembed_gates_follow_autocast():
    tokens = torch.tensor([[1, 2]])
    for per_block in (False, True):
        tables = DeepEmbedTables(4, 3, 2, per_block)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert all(g.dtype == torch.bfloat16 for g in tables.gates(tokens, 2))
        with torch.no_grad():
            assert all(g.dtype == torch.float32 for g in tables.gates(tokens, 2))
        assert all(g.dtype == torch.float64 for g in tables.double().gates(tokens, 2))


def test_puzzle_embedding_rows_and_ids_past_the_table():
    emb = PuzzleEmbedding(3, 2)
    assert emb.num_ids == 3 and isinstance(emb.num_ids, int) and PuzzleEmbedding(3.0, 2).num_ids == 3
    assert emb.table.weight.shape == (4, 2) and emb.table.padding_idx == 0 and emb.table.sparse
    assert not emb.table.weight.any()  # zero start: an unseen id and id 0 begin identical
    with torch.no_grad():
        emb.table.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    out = emb(torch.tensor([0, 1, 3, 4, 9], dtype=torch.int32))
    assert out.tolist() == [[0, 0], [1, 2], [5, 6], [0, 0], [0, 0]]  # ids above P read the 'none' row


def test_puzzle_embedding_gradient_is_sparse_and_skips_row_0():
    emb = PuzzleEmbedding(4, 3)
    with torch.no_grad():
        emb.table.weight[1:].normal_()
    emb(torch.tensor([2, 0, 2, 7])).sum().backward()
    grad = emb.table.weight.grad
    assert grad.is_sparse
    dense = grad.to_dense()
    assert dense[2].tolist() == [2.0, 2.0, 2.0] and not dense[[0, 1, 3, 4]].any()
