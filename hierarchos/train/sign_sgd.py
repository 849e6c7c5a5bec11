"""Sign-SGD for sparse embedding rows (seed 003's `CastedSparseEmbeddingSignSGD`).

For a table with a sparse gradient (nn.Embedding(sparse=True)), one step does, on the rows the
batch touched and only those:  row <- row * (1 - lr * weight_decay) - lr * sign(sum of the row's grads).
Duplicate ids in a batch are summed before the sign (what coalescing a sparse gradient does), as
seed 003 sums its gathered gradients per unique id. Rows not in the batch are neither read nor
written (bit-identical), and weight decay reaches only the batch's rows: a puzzle seen rarely is
not decayed towards zero by every step of every other puzzle.
"""

from __future__ import annotations

import torch


class SparseSignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1):
        if not lr > 0 or not weight_decay >= 0:
            raise ValueError(f"SparseSignSGD: lr must be > 0 and weight_decay >= 0, got {lr}, {weight_decay}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if not grad.is_sparse:  # a bug: this optimizer is for sparse tables only
                    raise ValueError("SparseSignSGD steps tables with sparse gradients (nn.Embedding(sparse=True))")
                grad = grad.coalesce()  # sums the rows of duplicate ids
                rows, values = grad.indices()[0], grad.values()
                if rows.numel() == 0:
                    continue
                updated = param.index_select(0, rows) * (1.0 - lr * decay) - lr * torch.sign(values).to(param.dtype)
                param.index_copy_(0, rows, updated)
