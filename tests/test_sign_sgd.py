"""SparseSignSGD (hierarchos.train.sign_sgd) on the per-puzzle table (hierarchos.model.puzzle_embedding).

The oracle is seed 003's rule written out by hand in numpy: for each id in the batch, sum its
gradients (duplicates included), then row <- row * (1 - lr * wd) - lr * sign(sum); every other
row, and row 0 ('no identifier'), is bit-identical to before.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hierarchos.model.puzzle_embedding import PuzzleEmbedding
from hierarchos.train.sign_sgd import SparseSignSGD


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _table(num_ids: int, dim: int, seed: int) -> PuzzleEmbedding:
    emb = PuzzleEmbedding(num_ids, dim)
    with torch.no_grad():  # rows 1..P random (row 0 stays the zero 'none' row)
        emb.table.weight[1:] = torch.randn(num_ids, dim, generator=torch.Generator().manual_seed(seed))
    return emb


def test_only_the_batch_rows_move_by_lr_sign_plus_decay():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    num_ids, dim, lr, wd = 12, 5, 0.03, 0.7
    emb = _table(num_ids, dim, seed)
    ids = torch.tensor([3, 7, 3, 0, 11, 3])              # 3 three times, the 'none' id once
    coef = torch.tensor(rng.normal(size=(len(ids), dim)))
    coef[0, 0], coef[2, 0], coef[5, 0] = 1.0, -3.0, 0.5   # duplicates whose signs disagree: the sum decides
    coef[1, 1] = 0.0                                      # a zero gradient entry: decay only
    before = emb.table.weight.detach().clone().numpy()
    opt = SparseSignSGD(emb.parameters(), lr=lr, weight_decay=wd)
    (emb(ids) * coef.float()).sum().backward()
    assert emb.table.weight.grad.is_sparse
    opt.step()
    after = emb.table.weight.detach().numpy()

    expected = before.copy()
    grads = {}
    for row, c in zip(ids.tolist(), coef.float().numpy()):
        grads[row] = grads.get(row, 0.0) + c
    for row, grad in grads.items():
        if row == 0:
            continue  # the padding row gets no gradient and stays zero
        expected[row] = before[row] * np.float32(1 - lr * wd) - np.float32(lr) * np.sign(grad)
    np.testing.assert_allclose(after, expected, rtol=0, atol=1e-6, err_msg=f"seed {seed}")
    untouched = [r for r in range(num_ids + 1) if r not in grads or r == 0]
    assert np.array_equal(after[untouched], before[untouched]), f"seed {seed}: rows outside the batch moved"
    assert not after[0].any()
    # the hand-built disagreement: 1 - 3 + 0.5 < 0, so row 3's first entry went up by lr (plus decay)
    assert after[3, 0] == pytest.approx(before[3, 0] * (1 - lr * wd) + lr, abs=1e-6)
    assert after[7, 1] == pytest.approx(before[7, 1] * (1 - lr * wd), abs=1e-7)  # decay only


def test_decay_reaches_only_batch_rows_over_many_steps():
    seed = fresh_seed()
    emb = _table(6, 3, seed)
    before = emb.table.weight.detach().clone()
    opt = SparseSignSGD(emb.parameters(), lr=0.1, weight_decay=1.0)
    for _ in range(5):
        opt.zero_grad()
        emb(torch.tensor([2, 2])).sum().backward()
        opt.step()
    after = emb.table.weight.detach()
    for row in (0, 1, 3, 4, 5, 6):
        assert torch.equal(after[row], before[row]), f"seed {seed}: row {row} moved"
    expected = before[2].clone()
    for _ in range(5):
        expected = expected * 0.9 - 0.1
    torch.testing.assert_close(after[2], expected)


def test_ids_beyond_the_table_read_the_none_row():
    emb = _table(4, 3, fresh_seed())
    out = emb(torch.tensor([9, 0, 2]))
    assert not out[0].any() and not out[1].any()
    assert torch.equal(out[2], emb.table.weight[2])


def test_dense_gradients_are_refused():
    param = torch.nn.Parameter(torch.zeros(3, 2))
    param.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="sparse"):
        SparseSignSGD([param], lr=0.1).step()
